"""Expand build arguments (files, folders, ``s3://`` prefixes) into source URIs."""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Callable, Collection, Iterable
from pathlib import Path

import schemas

__all__ = [
    "IMAGE_EXTENSIONS",
    "LINK_KEY",
    "VIDEO_EXTENSIONS",
    "NoSources",
    "SourceInCorpus",
    "describe_skipped",
    "expand_sources",
    "misnamed",
    "printable",
    "read_source_list",
]

VIDEO_EXTENSIONS = frozenset(
    {
        ".mp4",
        ".m4v",
        ".mov",
        ".mkv",
        ".webm",
        ".avi",
        ".ts",
        ".mts",
        ".mpg",
        ".mpeg",
        ".wmv",
        ".flv",
        ".3gp",
        ".3g2",
        ".ogv",
        ".gif",
        ".vob",  # DVD
        ".m2ts",  # Blu-ray, AVCHD
        ".m2v",
        ".mxf",  # broadcast and cinema cameras
        ".dv",
        ".f4v",
        ".asf",
        ".divx",
        ".y4m",
        ".h264",  # raw elementary streams (cameras, recorders)
        ".264",
        ".h265",
        ".hevc",
        ".m1v",
        ".mpv",
        ".ivf",  # raw VP8/VP9/AV1 (encoder and test-suite output)
        ".obu",
        ".mjpeg",  # Motion JPEG from IP and USB cameras
        ".mjpg",
        ".qt",
        ".mod",  # camcorders (MPEG-2 program streams)
        ".tod",
        ".vro",  # DVD recorders
        ".m2t",  # HDV
        ".mpe",
        ".wtv",  # Windows Media Center recordings
        ".rm",  # RealMedia
        ".rmvb",
        ".nut",
        ".mk3d",
        ".apng",  # animated PNG
    }
)
IMAGE_EXTENSIONS = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".png",
        ".webp",
        ".bmp",
        ".tif",
        ".tiff",
        ".avif",
        ".heic",
        ".heif",
        ".tga",  # renders, game captures
        ".ppm",  # Netpbm: frames dumped by tools and research code
        ".pgm",
        ".pbm",
        ".pnm",
        ".qoi",
        ".jp2",  # JPEG 2000 (archives, digital cinema frames)
        ".j2k",
    }
)
MEDIA_EXTENSIONS = VIDEO_EXTENSIONS | IMAGE_EXTENSIONS


def _is_media(name: str) -> bool:
    base = os.path.basename(name)
    return not base.startswith(".") and os.path.splitext(base)[1].lower() in MEDIA_EXTENSIONS


