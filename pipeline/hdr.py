"""HDR video (PQ or HLG, BT.2020) tone-mapped to SDR for the working images, and
BT.2020 SDR video brought to BT.709 colours.

Phones record HDR by default (HLG on iPhones, PQ/HDR10 elsewhere). Shown as is, its
10-bit code values look flat and washed out, and a VAE trained on them learns that
look. :func:`tone_map_i420` turns a frame's 4:2:0 planes into what an SDR display
shows, at the working size (cheaper than at the coded size):

1. limited-range BT.2020 Y'CbCr to non-linear R'G'B';
2. the transfer's EOTF to display light in nits: PQ (SMPTE ST 2084) directly, HLG
   (ARIB STD-B67) through its inverse OETF and the BT.2100 OOTF for a 1000-nit display;
3. luminance tone curve, hue kept (every channel scaled alike): HDR reference white
   (203 nits, BT.2408) is 1.0 and an extended Reinhard curve rolls highlights off so
   that ``peak_nits`` reaches SDR white (for PQ the stream's MaxCLL when it has one,
   :func:`content_peak_nits`; else 1000 nits, HLG's nominal peak);
4. BT.2020 to BT.709 primaries (linear, out-of-gamut colours clipped);
5. BT.1886 encoding (gamma 2.4) to 8-bit R'G'B', then 8-bit I420 as
   :func:`pipeline.decode.rgb_to_i420` makes it (BT.601, limited range, the colour
   tags of an untagged frame).

SDR video with BT.2020 primaries (:func:`is_wide_gamut_sdr`) takes the same path with
BT.1886 (gamma 2.4) as its EOTF and no tone curve: only its primaries change. Used as
is, its colours would look washed out, as BT.709 reads them.
"""

from __future__ import annotations

import functools
import struct
from typing import Any

import cv2
import numpy as np

__all__ = [
    "DEFAULT_PEAK_NITS",
    "HDR_TRANSFERS",
    "HDR_TRANSFER_NAMES",
    "TRC_HLG",
    "TRC_PQ",
    "content_peak_nits",
    "is_hdr",
    "is_wide_gamut_sdr",
    "primaries_name",
    "tone_map_i420",
    "transfer_name",
]

# FFmpeg AVColorTransferCharacteristic values
TRC_PQ, TRC_HLG = 16, 18
HDR_TRANSFERS = frozenset({TRC_PQ, TRC_HLG})
PRIMARIES_BT2020 = 9  # FFmpeg AVColorPrimaries
_PRIMARIES_NAMES = {
    1: "bt709",
    2: "unknown",
    4: "bt470m",
    5: "bt470bg",
    6: "smpte170m",
    7: "smpte240m",
    8: "film",
    9: "bt2020",
    10: "smpte428",
    11: "smpte431",
    12: "smpte432",
    22: "ebu3213",
}
_TRC_NAMES = {
    1: "bt709",
    2: "unknown",
    4: "gamma22",
    5: "gamma28",
    6: "smpte170m",
    7: "smpte240m",
    8: "linear",
    11: "iec61966-2-4",
    13: "iec61966-2-1",
    14: "bt2020-10",
    15: "bt2020-12",
    TRC_PQ: "smpte2084",
    TRC_HLG: "arib-std-b67",
}

HDR_TRANSFER_NAMES = frozenset(_TRC_NAMES[t] for t in HDR_TRANSFERS)

REFERENCE_WHITE_NITS = 203.0  # BT.2408 HDR reference white: SDR's diffuse white
DEFAULT_PEAK_NITS = 1000.0  # HLG's nominal display peak; PQ's when the stream has no MaxCLL
_EOTF_STEPS = 4096  # non-linear code values sampled by the EOTF table
_OETF_STEPS = 65536  # linear values sampled by the BT.1886 table (fine in the shadows)

# BT.2020 non-constant-luminance Y'CbCr -> R'G'B'
_YUV_TO_RGB = np.array(
    [[1.0, 0.0, 1.4746], [1.0, -0.16455, -0.57135], [1.0, 1.8814, 0.0]], np.float32
)
_LUMA_2020 = np.array([[0.2627, 0.6780, 0.0593]], np.float32)
# linear BT.2020 RGB -> linear BT.709 RGB (BT.2087)
_GAMUT_2020_TO_709 = np.array(
    [[1.6605, -0.5876, -0.0728], [-0.1246, 1.1329, -0.0083], [-0.0182, -0.1006, 1.1187]],
    np.float32,
)


def content_peak_nits(frame: Any) -> float | None:
    """MaxCLL (the brightest pixel of the content, in nits) from a decoded frame's
    content-light-level side data (HDR10 streams carry it on keyframes); None if absent."""
    for data in frame.side_data:
        if getattr(data.type, "name", "") == "CONTENT_LIGHT_LEVEL":
            max_cll = struct.unpack("=II", bytes(data)[:8])[0]
            return float(max_cll) if max_cll > 0 else None
    return None


