"""pipeline.storage against local folders and a real SeaweedFS S3 server (no mocks)."""

from __future__ import annotations

import io
import os
import sys
from collections import Counter

import pytest

from pipeline.storage import (
    LocalStorage,
    S3Storage,
    StorageError,
    is_s3,
    join,
    split_s3,
    storage_for,
)

MiB = 1 << 20


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    return str(request.getfixturevalue("s3_bucket"))


def test_join_and_uri_helpers() -> None:
    assert join("s3://b/pre/", "index", "part.parquet") == "s3://b/pre/index/part.parquet"
    assert join("s3://b", "/x/", "y") == "s3://b/x/y"
    assert join("/tmp/a", "b", "c") == os.path.join("/tmp/a", "b", "c")
    assert is_s3("s3://b/k") and not is_s3("/s3://nope")
    assert split_s3("s3://bucket/a/b") == ("bucket", "a/b")
    assert isinstance(storage_for("/x"), LocalStorage)
    assert isinstance(storage_for("s3://b/x"), S3Storage)
    with pytest.raises(ValueError, match="part_size"):
        S3Storage(part_size=1 << 20)


def test_round_trip(root: str) -> None:
    st = storage_for(root)
    files = {"b.bin": b"0123456789", "a/x.bin": b"hello", "a/deep/y.bin": b""}
    for rel, data in files.items():
        st.write(join(root, rel), data)
    assert st.list(root) == sorted(join(root, rel) for rel in files)
    assert st.list(join(root, "a")) == sorted([join(root, "a/x.bin"), join(root, "a/deep/y.bin")])
    assert st.list(join(root, "missing")) == []

    uri = join(root, "b.bin")
    assert st.read(uri) == b"0123456789"
    assert st.read_range(uri, 2, 5) == b"234"
    assert st.read_range(uri, 8, 100) == b"89"  # clipped to the object
    assert st.read_range(uri, 10, 20) == b""
    assert st.read_range(uri, 5, 5) == b""
    assert st.size(uri) == 10 and st.size(join(root, "a/deep/y.bin")) == 0
    assert st.exists(uri) and not st.exists(join(root, "nope.bin"))

    st.write(uri, b"replaced")  # atomic replace of an existing object
    assert st.read(uri) == b"replaced"

    st.delete(uri)
    st.delete(uri)  # missing is fine
    assert not st.exists(uri)
    with pytest.raises(FileNotFoundError, match=r"b\.bin"):
        st.read(uri)
    if not is_s3(root):  # atomic local writes leave no temp files behind
        assert not [n for n in os.listdir(root) if n.startswith(".")]


def test_list_is_a_folder_not_a_string_prefix(root: str) -> None:
    st = storage_for(root)
    st.write(join(root, "abc", "x"), b"1")
    st.write(join(root, "abcd", "y"), b"2")
    assert st.list(join(root, "abc")) == [join(root, "abc", "x")]


def test_upload_download(root: str, tmp_path) -> None:
    data = os.urandom(12 * MiB + 123)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    opts = {"multipart_threshold": 5 * MiB, "part_size": 5 * MiB} if is_s3(root) else {}
    st = storage_for(root, **opts)
    uri = join(root, "up", "big.bin")
    st.upload(str(src), uri)
    assert st.size(uri) == len(data)
    out = tmp_path / "back" / "big.bin"
    st.download(uri, str(out))
    assert out.read_bytes() == data
    if is_s3(root):  # it really went up in three parts
        assert isinstance(st, S3Storage)
        bucket, key = split_s3(uri)
        etag = st.client.head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
        assert etag.endswith("-3"), etag


def test_failed_multipart_upload_is_aborted_and_invisible(s3_bucket: str, tmp_path) -> None:
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(11 * MiB))
    st = S3Storage(multipart_threshold=5 * MiB, part_size=5 * MiB, max_concurrency=1)
    uri = join(s3_bucket, "broken.bin")
    bucket, key = split_s3(uri)

    def fail_second_part(params: dict, **_: object) -> None:
        if params.get("PartNumber") == 2:
            raise ConnectionError("injected network failure")

    # A real failure injected through botocore's own event hooks, against the real server.
    st.client.meta.events.register("provide-client-params.s3.UploadPart", fail_second_part)
    with pytest.raises(StorageError, match=r"broken\.bin.*injected network failure"):
        st.upload(str(src), uri)
    assert not st.exists(uri)
    pending = st.client.list_multipart_uploads(Bucket=bucket, Prefix=key).get("Uploads", [])
    assert pending == []