def printable(path: str) -> str:
    """``path`` as text the corpus tables can hold: a local file name that is not UTF-8
    (Python holds its bytes as lone surrogates) with those bytes written ``\\xff``, say.
    Probe then finds no such file and names the cause (:func:`misnamed`)."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return os.fsencode(path).decode("utf-8", "backslashreplace")


def misnamed(path: str) -> bytes | None:
    """The real path (bytes) of the file :func:`printable` wrote as ``path``, when
    ``path`` does not exist because a name in it is not UTF-8; else None."""
    if "\\x" not in path:
        return None
    real = b"/" if path.startswith("/") else b""
    for name in path.split("/"):
        if not name:
            continue
        here = os.path.join(real, name.encode("utf-8"))
        if os.path.lexists(here):
            real = here
            continue
        try:
            entries = os.listdir(real or b".")
        except OSError:
            return None
        found = [e for e in entries if e.decode("utf-8", "backslashreplace") == name]
        if not found:
            return None
        real = os.path.join(real, found[0])
    return real if printable(os.fsdecode(real)) == path and os.path.lexists(real) else None


def read_source_list(uri: str) -> list[str]:
    """The entries of a source list: a text file (local or ``s3://``; ``-``: standard
    input) of one file, folder or ``s3://`` URI per line; blank lines and lines starting
    with ``#`` are skipped."""
    from pipeline.storage import storage_for

    try:
        data = sys.stdin.buffer.read() if uri == "-" else storage_for(uri).read(uri)
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"source list {uri}: not UTF-8 text ({e.reason})") from None
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def expand_sources(
    args: Iterable[str], exclude: str | None = None, skipped: Counter[str] | None = None
) -> list[str]:
    """Each argument is a file (taken whatever its name), a folder (media files below it,
    recursively), an ``s3://`` prefix (media objects under it) or ``@LIST``: the entries
    of the source list ``LIST`` (:func:`read_source_list`; ``@-`` reads standard input). Returns sorted unique URIs:
    absolute local paths or ``s3://bucket/key``. A missing path given as an argument
    raises ``FileNotFoundError``. A local file name that is not UTF-8 is listed
    :func:`printable`, so that it ends as an error row that says so.

    A list's entries are taken as they are, with no request per entry: a folder, or an
    ``s3://`` URI ending in ``/``, is expanded; any other entry is one source, and one
    that does not exist ends as that source's error row, so a list of a million objects
    costs no million requests before the build and one missing object stops nothing.

    Folders and prefixes skip everything under ``exclude`` (the corpus root): a corpus
    built inside its own source folder does not take its clip files for new sources;
    nor are other reelpack corpora below them searched (counted under :data:`CORPUS_KEY`).
    Files in them that are not media by extension are skipped; ``skipped`` counts them
    by extension (hidden files aside), so a caller can say what was left out. A file
    listed under several local paths (links to it, as a folder of picks linking into
    the raw pile, or a Hugging Face cache's snapshots, hold) is one source: its own
    path where that is listed, else the first link; ``skipped`` counts the other
    links under :data:`LINK_KEY`.
    """
    from pipeline.storage import is_s3, storage_for

    counted: Counter[str] = Counter() if skipped is None else skipped
    media = _media_filter(exclude, counted)
    out: set[str] = set()
    for arg in args:
        if not arg.startswith("@"):
            arg = schemas.storage_location(arg)  # a file:// URI as its path; gs:// raises
        if arg.startswith("@"):
            out.update(_listed(arg[1:], media, counted, exclude))
        elif is_s3(arg):
            st = storage_for(arg)
            if st.exists(arg) and not arg.endswith("/"):
                out.add(arg)
                continue
            prefix = arg if arg.endswith("/") else arg + "/"
            _check_outside(arg, prefix, exclude)
            out.update(
                uri for uri in _listing(prefix, st.list(prefix), counted, exclude) if media(uri)
            )
        else:
            path = Path(arg).expanduser().resolve()
            if path.is_dir():
                _check_outside(arg, str(path), exclude)
                out.update(p for p in _walk(path, counted, exclude) if media(p))
            elif path.exists():  # a file, or anything else probe then names as its error
                out.add(str(path))
            elif Path(arg).expanduser().is_symlink():
                raise FileNotFoundError(f"source {arg!r} is a broken link (to {path})")
            else:
                raise FileNotFoundError(f"source {arg!r} does not exist")
    links = _other_links(out)
    if links and skipped is not None:
        skipped[LINK_KEY] += len(links)
    return sorted(printable(uri) for uri in out - links)


class SourceInCorpus(ValueError):
    """A source folder or prefix at or below the corpus root being built: every file in
    it would be the corpus's own, so none would be a source."""


def _check_outside(arg: str, folder: str, root: str | None) -> None:
    """:class:`SourceInCorpus` when the source folder or prefix ``folder`` (given as
    ``arg``) is at or below the corpus root ``root``."""
    if root and _under(root)(folder.rstrip("/") + "/"):
        raise SourceInCorpus(
            f"source {arg!r} is at or inside the corpus root --out {root}: its files "
            "would be the corpus's own; write the corpus outside its source folders"
        )


