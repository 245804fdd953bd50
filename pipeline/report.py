"""A corpus as one self-contained HTML page: distributions, decisions and a gallery.

``reelpack report ROOT --out report.html`` reads a corpus (local folder or
``s3://``) through :func:`pipeline.writer.read_committed` (the live index rows, only
the columns it plots, and the sources) and its manifest, and writes one HTML file
that needs nothing else: plots are inline SVG drawn here (no plotting library, no
script, no external stylesheet, no network), thumbnails are inline base64 PNG.

Sections (each a ``<section id=...>``): ``summary`` (counts from the manifest and the
tables), ``durations`` (clip and source lengths), ``aspect`` (clip aspect ratios),
``resolutions`` (source display sizes, and the sizes the VAE saw), ``scores`` (one
histogram per ``score_*`` column with the decide thresholds of the manifest's
resolved config drawn on it), ``decisions`` (clips by status, rejected clips by
reason), ``tokens`` (latent tokens per kept clip) and ``gallery``.

Gallery thumbnails are decoded from the shards' latents with the corpus's own VAE
(:meth:`model.vae.VideoVAE.from_manifest`), a few frames per clip; when the VAE
cannot be loaded the gallery shows a placeholder saying why, with the captions.

    python -m reelpack.cli report /data/corpus --out /tmp/report.html
"""

from __future__ import annotations

import base64
import html
import math
import tarfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

import schemas
from pipeline.hdr import HDR_TRANSFER_NAMES
from pipeline.storage import is_s3, join, storage_for
from pipeline.writer import read_committed, require_manifest

__all__ = [
    "GalleryItem",
    "bar_svg",
    "decode_thumbnails",
    "histogram_svg",
    "load_gallery",
    "render_report",
    "write_report",
]

_W, _H = 420, 220  # plot size in px
_PAD_L, _PAD_R, _PAD_T, _PAD_B = 48, 12, 24, 40
_BAR = "#4c78a8"
_THRESH = "#d62728"
# signals spanning orders of magnitude are plotted on a log axis
_LOG_SCORES = frozenset({"sharpness"})


# --- SVG plots ---------------------------------------------------------------------------------


def _fmt(x: float) -> str:
    if x == 0 or not math.isfinite(x):
        return str(x)
    if abs(x) >= 1e4 or abs(x) < 1e-2:
        return f"{x:.2g}"
    return f"{x:.3g}"


def _svg(body: list[str], title: str) -> str:
    label = html.escape(title)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" width="{_W}" height="{_H}" '
        f'viewBox="0 0 {_W} {_H}" role="img" aria-label="{label}">'
        f'<text x="{_W / 2}" y="15" text-anchor="middle" class="t">{label}</text>'
        + "".join(body)
        + "</svg>"
    )


def _empty_svg(title: str, why: str) -> str:
    return _svg(
        [
            f'<text x="{_W / 2}" y="{_H / 2}" text-anchor="middle" class="n">{html.escape(why)}</text>'
        ],
        title,
    )


def _axes(ymax: float, xlabel: str) -> list[str]:
    x0, y0, x1, y1 = _PAD_L, _H - _PAD_B, _W - _PAD_R, _PAD_T
    out = [
        f'<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}" class="a"/>',
        f'<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}" class="a"/>',
        f'<text x="{x0 - 4}" y="{y1 + 4}" text-anchor="end" class="l">{_fmt(ymax)}</text>',
        f'<text x="{x0 - 4}" y="{y0}" text-anchor="end" class="l">0</text>',
        f'<text x="{(x0 + x1) / 2}" y="{_H - 4}" text-anchor="middle" class="l">'
        f"{html.escape(xlabel)}</text>",
    ]
    return out