def test_open_streams_with_ranged_reads(s3_bucket: str) -> None:
    data = os.urandom(8 * MiB)
    uri = join(s3_bucket, "obj.bin")
    read_ahead = 64 << 10
    st = S3Storage(read_ahead=read_ahead)
    st.write(uri, data)
    f = st.open(uri)
    assert f.seekable() and f.readable()
    f.seek(5 * MiB)
    assert f.read(1000) == data[5 * MiB : 5 * MiB + 1000]
    assert f.read(10) == data[5 * MiB + 1000 : 5 * MiB + 1010]  # from the read-ahead buffer
    f.seek(-100, io.SEEK_CUR)
    assert f.tell() == 5 * MiB + 910
    assert f.read(50) == data[5 * MiB + 910 : 5 * MiB + 960]
    assert f.seek(-20, io.SEEK_END) == len(data) - 20
    assert f.read() == data[-20:]
    assert f.read(5) == b""
    f.seek(100)
    big = f.read(2 * read_ahead)  # larger than the buffer: fetched exactly
    assert big == data[100 : 100 + 2 * read_ahead]
    fetched = getattr(f, "bytes_fetched")  # noqa: B009 - not on the BinaryIO protocol
    # Three buffer fills and one exact read: nowhere near the whole 8 MiB object.
    assert fetched <= 2 * read_ahead + 20 + 2 * read_ahead
    assert fetched < len(data) // 16
    f.close()
    with pytest.raises(ValueError):
        f.read(1)


def test_local_open_is_a_plain_file(tmp_path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"abcdef")
    with storage_for(str(path)).open(str(path)) as f:
        f.seek(2)
        assert f.read(2) == b"cd"


def test_errors_name_the_uri_and_never_the_credentials(
    s3_server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = join(s3_bucket, "secret-test.bin")
    good = S3Storage()
    good.write(uri, b"x")
    wrong_secret = "wrong-secret-value-123456"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
    bad = S3Storage(max_attempts=1)
    with pytest.raises(StorageError) as info:
        bad.read(uri)
    msg = str(info.value)
    assert uri in msg and "SignatureDoesNotMatch" in msg
    for secret in (wrong_secret, s3_server.secret_key, s3_server.access_key):
        assert secret not in msg
        assert secret not in repr(bad) and secret not in repr(good)
    with pytest.raises(FileNotFoundError, match="no-such-object"):
        good.read(join(s3_bucket, "no-such-object"))


def test_credentials_are_masked_as_whole_tokens_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr/t+Key")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    st = S3Storage()
    text = "The bucket does not exist; Credential=x/20261130, signed with s3cr/t+Key."
    assert st._scrub(text) == "The bucket does not exist; Credential=***/20261130, signed with ***."


def test_source_folders_follow_links_to_folders_once(tmp_path) -> None:
    from pipeline.sources import describe_skipped, expand_sources

    disk = tmp_path / "disk2"
    (disk / "dvd").mkdir(parents=True)
    (disk / "dvd" / "VTS_01_1.VOB").write_bytes(b"b")
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "a.mp4").write_bytes(b"a")
    (videos / "notes.txt").write_bytes(b"n")
    (videos / ".a.mp4.part.mp4").write_bytes(b"h")  # hidden
    (videos / "more").symlink_to(disk)  # a folder linked in from another disk
    (videos / "loop").symlink_to(videos)  # a link back up the tree
    # a broken link and a named pipe are listed: probe makes each an error row
    (videos / "gone.mp4").symlink_to(tmp_path / "deleted.mp4")
    os.mkfifo(videos / "pipe.mkv")
    for name in ("raw.CR2", "raw2.cr2", "README"):
        (videos / name).write_bytes(b"?")
    skipped: Counter[str] = Counter()
    assert expand_sources([str(videos)], skipped=skipped) == [
        str(videos / "a.mp4"),
        str(videos / "gone.mp4"),
        str(videos / "more" / "dvd" / "VTS_01_1.VOB"),
        str(videos / "pipe.mkv"),
    ]
    # given by name, a pipe is a source too; a broken link is said to be one
    assert expand_sources([str(videos / "pipe.mkv")]) == [str(videos / "pipe.mkv")]
    with pytest.raises(FileNotFoundError, match=r"gone\.mp4' is a broken link"):
        expand_sources([str(videos / "gone.mp4")])
    # the files left out are counted by extension (hidden files aside), and said
    assert skipped == {".cr2": 2, ".txt": 1, "(no extension)": 1}
    assert describe_skipped(skipped) == (
        "skipped 4 files that are not video or image by extension "
        "(.cr2 2, (no extension) 1, .txt 1)"
    )
    assert describe_skipped(Counter()) is None