def is_hdr(color_trc: int | None) -> bool:
    """Whether a frame's transfer characteristic is PQ or HLG."""
    return color_trc in HDR_TRANSFERS


def primaries_name(color_primaries: int | None) -> str | None:
    """FFmpeg's name of a frame's colour primaries ("bt2020"), None when not known."""
    return None if color_primaries is None else _PRIMARIES_NAMES.get(int(color_primaries))


def is_wide_gamut_sdr(color_primaries: int | None, color_trc: int | None) -> bool:
    """Whether a frame is SDR with BT.2020 primaries (tagged so: untagged is BT.709)."""
    return color_primaries == PRIMARIES_BT2020 and not is_hdr(color_trc)


def transfer_name(color_trc: int | None) -> str | None:
    """FFmpeg's name of a transfer characteristic (None when unknown to the stream)."""
    if color_trc is None:
        return None
    return _TRC_NAMES.get(int(color_trc), f"trc{int(color_trc)}")


@functools.lru_cache(maxsize=3)
def _eotf_table(trc: int) -> np.ndarray:
    """Non-linear code value (``_EOTF_STEPS`` steps over 0..1) -> light: nits for PQ,
    scene light 0..1 for HLG (its OOTF needs all three channels, see ``_display_light``)."""
    e = np.linspace(0.0, 1.0, _EOTF_STEPS, dtype=np.float64)
    if trc == TRC_PQ:
        m1, m2 = 2610 / 16384, 2523 / 4096 * 128
        c1, c2, c3 = 3424 / 4096, 2413 / 4096 * 32, 2392 / 4096 * 32
        p = e ** (1 / m2)
        light = 10000.0 * (np.maximum(p - c1, 0) / (c2 - c3 * p)) ** (1 / m1)
    elif trc == TRC_HLG:
        a, b = 0.17883277, 0.28466892
        c = 0.5 - a * np.log(4 * a)
        light = np.where(e <= 0.5, e * e / 3, (np.exp((e - c) / a) + b) / 12)
    else:  # SDR: BT.1886, reference white at HDR's reference white
        light = REFERENCE_WHITE_NITS * e**2.4
    return light.astype(np.float32)


@functools.lru_cache(maxsize=1)
def _oetf_table() -> np.ndarray:
    """Linear SDR light (``_OETF_STEPS`` steps over 0..1) -> 8-bit BT.1886 code value."""
    light = np.linspace(0.0, 1.0, _OETF_STEPS, dtype=np.float64)
    return np.round(255.0 * light ** (1 / 2.4)).astype(np.uint8)


def _display_light(rgb_code: np.ndarray, trc: int) -> np.ndarray:
    """Non-linear BT.2020 R'G'B' (0..1) -> display light in nits."""
    index = (np.clip(rgb_code, 0.0, 1.0) * (_EOTF_STEPS - 1) + 0.5).astype(np.uint16)
    light = np.take(_eotf_table(trc if is_hdr(trc) else 0), index)
    if trc == TRC_HLG:  # BT.2100 OOTF for a 1000-nit display: gamma 1.2 on scene luminance
        luma = cv2.transform(light, _LUMA_2020)
        light *= (1000.0 * np.power(np.maximum(luma, 1e-6), 0.2))[..., None]
    return light


def tone_map_i420(
    y: np.ndarray,
    u: np.ndarray,
    v: np.ndarray,
    trc: int,
    size: tuple[int, int],
    bits: int = 10,
    peak_nits: float = DEFAULT_PEAK_NITS,
) -> np.ndarray:
    """SDR 8-bit I420 ``(h * 3 / 2, w)`` at ``size = (w, h)`` (even sides) from 4:2:0
    planes of ``bits``-bit limited-range BT.2020 Y'CbCr (uint16 arrays): HDR when
    ``trc`` is PQ or HLG, else SDR (no tone curve; BT.709 primaries)."""
    w, h = size
    scale = float(1 << (bits - 8))
    luma = cv2.resize(y, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32)
    cb = cv2.resize(u, (w, h), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    cr = cv2.resize(v, (w, h), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    ycc = cv2.merge(
        [
            (luma - 16 * scale) / (219 * scale),
            (cb - 128 * scale) / (224 * scale),
            (cr - 128 * scale) / (224 * scale),
        ]
    )
    light = _display_light(cv2.transform(ycc, _YUV_TO_RGB), trc) / REFERENCE_WHITE_NITS
    if is_hdr(trc):
        # extended Reinhard on luminance: x -> x (1 + x / w^2) / (1 + x), peak -> 1
        x = np.maximum(cv2.transform(light, _LUMA_2020), 1e-6)
        white = max(peak_nits / REFERENCE_WHITE_NITS, 1.0)
        light *= ((1 + x / (white * white)) / (1 + x))[..., None]
    sdr = np.clip(cv2.transform(light, _GAMUT_2020_TO_709), 0.0, 1.0)
    rgb = np.take(_oetf_table(), (sdr * (_OETF_STEPS - 1) + 0.5).astype(np.uint16))
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420)