def histogram_svg(
    values: Sequence[float],
    title: str,
    xlabel: str,
    *,
    bins: int = 20,
    thresholds: Sequence[float | None] = (),
    log_x: bool = False,
) -> str:
    """An inline SVG histogram of the finite ``values``, with vertical lines at
    ``thresholds`` (None entries skipped); non-finite values are counted in the title."""
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    missing = int(arr.size - finite.size) + sum(v is None for v in values)
    if missing:
        title = f"{title} ({missing} not computed)"
    if finite.size == 0:
        return _empty_svg(title, "no values")
    marks = [float(t) for t in thresholds if t is not None and math.isfinite(t)]
    data = np.log10(np.maximum(finite, 1e-12)) if log_x else finite
    mark_pos = [math.log10(max(t, 1e-12)) if log_x else t for t in marks]
    lo, hi = min([float(data.min()), *mark_pos]), max([float(data.max()), *mark_pos])
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    counts, edges = np.histogram(data, bins=bins, range=(lo, hi))
    ymax = max(1, int(counts.max()))
    x0, y0 = _PAD_L, _H - _PAD_B
    pw, ph = _W - _PAD_L - _PAD_R, _H - _PAD_B - _PAD_T

    def px(v: float) -> float:
        return x0 + (v - lo) / (hi - lo) * pw

    body = _axes(ymax, xlabel + (" (log10)" if log_x else ""))
    for c, a, b in zip(counts, edges[:-1], edges[1:], strict=True):
        if c:
            h = c / ymax * ph
            body.append(
                f'<rect x="{px(a):.1f}" y="{y0 - h:.1f}" width="{max(px(b) - px(a) - 1, 1):.1f}" '
                f'height="{h:.1f}" fill="{_BAR}"><title>{_fmt(a)}..{_fmt(b)}: {c}</title></rect>'
            )
    for v, anchor in ((lo, "start"), (hi, "end")):
        shown = 10**v if log_x else v
        body.append(
            f'<text x="{px(v):.1f}" y="{y0 + 14}" text-anchor="{anchor}" class="l">{_fmt(shown)}</text>'
        )
    for t, pos in zip(marks, mark_pos, strict=True):
        body.append(
            f'<line x1="{px(pos):.1f}" y1="{y0}" x2="{px(pos):.1f}" y2="{_PAD_T}" '
            f'stroke="{_THRESH}" stroke-width="2" stroke-dasharray="4 3" class="thr">'
            f"<title>threshold {_fmt(t)}</title></line>"
        )
    return _svg(body, title)


def bar_svg(counts: Mapping[str, int], title: str, *, top: int = 12) -> str:
    """An inline SVG horizontal bar chart of the ``top`` largest ``counts``."""
    items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    if not items:
        return _empty_svg(title, "none")
    rows = len(items)
    height = max(_H, _PAD_T + 18 * rows + 10)
    label_w = 150
    vmax = max(v for _, v in items) or 1
    body = []
    for i, (name, value) in enumerate(items):
        y = _PAD_T + 4 + i * 18
        w = value / vmax * (_W - label_w - 50)
        body.append(
            f'<text x="{label_w - 4}" y="{y + 11}" text-anchor="end" class="l">'
            f"{html.escape(name[:26])}</text>"
            f'<rect x="{label_w}" y="{y}" width="{max(w, 1):.1f}" height="14" fill="{_BAR}">'
            f"<title>{html.escape(name)}: {value}</title></rect>"
            f'<text x="{label_w + w + 4:.1f}" y="{y + 11}" class="l">{value}</text>'
        )
    svg = _svg(body, title)
    return svg.replace(
        f'height="{_H}" viewBox="0 0 {_W} {_H}"',
        f'height="{height}" viewBox="0 0 {_W} {height}"',
        1,
    )


# --- gallery -------------------------------------------------------------------------------------


@dataclass
class GalleryItem:
    clip_id: str
    source: str
    caption: str
    latent_shape: list[int]
    thumbnails: list[str]  # data: URIs of PNG frames (empty when not decodable)
    note: str = ""  # why there is no thumbnail