def test_a_file_linked_under_several_names_is_one_source(tmp_path) -> None:
    """A folder of picks linking into the pile, and a Hugging Face cache (snapshots
    linking to blobs named by hash) list one file under several paths: it is built
    once, under its own path where that is listed, else its first link."""
    from pipeline.sources import LINK_KEY, describe_skipped, expand_sources

    pile = tmp_path / "pile"
    (pile / "picks").mkdir(parents=True)
    (pile / "a.mp4").write_bytes(b"a")
    (pile / "picks" / "best.mp4").symlink_to(pile / "a.mp4")
    cache = pile / "hub"
    (cache / "blobs").mkdir(parents=True)
    (cache / "blobs" / "9f2c").write_bytes(b"x")  # no extension: not listed itself
    for rev in ("v1", "v2"):
        (cache / "snapshots" / rev).mkdir(parents=True)
        (cache / "snapshots" / rev / "x.mp4").symlink_to(cache / "blobs" / "9f2c")
    (pile / "gone.mp4").symlink_to(tmp_path / "deleted.mp4")  # broken: still listed
    (pile / "gone2.mp4").symlink_to(tmp_path / "deleted.mp4")
    skipped: Counter[str] = Counter()
    assert expand_sources([str(pile)], skipped=skipped) == [
        str(pile / "a.mp4"),
        str(pile / "gone.mp4"),
        str(pile / "gone2.mp4"),
        str(cache / "snapshots" / "v1" / "x.mp4"),
    ]
    assert skipped == {LINK_KEY: 2, "(no extension)": 1}
    assert describe_skipped(skipped) == (
        "skipped 1 file that is not video or image by extension ((no extension) 1); "
        "skipped 2 links to files listed under another path (built once)"
    )
    # a link given by name is its file, as listed from its folder
    assert expand_sources([str(pile / "picks"), str(pile / "a.mp4")]) == [str(pile / "a.mp4")]


def test_source_folders_skip_the_corpus_built_inside_them(tmp_path, s3_bucket: str) -> None:
    from pipeline.sources import expand_sources

    videos = tmp_path / "videos"
    (videos / "corpus" / "clips").mkdir(parents=True)
    (videos / "a.mp4").write_bytes(b"a")
    (videos / "corpus" / "clips" / "k.mp4").write_bytes(b"k")
    (videos / "corpusx.mp4").write_bytes(b"x")  # a sibling that only shares the prefix
    found = expand_sources([str(videos)], exclude=str(videos / "corpus"))
    assert found == [str(videos / "a.mp4"), str(videos / "corpusx.mp4")]
    assert len(expand_sources([str(videos)])) == 3
    st = S3Storage()
    for key in ("raw/a.mp4", "raw/out/clips/k.mp4"):
        st.write(join(s3_bucket, key), b"v")
    assert expand_sources([join(s3_bucket, "raw")], exclude=join(s3_bucket, "raw/out/")) == [
        join(s3_bucket, "raw/a.mp4")
    ]