# the key under which expand_sources counts links to files it lists already
LINK_KEY = "(link to a listed file)"


def _other_links(paths: set[str]) -> set[str]:
    """The local ``paths`` that are links to a file listed under another of them: all
    links to a file whose own path is listed, and all but the first link to any other
    file. Broken links are kept (probe names each as one)."""
    by_file: dict[str, list[str]] = {}
    for path in paths:
        if not path.startswith("s3://") and os.path.islink(path) and os.path.exists(path):
            by_file.setdefault(os.path.realpath(path), []).append(path)
    return {
        link
        for real, found in by_file.items()
        for link in (found if real in paths else sorted(found)[1:])
    }


def _listed(
    listed: str, media: Callable[[str], bool], skipped: Counter[str], own: str | None
) -> set[str]:
    """The sources of the source list ``listed`` (see :func:`expand_sources`)."""
    from pipeline.storage import is_s3, storage_for

    # relative paths in a local list are relative to the list's folder
    base = Path.cwd() if is_s3(listed) or listed == "-" else Path(listed).expanduser().parent
    out: set[str] = set()
    for entry in read_source_list(listed):
        try:
            entry = schemas.storage_location(entry)
        except schemas.UnsupportedLocation:
            out.add(entry)  # probe makes it an error row that says so
            continue
        if is_s3(entry):
            if entry.endswith("/"):
                found = _listing(entry, storage_for(entry).list(entry), skipped, own)
                out.update(uri for uri in found if media(uri))
            else:
                out.add(entry)
            continue
        path = (base / Path(entry).expanduser()).resolve()
        if path.is_dir():
            out.update(p for p in _walk(path, skipped, own) if media(p))
        else:
            out.add(str(path))
    return out


def _media_filter(exclude: str | None, skipped: Counter[str]) -> Callable[[str], bool]:
    """Whether a file found in a folder or prefix is a source: a media file by extension,
    not under ``exclude``. Other files are counted in ``skipped`` by extension (hidden
    files aside)."""
    under_root = _under(exclude)

    def media(uri: str) -> bool:
        if under_root(uri):
            return False
        if _is_media(uri):
            return True
        name = os.path.basename(uri.rstrip("/"))
        if name and not name.startswith("."):
            skipped[os.path.splitext(name)[1].lower() or "(no extension)"] += 1
        return False

    return media


def _walk(root: Path, skipped: Counter[str], own: str | None = None) -> Iterable[str]:
    """Paths of the files below ``root``, following links to folders (a pile of videos
    is often linked together from several disks), each real folder once, so a link
    back up the tree does not loop. Broken links and entries that are not regular files
    (named pipes, sockets) are listed too: probe makes each an error row that says what
    it is (a link into a disk that is not mounted must not vanish from the build).

    A reelpack corpus below ``root`` is not walked: its clip files (``write.clip_files``)
    are cuts of sources, not sources; ``skipped`` counts such corpora under
    :data:`CORPUS_KEY`, except ``own`` (the corpus being built, which the caller leaves
    out). Given as ``root`` itself, a corpus is walked."""
    own_real = os.path.realpath(os.path.expanduser(own)) if own and "://" not in own else None
    seen: set[str] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs.clear()
            continue
        seen.add(real)
        if folder != str(root) and _is_corpus(files, dirs):
            dirs.clear()
            if real != own_real:
                skipped[CORPUS_KEY] += 1
            continue
        dirs.sort()
        for name in files:
            yield os.path.join(folder, name)


