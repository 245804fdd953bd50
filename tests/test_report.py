"""``reelpack report``: the HTML page of a real (tiny) corpus, checked in headless Chromium.

The corpus is built once by the real graph (local Ray, tiny preset) from generated
videos, one of them with a near-black shot so that some clips are rejected. The page
must be self-contained (no script, no external resource), carry every section, draw
each decide threshold on its score plot, and its gallery thumbnails (decoded from
the shards with the corpus's VAE) must decode as images — in Python and in Chromium.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pytest
import torch

import schemas
from pipeline.report import bar_svg, histogram_svg, render_report, write_report
from pipeline.writer import read_index
from reelpack.cli import main

SECTIONS = (
    "summary",
    "durations",
    "aspect",
    "resolutions",
    "scores",
    "decisions",
    "tokens",
    "gallery",
)
_CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--mute-audio",
)


# --- plots, no corpus needed ------------------------------------------------------------------


def test_histogram_svg_marks_thresholds_and_missing() -> None:
    svg = histogram_svg([0.1, 0.2, float("nan"), 0.9], "score_x", "x", thresholds=(0.15, None, 0.8))
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert svg.count('class="thr"') == 2
    assert "(1 not computed)" in svg
    assert svg.count("<rect") == 3  # three finite values in three different bins
    assert "no values" in histogram_svg([float("nan")], "t", "x")
    log = histogram_svg([1.0, 10.0, 1000.0], "t", "x", log_x=True)
    assert "(log10)" in log and "1e+03" in log


def test_bar_svg_sorts_and_escapes() -> None:
    svg = bar_svg({"a<b": 1, "kept": 5, "rejected": 3}, "status")
    assert svg.index(">kept<") < svg.index(">rejected<") < svg.index("a&lt;b")
    assert "none" in bar_svg({}, "empty")


# --- a real corpus ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from pipeline.config import load_config
    from pipeline.graph import build
    from pipeline.synth import synth_video

    root = tmp_path_factory.mktemp("report")
    videos = root / "videos"
    videos.mkdir()
    synth_video(str(videos / "wide.mp4"), width=192, height=108, fps=12.0, shots=[30, 30], seed=0)
    synth_video(
        str(videos / "tall.mp4"),
        width=90,
        height=160,
        fps=12.0,
        shots=[30, 30],
        seed=1,
        dark_shots=(1,),
    )
    cfg = load_config(
        preset="tiny",
        model_cache=str(root / "models"),
        split={"min_clip_s": 1.0, "max_clip_s": 3.0},
        ray={"num_cpus": 2},
    )
    with pytest.MonkeyPatch.context() as mp:
        # a fresh local Ray even if another cluster on this machine left its address file
        mp.setenv("RAY_ADDRESS", "local")
        build([str(videos)], str(root / "corpus"), cfg, echo=lambda _: None)
    yield str(root / "corpus")


def _manifest(root: str) -> dict:
    return json.loads((Path(root) / schemas.MANIFEST_NAME).read_text())


def _images(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', page)


@pytest.mark.slow
def test_report_sections_and_self_contained(corpus: str) -> None:
    page = render_report(corpus, samples=4)
    for sid in SECTIONS:
        assert f'<section id="{sid}">' in page, sid
    # nothing to fetch: no scripts, stylesheets, frames or remote URLs
    assert "<script" not in page.lower() and "<link" not in page.lower() and "<iframe" not in page
    urls = set(re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)""", page))
    assert all(u.startswith("data:image/png;base64,") for u in urls), urls
    assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", page)

    index = read_index(corpus).to_pylist()
    status = [r["status"] for r in index]
    assert "kept" in status and "rejected" in status, status
    summary = page.split('<section id="summary">')[1].split("</section>")[0]
    assert (
        f"{status.count('kept')} / {status.count('rejected')} / {status.count('error')}" in summary
    )
    assert "random-weight" in summary  # the tiny preset's manifest says so
    text = _manifest(corpus)["text_encoder"]  # what made the caption embeddings
    assert html.escape(f"{text['class']} {text['id']}, {text['dim']}-d") in summary

    # every score column has a plot, with one line per configured bound
    thresholds = _manifest(corpus)["config"]["decide"]["thresholds"]
    scores = page.split('<section id="scores">')[1].split("</section>")[0]
    bounds = sum(b is not None for _, pair in thresholds for b in pair)
    assert scores.count('class="thr"') == bounds > 0
    for name in schemas.SCORE_NAMES:
        assert schemas.score_column(name) in scores
    decisions = page.split('<section id="decisions">')[1].split("</section>")[0]
    for r in index:
        for reason in r["reasons"] or []:
            assert html.escape(reason) in decisions