def test_source_folders_skip_other_corpora_inside_them(tmp_path) -> None:
    """The clip files of a corpus built in a source folder are cuts of sources, not
    sources; named itself, a corpus (or its clips folder) is walked."""
    from collections import Counter

    from pipeline.sources import describe_skipped, expand_sources

    videos = tmp_path / "videos"
    for corpus in ("v1", "deep/v2"):
        root = videos / corpus
        for folder in ("clips", "index", "sources", "shards"):
            (root / folder).mkdir(parents=True)
        (root / "manifest.json").write_text("{}")
        (root / "clips" / "k.mp4").write_bytes(b"k")
    (videos / "a.mp4").write_bytes(b"a")
    (videos / "notes").mkdir()
    (videos / "notes" / "manifest.json").write_text("{}")  # a manifest alone: no corpus
    (videos / "notes" / "b.mp4").write_bytes(b"b")
    skipped: Counter[str] = Counter()
    found = expand_sources([str(videos)], skipped=skipped)
    assert found == [str(videos / "a.mp4"), str(videos / "notes" / "b.mp4")]
    assert describe_skipped(skipped) == (
        "skipped 1 file that is not video or image by extension (.json 1); "
        "skipped 2 reelpack corpora inside the source folders"
    )
    own: Counter[str] = Counter()  # the corpus being built is left out without a note
    expand_sources([str(videos)], exclude=str(videos / "v1"), skipped=own)
    assert own["(a reelpack corpus)"] == 1
    assert expand_sources([str(videos / "v1")]) == [str(videos / "v1" / "clips" / "k.mp4")]
    listed = tmp_path / "list.txt"
    listed.write_text(f"{videos}\n")
    assert expand_sources([f"@{listed}"]) == found


def test_source_prefixes_skip_other_corpora_under_them(s3_bucket: str) -> None:
    """As in a folder, a corpus under an ``s3://`` prefix is found in the listing and
    left out; named itself, it is listed."""
    from collections import Counter

    from pipeline.sources import SourceInCorpus, describe_skipped, expand_sources

    st = S3Storage()
    keys = ["raw/a.mp4", "raw/notes/manifest.json", "raw/notes/b.mp4"]  # a manifest alone
    for corpus in ("raw/v1", "raw/deep/v2"):
        for name in ("manifest.json", "clips/k.mp4", "index/part-0.parquet", "sources/s.parquet"):
            keys.append(f"{corpus}/{name}")
    for key in keys:
        st.write(join(s3_bucket, key), b"v")
    raw = join(s3_bucket, "raw")
    skipped: Counter[str] = Counter()
    found = expand_sources([raw], skipped=skipped)
    assert found == [join(s3_bucket, "raw/a.mp4"), join(s3_bucket, "raw/notes/b.mp4")]
    assert describe_skipped(skipped) == (
        "skipped 1 file that is not video or image by extension (.json 1); "
        "skipped 2 reelpack corpora inside the source folders"
    )
    own: Counter[str] = Counter()  # the corpus being built is left out without a note
    expand_sources([raw + "/"], exclude=join(s3_bucket, "raw/v1"), skipped=own)
    assert own["(a reelpack corpus)"] == 1
    assert expand_sources([join(s3_bucket, "raw/v1")]) == [join(s3_bucket, "raw/v1/clips/k.mp4")]
    with pytest.raises(SourceInCorpus, match="is at or inside the corpus root"):
        expand_sources([join(s3_bucket, "raw/v1/clips/")], exclude=join(s3_bucket, "raw"))
    named = join(s3_bucket, "raw/v1/clips/k.mp4")  # an object given by name is a source
    assert expand_sources([named], exclude=join(s3_bucket, "raw")) == [named]