def _png_data_uri(frame: np.ndarray) -> str:
    import cv2

    ok, buf = cv2.imencode(".png", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("PNG encoding failed")
    return "data:image/png;base64," + base64.b64encode(buf.tobytes()).decode("ascii")


def decode_thumbnails(vae: Any, latents: Any, frames: int = 3, max_side: int = 160) -> list[str]:
    """Decode a latent ``[C, T, H, W]`` with ``vae`` (:class:`model.vae.VideoVAE`) and
    return ``frames`` evenly spaced frames as PNG data URIs (longest side <= max_side)."""
    import cv2

    video = vae.decode(latents.float()[None])[0].cpu()  # (3, T, H, W) in [-1, 1]
    pixels = ((video.permute(1, 2, 3, 0).numpy() + 1.0) * 127.5).round().clip(0, 255)
    pixels = pixels.astype(np.uint8)  # (T, H, W, 3)
    t, h, w, _ = pixels.shape
    scale = min(1.0, max_side / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    picks = sorted({round(i * (t - 1) / max(frames - 1, 1)) for i in range(frames)})
    return [_png_data_uri(cv2.resize(pixels[i], size, interpolation=cv2.INTER_AREA)) for i in picks]


# what the gallery reads of a kept row
_GALLERY_COLUMNS = ["clip_id", "source", "start_s", "caption", "latent_shape", "shard", "key"]
# what the page reads of the index: every column but the per-clip vectors (a million
# ViT-L/14 embeddings alone are 3 GB)
_REPORT_COLUMNS = [
    name
    for name in schemas.CLIP_SCHEMA.names
    if name not in ("clip_embedding", "encode_frame_indices", "extra_latents")
]


def _pick_samples(index: pa.Table, n: int) -> list[dict[str, Any]]:
    stored = pc.and_(pc.not_equal(index["shard"], ""), pc.not_equal(index["key"], ""))
    kept_rows = index.filter(pc.and_(pc.equal(index["status"], "kept"), stored))
    kept = kept_rows.select(_GALLERY_COLUMNS).to_pylist()  # the kept rows alone, as dicts
    kept.sort(key=lambda r: (r["source"], r["start_s"] or 0.0, r["clip_id"]))
    if len(kept) <= n:
        return kept
    return [kept[round(i * (len(kept) - 1) / max(n - 1, 1))] for i in range(n)]


def _read_latents(root: str, rows: list[dict[str, Any]]) -> dict[str, bytes]:
    """``{key: safetensors bytes}`` of ``rows``, reading each shard once (headers only
    up to the wanted members: shards are seekable tars)."""
    st = storage_for(root)
    by_shard: dict[str, set[str]] = {}
    for r in rows:
        by_shard.setdefault(r["shard"], set()).add(f"{r['key']}.{schemas.SAMPLE_LATENTS}")
    out: dict[str, bytes] = {}
    for shard, wanted in by_shard.items():
        with st.open(join(root, shard)) as fh, tarfile.open(fileobj=fh, mode="r:") as tar:
            for member in tar:
                if member.name in wanted:
                    data = tar.extractfile(member)
                    if data is not None:
                        out[member.name.split(".", 1)[0]] = data.read()
                    wanted.discard(member.name)
                    if not wanted:
                        break
    return out


def load_gallery(
    root: str,
    manifest: Mapping[str, Any],
    index: pa.Table,
    *,
    samples: int = 6,
    vae_path: str | None = None,
    device: str = "auto",
) -> tuple[list[GalleryItem], str]:
    """Gallery items for up to ``samples`` kept clips, and a note for the whole gallery
    (empty when thumbnails decoded). Thumbnails need the corpus's VAE, run on ``device``
    (``auto``: a GPU when torch sees one, in bfloat16); without it each item carries the
    reason instead."""
    rows = _pick_samples(index, samples)
    items = [
        GalleryItem(
            clip_id=r["clip_id"],
            source=r["source"],
            caption=r["caption"] or "",
            latent_shape=list(r["latent_shape"] or []),
            thumbnails=[],
        )
        for r in rows
    ]
    if not items:
        return items, "no kept clips"
    try:
        from model.device import resolve_device_dtype
        from model.vae import VideoVAE

        dev, dtype = resolve_device_dtype(device, "auto")
        vae = VideoVAE.from_manifest(dict(manifest["vae"]), vae_path, device=str(dev), dtype=dtype)
    except Exception as exc:  # any failure to load is shown, not raised
        why = f"thumbnails unavailable: the corpus VAE could not be loaded ({type(exc).__name__}: {exc})"
        for it in items:
            it.note = why
        return items, why
    from safetensors.torch import load as load_safetensors

    try:
        blobs = _read_latents(root, rows)
    except Exception as exc:
        why = f"thumbnails unavailable: shards could not be read ({type(exc).__name__}: {exc})"
        for it in items:
            it.note = why
        return items, why
    for it, r in zip(items, rows, strict=True):
        try:
            latents = load_safetensors(blobs[r["key"]])[schemas.TENSOR_LATENTS]
            it.thumbnails = decode_thumbnails(vae, latents)
        except Exception as exc:  # one bad sample shows its reason alone
            it.note = f"thumbnail unavailable: {type(exc).__name__}: {exc}"
    return items, ""


# --- the page ------------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fff}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
.plots{display:flex;flex-wrap:wrap;gap:12px}
svg.plot{border:1px solid #eee;background:#fcfcfc}
svg .t{font-size:13px;font-weight:600}svg .l{font-size:10px;fill:#444}
svg .n{font-size:12px;fill:#888}svg .a{stroke:#888;stroke-width:1}
table.kv td{padding:2px 12px 2px 0}
.note{background:#fff4e5;border:1px solid #f0c36d;padding:6px 10px;margin:8px 0}
.gallery{display:flex;flex-wrap:wrap;gap:14px}
.card{width:340px;border:1px solid #ddd;padding:8px;border-radius:4px}
.card img{margin-right:4px;image-rendering:auto;vertical-align:top}
.ph{display:flex;align-items:center;justify-content:center;height:90px;background:#eee;
color:#666;font-size:12px;text-align:center;padding:4px}
.cap{margin:6px 0 2px}.meta{font-size:11px;color:#666;word-break:break-all}
"""


def _section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{html.escape(title)}</h2>{body}</section>'


def _plots(svgs: Sequence[str]) -> str:
    return '<div class="plots">' + "".join(svgs) + "</div>"


def _thresholds(manifest: Mapping[str, Any]) -> dict[str, tuple[float | None, float | None]]:
    raw = ((manifest.get("config") or {}).get("decide") or {}).get("thresholds") or []
    pairs = raw.items() if isinstance(raw, Mapping) else raw
    return {str(name): (bounds[0], bounds[1]) for name, bounds in pairs}


def _source_kinds(sources: pa.Table, index: pa.Table) -> str:
    """Sources and clips that split treated specially (columns a corpus may predate)."""

    def count(table: pa.Table, name: str, test: Any) -> int:
        if name not in table.column_names:
            return 0
        return sum(1 for v in table.column(name).to_pylist() if v is not None and test(v))

    found = [
        (count(sources, "interlaced", bool), "interlaced sources (deinterlaced)"),
        (count(sources, "pulldown", bool), "of them film (fields matched)"),
        (
            count(sources, "color_transfer", HDR_TRANSFER_NAMES.__contains__),
            "HDR sources (tone-mapped)",
        ),
        (_wide_gamut_sdr(sources), "BT.2020 SDR sources (colours to BT.709)"),
        (count(sources, "vfr", bool), "variable frame rate sources"),
        (count(index, "crop", bool), "clips cropped (black bars)"),
    ]
    return ", ".join(f"{n} {what}" for n, what in found if n) or "none special"


def _text_encoder(entry: Any) -> str:
    """The manifest's text encoder as one line: what made the caption embeddings."""
    if not isinstance(entry, Mapping):
        return "none (no caption embeddings)"
    return f"{entry.get('class', '?')} {entry.get('id', '')}, {entry.get('dim', '?')}-d"


def _summary(manifest: Mapping[str, Any], index: pa.Table, sources: pa.Table) -> str:
    counts = dict(manifest.get("counts") or {})
    status = Counter(index.column("status").to_pylist())
    src_status = Counter(sources.column("status").to_pylist())
    rows = [
        ("sources", f"{sources.num_rows} ({src_status.get('error', 0)} failed)"),
        ("clips", f"{index.num_rows}"),
        ("kept / rejected / error", f"{status['kept']} / {status['rejected']} / {status['error']}"),
        ("shards", str(counts.get("shards", "?"))),
        ("latent tokens", f"{counts.get('latent_tokens', 0):,}"),
        ("source kinds", _source_kinds(sources, index)),
        (
            "VAE",
            f"{(manifest.get('vae') or {}).get('class', '?')} {(manifest.get('vae') or {}).get('id', '')}",
        ),
        ("patch size", str(manifest.get("patch_size"))),
        ("captioner", str((manifest.get("captioner") or {}).get("id", "none"))),
        ("text encoder", _text_encoder(manifest.get("text_encoder"))),
        (
            "reelpack",
            f"{manifest.get('reelpack_version', '?')}, written {manifest.get('created_at', '?')}",
        ),
        ("config hash", str(manifest.get("config_hash", "?"))),
    ]
    table = (
        '<table class="kv">'
        + "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in rows)
        + "</table>"
    )
    if manifest.get("random_weights"):
        table += (
            '<p class="note">Built with random-weight models (tiny preset): latents, '
            "thumbnails and captions are meaningless test data.</p>"
        )
    return table


def _column(index: pa.Table, name: str) -> list[Any]:
    return index.column(name).to_pylist()


def _wide_gamut_sdr(sources: pa.Table) -> int:
    """Sources with BT.2020 primaries and an SDR transfer (corpora older than the
    color_primaries column have none)."""
    if "color_primaries" not in sources.column_names:
        return 0
    pairs = zip(
        _column(sources, "color_primaries"), _column(sources, "color_transfer"), strict=True
    )
    return sum(1 for p, t in pairs if p == "bt2020" and t not in HDR_TRANSFER_NAMES)


def _stills_note(count: int, what: str) -> str:
    return f" ({count} {what}{'s' if count != 1 else ''} not shown)" if count else ""


def _distributions(index: pa.Table, sources: pa.Table) -> dict[str, str]:
    # stills (one-frame clips, image sources) last no time: counted, not plotted
    starts, ends = _column(index, "start_s"), _column(index, "end_s")
    frames = [
        None if a is None or b is None else b - a
        for a, b in zip(_column(index, "start_frame"), _column(index, "end_frame"), strict=True)
    ]
    clip_s = [
        b - a
        for a, b, n in zip(starts, ends, frames, strict=True)
        if a is not None and b is not None and n != 1
    ]
    still_clips = frames.count(1)
    kinds = sources.column("media_kind").to_pylist()
    src_s = [
        d
        for d, kind in zip(sources.column("duration_s").to_pylist(), kinds, strict=True)
        if d is not None and kind != "image"
    ]
    images = kinds.count("image")
    widths, heights = _column(index, "width"), _column(index, "height")
    crops = _column(index, "crop") if "crop" in index.column_names else [None] * index.num_rows
    # a clip's picture: the source's display frame, or what cropping its bars kept
    aspects = [
        (c[2] / c[3]) if c else (w / h)
        for w, h, c in zip(widths, heights, crops, strict=True)
        if (c and c[3]) or (w and h)
    ]
    res = Counter(f"{w}x{h}" for w, h in zip(widths, heights, strict=True) if w and h)
    enc = Counter(
        f"{w}x{h}"
        for w, h in zip(
            _column(index, "encode_width"), _column(index, "encode_height"), strict=True
        )
        if w and h
    )
    kept_tokens = [
        t
        for t, s in zip(_column(index, "num_tokens"), _column(index, "status"), strict=True)
        if s == "kept" and t is not None
    ]
    return {
        "durations": _plots(
            [
                histogram_svg(
                    clip_s, "clip duration" + _stills_note(still_clips, "still clip"), "seconds"
                ),
                histogram_svg(src_s, "source duration" + _stills_note(images, "image"), "seconds"),
            ]
        ),
        "aspect": _plots(
            [
                histogram_svg(
                    aspects, "clip aspect ratio (width / height)", "aspect", thresholds=(1.0,)
                )
            ]
        ),
        "resolutions": _plots(
            [
                bar_svg(dict(res), "source display size (clips)"),
                bar_svg(dict(enc), "size fed to the VAE (kept clips)"),
            ]
        ),
        "tokens": _plots([histogram_svg(kept_tokens, "latent tokens per kept clip", "tokens")]),
    }


def _scores(index: pa.Table, thresholds: Mapping[str, tuple[float | None, float | None]]) -> str:
    svgs = []
    for name in schemas.SCORE_NAMES:
        col = schemas.score_column(name)
        lo, hi = thresholds.get(name, (None, None))
        bounds = "no threshold" if name not in thresholds else f"keep {_fmt_bounds(lo, hi)}"
        svgs.append(
            histogram_svg(
                _column(index, col),
                f"{col} — {bounds}",
                name,
                thresholds=(lo, hi),
                log_x=name in _LOG_SCORES,
            )
        )
    return _plots(svgs)


def _fmt_bounds(lo: float | None, hi: float | None) -> str:
    if lo is not None and hi is not None:
        return f"{_fmt(lo)}..{_fmt(hi)}"
    if lo is not None:
        return f">= {_fmt(lo)}"
    return f"<= {_fmt(hi)}" if hi is not None else "any"


def _decisions(index: pa.Table) -> str:
    status = Counter(str(s) for s in _column(index, "status"))
    reasons: Counter[str] = Counter()
    for s, rs in zip(_column(index, "status"), _column(index, "reasons"), strict=True):
        if s == "rejected":
            reasons.update(rs or ["(no reason recorded)"])
    errors = Counter(
        (e or "").split(":", 1)[0][:40] or "(no message)"
        for e, s in zip(_column(index, "error"), _column(index, "status"), strict=True)
        if s == "error"
    )
    svgs = [
        bar_svg(dict(status), "clips by status"),
        bar_svg(dict(reasons), "rejected clips by reason"),
    ]
    if errors:
        svgs.append(bar_svg(dict(errors), "failed clips by error"))
    return _plots(svgs)


def _gallery(items: list[GalleryItem], note: str) -> str:
    cards = []
    for it in items:
        if it.thumbnails:
            pics = "".join(
                f'<img src="{uri}" alt="frame {i} of clip {it.clip_id}">'
                for i, uri in enumerate(it.thumbnails)
            )
        else:
            pics = f'<div class="ph">{html.escape(it.note or "no thumbnail")}</div>'
        cards.append(
            f'<div class="card">{pics}<p class="cap">{html.escape(it.caption) or "<i>no caption</i>"}</p>'
            f'<div class="meta">{html.escape(it.clip_id)} · latent {it.latent_shape} · '
            f"{html.escape(it.source.rsplit('/', 1)[-1])}</div></div>"
        )
    head = f'<p class="note">{html.escape(note)}</p>' if note else ""
    return head + '<div class="gallery">' + "".join(cards) + "</div>"


def render_report(
    root: str, *, samples: int = 6, vae_path: str | None = None, device: str = "auto"
) -> str:
    """The HTML page of the corpus at ``root`` (local folder or ``s3://``); ``device``
    decodes the gallery's thumbnails (:func:`load_gallery`)."""
    if samples < 0:
        raise ValueError(f"the gallery's sample count must be >= 0, got {samples}")
    try:
        manifest = require_manifest(root)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{root}: {e}") from None
    index, sources, _ = read_committed(root, _REPORT_COLUMNS)
    dists = _distributions(index, sources)
    items, note = load_gallery(
        root, manifest, index, samples=samples, vae_path=vae_path, device=device
    )
    sections = [
        _section("summary", "Summary", _summary(manifest, index, sources)),
        _section("durations", "Durations", dists["durations"]),
        _section("aspect", "Aspect ratios", dists["aspect"]),
        _section("resolutions", "Resolutions", dists["resolutions"]),
        _section("scores", "Quality scores and thresholds", _scores(index, _thresholds(manifest))),
        _section("decisions", "Kept and rejected", _decisions(index)),
        _section("tokens", "Latent tokens", dists["tokens"]),
        _section("gallery", "Sample clips", _gallery(items, note)),
    ]
    title = f"reelpack corpus report: {root}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>" + "".join(sections) + "</body></html>\n"
    )


def write_report(
    root: str, out: str, *, samples: int = 6, vae_path: str | None = None, device: str = "auto"
) -> str:
    """Render the report of ``root`` and write it to ``out`` (a local path, ``file://`` or
    ``s3://``: beside an S3 corpus, say); returns ``out``."""
    storage = storage_for(out)  # another scheme raises before the report is rendered
    _check_request(out, vae_path, device)
    page = render_report(root, samples=samples, vae_path=vae_path, device=device)
    storage.write(out, page.encode("utf-8"))
    return out


def _check_request(out: str, vae_path: str | None, device: str = "auto") -> None:
    """ValueError, before any work, for a local ``out`` that cannot be written (a folder,
    or under a file), a ``vae_path`` that is no folder and a device torch cannot use."""
    if not is_s3(out):
        local = Path(schemas.storage_location(out))
        if local.is_dir():
            raise ValueError(f"{out} is a folder; name the HTML file to write")
        blocker = next((p for p in local.parents if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            raise ValueError(f"cannot write {out}: {blocker} is a file, not a folder")
    if vae_path is not None and not Path(vae_path).is_dir():
        raise ValueError(f"--vae {vae_path}: no such folder (the folder of the corpus VAE)")
    from model.device import resolve_device

    resolve_device(device)