@pytest.mark.slow
def test_gallery_thumbnails_decode(corpus: str) -> None:
    page = render_report(corpus, samples=4)
    kept = [r for r in read_index(corpus).to_pylist() if r["status"] == "kept"]
    gallery = page.split('<section id="gallery">')[1]
    assert gallery.count('class="card"') == min(4, len(kept))
    images = _images(gallery)
    assert len(images) >= 2 * min(4, len(kept))  # a few frames per clip
    for uri in images:
        raw = np.frombuffer(base64.b64decode(uri.split(",", 1)[1]), np.uint8)
        img = cv2.imdecode(raw, cv2.IMREAD_COLOR)
        assert img is not None and img.shape[0] > 0 and img.shape[1] > 0
    for r in kept[:1]:
        assert (r["caption"] or "no caption") in page or r["caption"] is None


@pytest.mark.slow
def test_gallery_placeholder_without_vae(corpus: str, tmp_path: Path) -> None:
    page = render_report(corpus, samples=3, vae_path=str(tmp_path / "no-vae-here"))
    gallery = page.split('<section id="gallery">')[1]
    assert not _images(gallery)
    assert "the corpus VAE could not be loaded" in gallery
    assert gallery.count('class="ph"') == gallery.count('class="card"') > 0


@pytest.mark.slow
def test_cli(
    corpus: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "r.html"
    assert main(["report", corpus, "--out", str(out), "--samples", "2"]) == 0
    assert '<section id="gallery">' in out.read_text()
    assert main(["report", str(tmp_path / "not-a-corpus"), "--out", str(out)]) == 2
    assert f"{tmp_path / 'not-a-corpus'}: no such folder" in capsys.readouterr().err
    assert main(["report", str(out), "--out", str(tmp_path / "r2.html")]) == 2
    assert f"{out}: a file, not a corpus" in capsys.readouterr().err
    # --out a folder: named as given, no hidden temporary name, nothing left beside it
    folder = tmp_path / "pages"
    folder.mkdir()
    assert main(["report", corpus, "--out", str(folder)]) == 2
    err = capsys.readouterr().err
    assert f"reelpack report: {folder} is a folder; name the HTML file to write" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pages", "r.html"]
    # --out under a file, a --vae that is no folder: named before any work
    assert main(["report", corpus, "--out", str(out / "x.html")]) == 2
    assert f"cannot write {out / 'x.html'}: {out} is a file, not a folder" in (
        capsys.readouterr().err
    )
    assert main(["report", corpus, "--out", str(out), "--vae", str(tmp_path / "none")]) == 2
    assert f"--vae {tmp_path / 'none'}: no such folder" in capsys.readouterr().err
    assert main(["report", corpus, "--out", str(out), "--samples", "-1"]) == 2
    assert "sample count must be >= 0, got -1" in capsys.readouterr().err
    # the thumbnails' device: one torch cannot use is named before any work
    before = out.read_bytes()
    assert main(["report", corpus, "--out", str(out), "--device", "gpu"]) == 2
    assert "device 'gpu': not a torch device; use auto, cpu" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["report", corpus, "--out", str(out), "--device", "cuda:0"]) == 2
        assert "device 'cuda:0': torch sees 0 CUDA device(s)" in capsys.readouterr().err
    assert out.read_bytes() == before
    out.unlink()
    assert main(["report", corpus, "--out", str(out), "--samples", "1", "--device", "cpu"]) == 0
    assert _images(out.read_text().split('<section id="gallery">')[1])


def test_the_report_is_written_beside_an_s3_corpus(corpus: str, s3_bucket: str) -> None:
    from pipeline.storage import storage_for

    uri = f"{s3_bucket}/reports/corpus.html"
    assert write_report(corpus, uri, samples=2) == uri
    page = storage_for(uri).read(uri).decode("utf-8")
    assert page.startswith("<!DOCTYPE html>") and '<section id="gallery">' in page


# --- in a real browser -------------------------------------------------------------------------