def _listing(
    prefix: str, uris: list[str], skipped: Counter[str], own: str | None = None
) -> list[str]:
    """``uris``, the recursive listing of the prefix ``prefix``, less what :func:`_walk`
    leaves out of a folder: a reelpack corpus below ``prefix`` (found in the listing
    itself, so it costs no request), counted in ``skipped`` unless it is ``own``."""
    base = prefix.rstrip("/") + "/"
    manifest = "/" + schemas.MANIFEST_NAME
    # the folders holding a manifest (few), and the subfolders of each
    candidates = {uri[: -len(manifest)] + "/" for uri in uris if uri.endswith(manifest)}
    candidates.discard(base)
    if not candidates:
        return uris
    dirs: dict[str, set[str]] = {folder: set() for folder in candidates}
    for uri in uris:
        for folder in _folders(base, uri):
            rest = uri[len(folder) :]
            if folder in dirs and "/" in rest:  # below a subfolder, not a file beside it
                dirs[folder].add(rest.split("/", 1)[0])
    corpora = {folder for folder in candidates if _is_corpus([schemas.MANIFEST_NAME], dirs[folder])}
    if not corpora:
        return uris
    own_root = own.rstrip("/") + "/" if own else None
    kept, skipped_roots = [], set()
    for uri in uris:
        root = next((r for r in _folders(base, uri) if r in corpora), None)
        if root is None:
            kept.append(uri)
        elif root != own_root:
            skipped_roots.add(root)
    skipped[CORPUS_KEY] += len(skipped_roots)
    return kept


def _folders(base: str, uri: str) -> Iterable[str]:
    """The folders between ``base`` (left out) and ``uri``, outermost first."""
    folder = base
    for part in uri[len(base) :].split("/")[:-1]:
        folder += part + "/"
        yield folder


# the key under which expand_sources counts reelpack corpora found in source folders
CORPUS_KEY = "(a reelpack corpus)"


def _is_corpus(files: Collection[str], dirs: Collection[str]) -> bool:
    """Whether a folder with these entries is a reelpack corpus root."""
    return schemas.MANIFEST_NAME in files and {schemas.INDEX_DIR, schemas.SOURCES_DIR} <= set(dirs)


def _under(root: str | None) -> Callable[[str], bool]:
    """Whether a listed URI lies under ``root`` (never, without one)."""
    from pipeline.storage import is_s3

    if not root:
        return lambda uri: False
    root = schemas.storage_location(root)  # a file:// URI as its path
    base = root if is_s3(root) else str(Path(root).expanduser().resolve())
    base = base.rstrip("/") + "/"
    return lambda uri: uri.startswith(base)


class NoSources(FileNotFoundError):
    """The arguments of a build or plan hold no video or image source: an empty folder,
    prefix or list, or one holding only other files (which the message counts)."""

    def __init__(self, args: Iterable[str], skipped: Counter[str]) -> None:
        where = ", ".join(repr(a) for a in args)
        note = describe_skipped(skipped)
        super().__init__(
            f"no video or image sources found in {where}" + (f"; {note}" if note else "")
        )


def describe_skipped(skipped: Counter[str]) -> str | None:
    """A note on the files :func:`expand_sources` left out, or None when there were none:
    ``skipped 302 files that are not video or image by extension (.json 300, .txt 2)``."""
    links, corpora = skipped.get(LINK_KEY, 0), skipped.get(CORPUS_KEY, 0)
    other = {ext: n for ext, n in skipped.items() if ext not in (LINK_KEY, CORPUS_KEY) and n}
    total = sum(other.values())
    notes = []
    if total:
        common = sorted(other.items(), key=lambda kv: (-kv[1], kv[0]))[:8]
        kinds = ", ".join(f"{ext} {n}" for ext, n in common)
        more = f", {len(other) - len(common)} other kinds" if len(other) > len(common) else ""
        files = "file that is" if total == 1 else "files that are"
        notes.append(f"skipped {total} {files} not video or image by extension ({kinds}{more})")
    if links:
        names = "link" if links == 1 else "links"
        notes.append(f"skipped {links} {names} to files listed under another path (built once)")
    if corpora:
        names = "corpus" if corpora == 1 else "corpora"
        notes.append(f"skipped {corpora} reelpack {names} inside the source folders")
    return "; ".join(notes) or None