def test_source_lists_name_files_folders_and_objects(
    tmp_path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.sources import expand_sources

    videos = tmp_path / "videos"
    (videos / "more").mkdir(parents=True)
    (videos / "a.mp4").write_bytes(b"a")
    (videos / "more" / "b.mov").write_bytes(b"b")
    (videos / "more" / "notes.txt").write_bytes(b"n")
    st = S3Storage()
    for key in ("raw/c.mp4", "raw/sub/d.mkv", "raw/sub/readme.md"):
        st.write(join(s3_bucket, key), b"v")
    listed = tmp_path / "lists" / "sources.txt"
    listed.parent.mkdir()
    listed.write_text(
        "\ufeff# sources of batch 1\n"
        f"{videos / 'a.mp4'}\n"
        "\n"
        "  ../videos/more  \n"  # a folder, relative to the list's own folder
        f"{join(s3_bucket, 'raw/c.mp4')}\n"
        f"{join(s3_bucket, 'raw/sub')}/\n"  # a prefix
        f"{join(s3_bucket, 'raw/missing.mp4')}\n"  # taken as it is: probe reports it
        "gone/e.mp4\n"
    )
    expected = sorted(
        [
            str(videos / "a.mp4"),
            str(videos / "more" / "b.mov"),
            join(s3_bucket, "raw/c.mp4"),
            join(s3_bucket, "raw/sub/d.mkv"),
            join(s3_bucket, "raw/missing.mp4"),
            str(tmp_path / "lists" / "gone" / "e.mp4"),
        ]
    )
    skipped: Counter[str] = Counter()
    assert expand_sources([f"@{listed}"], skipped=skipped) == expected
    assert skipped == {".txt": 1, ".md": 1}  # in the listed folder and prefix
    # a list on S3 too; with a plain argument beside it
    st.write(join(s3_bucket, "lists/all.txt"), f"{join(s3_bucket, 'raw/c.mp4')}\n".encode())
    assert expand_sources([f"@{join(s3_bucket, 'lists/all.txt')}", str(videos / "a.mp4")]) == [
        str(videos / "a.mp4"),
        join(s3_bucket, "raw/c.mp4"),
    ]
    # @- reads the list from standard input (find ... | reelpack build @- ...)
    stdin = io.TextIOWrapper(io.BytesIO(f"{videos / 'a.mp4'}\n# done\n".encode()))
    monkeypatch.setattr(sys, "stdin", stdin)
    assert expand_sources(["@-"]) == [str(videos / "a.mp4")]
    with pytest.raises(FileNotFoundError, match=r"nolist\.txt"):
        expand_sources([f"@{tmp_path / 'nolist.txt'}"])
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match=r"source list .*bin\.txt: not UTF-8"):
        expand_sources([f"@{tmp_path / 'bin.txt'}"])


def test_a_listing_longer_than_one_page_lists_every_object(s3_bucket: str) -> None:
    """S3 answers a listing 1000 keys at a time: every page is followed."""
    from concurrent.futures import ThreadPoolExecutor

    st = S3Storage()
    keys = [join(s3_bucket, "many", f"{i:05d}.mp4") for i in range(1003)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: st.write(key, b"v"), keys))
    assert st.list(join(s3_bucket, "many")) == keys


def test_keys_with_characters_urls_treat_specially_are_read_as_they_are(
    tmp_path, s3_bucket: str
) -> None:
    """An object key is a plain string: spaces, non-ASCII, '#', '?', '+' and '%20' in a
    source's key reach probe and split unchanged (no URL parsing or escaping)."""
    import numpy as np

    from pipeline.sources import expand_sources
    from pipeline.stages.base import batch_to_rows
    from pipeline.stages.probe import Probe
    from pipeline.stages.split import Split, SplitConfig
    from pipeline.synth import synth_video

    video = tmp_path / "v.mp4"
    synth_video(str(video), width=96, height=64, fps=12.0, shots=[12, 12], seed=1)
    names = ["東京 clip.mp4", "take#1.mp4", "why?.mp4", "a+b%20c.mp4"]
    st = S3Storage()
    for name in names:
        st.write(join(s3_bucket, "v", name), video.read_bytes())
    sources = expand_sources([join(s3_bucket, "v")])
    assert sources == sorted(join(s3_bucket, "v", name) for name in names)
    probed = Probe()({"source": np.array(sources, dtype=object)})
    rows = batch_to_rows(Split(SplitConfig(min_clip_s=0.5))(probed))
    assert [r["source"] for r in rows] == [s for s in sources for _ in range(2)]
    assert {r["src_status"] for r in rows} == {"done"} and all(r["clip_id"] for r in rows)