# Appended to a *copy* of the page: records script errors and, after load, whether every
# image decoded and every plot laid out, as attributes that --dump-dom shows.
_PROBE = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message)));
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0 && i.naturalHeight > 0);
  const svgs = [...document.querySelectorAll('svg.plot')];
  const drawn = svgs.filter(s => s.getBoundingClientRect().width > 0);
  const b = document.body;
  b.setAttribute('data-images', ok.length + '/' + imgs.length);
  b.setAttribute('data-plots', drawn.length + '/' + svgs.length);
  b.setAttribute('data-errors', String(window.__errors.length));
  b.setAttribute('data-probe', 'done');
});
</script>"""


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        # Fail, never skip: the report must be seen to render in a browser.
        pytest.fail(
            "`chromium` is not installed (Debian: apt-get install -y chromium)", pytrace=False
        )
    return exe


def _run_chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess[str]:
    cmd = [
        _chromium(),
        *_CHROMIUM_FLAGS,
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=5000",
        *args,
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("http_", "https_", "HTTP"))}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, check=False)


@pytest.mark.slow
def test_renders_in_headless_chromium(corpus: str, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    write_report(corpus, str(out), samples=4)
    page = out.read_text()

    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", _PROBE + "</body>"))
    dom = _run_chromium(["--dump-dom", probe.as_uri()], tmp_path / "profile1")
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", dom.stdout)
    assert body, dom.stdout[:500]
    attrs = dict(re.findall(r'data-(\w+)="([^"]*)"', body.group(1)))
    assert attrs.get("probe") == "done", attrs
    assert attrs["errors"] == "0", dom.stderr[-2000:]
    n_img = len(_images(page))
    assert n_img > 0 and attrs["images"] == f"{n_img}/{n_img}", attrs
    n_svg = page.count('class="plot"')
    assert attrs["plots"] == f"{n_svg}/{n_svg}", attrs
    for sid in SECTIONS:
        assert f'id="{sid}"' in dom.stdout
    assert "Uncaught" not in dom.stderr

    # The page itself, as a user sees it: a screenshot that is not blank.
    shot = tmp_path / "shot.png"
    res = _run_chromium(
        ["--window-size=1200,2400", f"--screenshot={shot}", out.as_uri()], tmp_path / "profile2"
    )
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    img = cv2.imread(str(shot), cv2.IMREAD_COLOR)
    assert img is not None and img.shape[:2] == (2400, 1200)
    assert img.std() > 10  # text, bars and thumbnails, not a blank page
    assert "ERROR:CONSOLE" not in res.stderr and "Uncaught" not in res.stderr


def test_summary_names_the_sources_split_treated_specially() -> None:
    from pipeline.report import _source_kinds

    sources = pa.table(
        {
            "interlaced": [True, False, None],
            "pulldown": [True, False, None],
            "color_transfer": ["arib-std-b67", "bt2020-10", None],
            "color_primaries": ["bt2020", "bt2020", None],
            "vfr": [False, False, True],
        }
    )
    index = pa.table({"crop": pa.array([[0, 14, 192, 80], None], pa.list_(pa.int32()))})
    assert _source_kinds(sources, index) == (
        "1 interlaced sources (deinterlaced), 1 of them film (fields matched), "
        "1 HDR sources (tone-mapped), 1 BT.2020 SDR sources (colours to BT.709), "
        "1 variable frame rate sources, 1 clips cropped (black bars)"
    )
    # a corpus written before these columns existed
    assert (
        _source_kinds(pa.table({"source": ["a"]}), pa.table({"clip_id": ["c"]})) == "none special"
    )


def test_stills_are_counted_not_plotted_as_one_second_clips() -> None:
    from pipeline.report import _distributions

    clips = [
        {"start_s": 0.0, "end_s": 2.0, "start_frame": 0, "end_frame": 48, "status": "kept"},
        {"start_s": 2.0, "end_s": 5.0, "start_frame": 48, "end_frame": 120, "status": "kept"},
        {"start_s": 0.0, "end_s": 1.0, "start_frame": 0, "end_frame": 1, "status": "kept"},
    ]
    index = pa.Table.from_pylist(clips, schema=schemas.CLIP_SCHEMA)
    sources = pa.Table.from_pylist(
        [{"duration_s": 5.0, "media_kind": "video"}, {"duration_s": 1.0, "media_kind": "image"}],
        schema=schemas.SOURCE_SCHEMA,
    )
    durations = _distributions(index, sources)["durations"]
    assert "clip duration (1 still clip not shown)" in durations
    assert "source duration (1 image not shown)" in durations
    # the clip axis runs from the shortest video clip to the longest: 2 to 3 s
    clip_plot = durations.split("source duration")[0]
    assert 'text-anchor="start" class="l">2</text>' in clip_plot
    assert 'text-anchor="end" class="l">3</text>' in clip_plot


def test_summary_names_the_text_encoder_or_none() -> None:
    from pipeline.report import _text_encoder

    umt5 = {"id": "google/umt5-xxl", "class": "UMT5EncoderModel", "dim": 4096}
    assert _text_encoder(umt5) == "UMT5EncoderModel google/umt5-xxl, 4096-d"
    assert _text_encoder(None) == "none (no caption embeddings)"