@pytest.mark.parametrize(
    ("uri", "said"),
    [
        ("gs://bucket/videos/", "gs:// is not storage reelpack reads or writes"),
        ("https://example.com/v.mp4", "https:// is not storage reelpack reads or writes"),
        ("s3a://bucket/videos/", "write it as s3://bucket/videos/"),
        ("S3://bucket/videos/", "write it as s3://bucket/videos/"),
        # a slash too few made the local folder ./s3:
        ("s3:/bucket/videos/", "a slash is missing; write it as s3://bucket/videos/"),
        ("gs:/bucket/videos/", "a malformed gs:// URI"),
    ],
)
def test_a_uri_of_another_scheme_is_refused_not_taken_for_a_folder(
    tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], uri, said
) -> None:
    """``gs://bucket/corpus`` as a local path is the folder ``./gs:/bucket/corpus``: a
    build told to write there reported success while the corpus stayed on local disk.
    As --out, a source or a source list entry, another scheme is named instead."""
    import schemas
    from pipeline.sources import expand_sources
    from pipeline.stages.probe import Probe
    from reelpack.cli import main

    with pytest.raises(schemas.UnsupportedLocation, match=said):
        schemas.storage_location(uri)
    assert schemas.storage_location("file:///data/v.mp4") == "/data/v.mp4"
    assert schemas.storage_location("s3://b/k") == "s3://b/k"
    assert schemas.storage_location("rel/gs:/x") == "rel/gs:/x"  # a local path, as it is
    assert schemas.storage_location("notes:v2.mp4") == "notes:v2.mp4"
    assert schemas.storage_location("file:/data/v.mp4") == "/data/v.mp4"  # RFC 8089's short form
    monkeypatch.chdir(tmp_path)
    video = tmp_path / "v.mp4"
    video.write_bytes(b"")
    assert main(["build", str(video), "--out", f"{uri}corpus", "--preset", "tiny"]) == 2
    assert main(["build", uri, "--out", str(tmp_path / "corpus"), "--preset", "tiny"]) == 2
    err = capsys.readouterr().err
    assert err.count(said) == 2
    assert sorted(os.listdir(tmp_path)) == ["v.mp4"]  # nothing written anywhere
    listed = tmp_path / "sources.txt"
    listed.write_text(f"{uri}\nfile://{video}\n")
    assert expand_sources([f"@{listed}"]) == sorted([uri, str(video)])
    row = Probe().probe_one(uri)
    assert row["src_status"] == "error" and row["src_error"].startswith(f"{uri}: ")
    assert said in row["src_error"] and row["src_error"].count(f"{uri}: ") == 1


@pytest.mark.parametrize(
    "args",
    [
        ["inspect", "gs://b/corpus"],
        ["plan", "gs://b/videos/"],
        ["refilter", "gs://b/corpus"],
        ["report", "gs://b/corpus", "--out", "r.html"],
        ["pack-stats", "gs://b/corpus", "--budget", "64"],
        ["train", "gs://b/corpus", "--out", "run"],
        ["train", ".", "--out", "gs://b/run"],
    ],
)
def test_every_command_names_a_location_of_another_scheme(
    args: list[str], tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A ``gs://`` root or output is a usage error (exit 2) that says what is read and
    written, not a crash report with the exception's type."""
    from reelpack.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "gs:// is not storage reelpack reads or writes" in err
    assert "UnsupportedLocation" not in err
    assert os.listdir(tmp_path) == []


def test_the_trainer_refuses_an_out_it_would_write_as_a_local_folder(tmp_path) -> None:
    from model.train import TrainConfig, train

    with pytest.raises(ValueError, match="the trainer writes its checkpoints to a folder"):
        train(str(tmp_path), "s3://bucket/run", TrainConfig())
    with pytest.raises(ValueError, match="gs:// is not storage reelpack reads or writes"):
        train(str(tmp_path), "gs://bucket/run", TrainConfig())
