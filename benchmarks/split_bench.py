"""Split benchmark: throughput vs the PySceneDetect CLI, wall time vs one plain decode,
peak memory vs video length. Every ratio is measured in one run on the same files.

    python benchmarks/split_bench.py            # small default sizes, a few minutes on 2 cores
    python benchmarks/split_bench.py --full     # the issue's sizes: 2 min throughput video,
                                                # 2 and 10 min 1280x720 RSS videos

Rows:
- ``split`` (our Split stage: one decode pass, AdaptiveDetector, clip payloads encoded)
  and ``shots`` (decode + detect only, what ``reelpack shots`` does) against
  ``scenedetect -i FILE detect-adaptive`` (the CLI, run as a subprocess; its cuts are
  read back from ``list-scenes`` and compared with ours);
- ``split`` against one plain PyAV decode pass of the same file (every frame converted
  to RGB at its native size) and a decord pass;
- peak RSS of a fresh process splitting a short and a long video of the same size.
"""

from __future__ import annotations

import argparse
import csv
import glob
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.stages.base import batch_to_rows
from pipeline.stages.probe import Probe
from pipeline.stages.split import Split, SplitConfig, shots
from pipeline.synth import synth_video


def make_video(
    path: str, width: int, height: int, seconds: float, fps: int, seed: int
) -> list[int]:
    """A video of shots of 2-6 s with hard cuts; returns the cut frames."""
    rng = np.random.default_rng(seed)
    total = round(seconds * fps)
    lengths: list[int] = []
    while sum(lengths) < total:
        lengths.append(int(rng.integers(2 * fps, 6 * fps)))
    lengths[-1] -= sum(lengths) - total
    if lengths[-1] < fps:
        lengths[-2] += lengths.pop()
    return synth_video(path, width=width, height=height, fps=fps, shots=lengths, seed=seed)


def timed(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def run_split(path: str, cfg: SplitConfig) -> list[dict]:
    batch = Probe()({"source": np.array([path], dtype=object)})
    return batch_to_rows(Split(cfg)(batch))


def plain_decode(path: str) -> int:
    import av

    n = 0
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            frame.to_ndarray(format="rgb24")
            n += 1
    return n


def decord_decode(path: str) -> int:
    import decord

    reader = decord.VideoReader(path, num_threads=0)
    n = len(reader)
    for lo in range(0, n, 16):
        reader.get_batch(list(range(lo, min(lo + 16, n)))).asnumpy()
    return n


def cli_cuts(path: str) -> tuple[float, list[int]]:
    """Wall time and cut frames of ``scenedetect -i FILE detect-adaptive``."""
    with tempfile.TemporaryDirectory() as out:
        cmd = ["scenedetect", "-q", "-i", path, "-o", out, "detect-adaptive", "list-scenes", "-s"]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        wall = time.perf_counter() - t0
        (table,) = glob.glob(os.path.join(out, "*.csv"))
        with open(table) as f:
            rows = list(csv.reader(f))
    header = rows[0] if rows and "Start Frame" in rows[0] else rows[1]
    body = rows[rows.index(header) + 1 :]
    col = header.index("Start Frame")
    # The CLI numbers frames from 1.
    return wall, [int(r[col]) - 1 for r in body][1:]


_RSS = """
import resource, sys, numpy as np
sys.path.insert(0, sys.argv[2])
from pipeline.stages.probe import Probe
from pipeline.stages.split import Split, SplitConfig
b = Probe()({"source": np.array([sys.argv[1]], dtype=object)})
out = Split(SplitConfig())(b)
print(len(out["clip_id"]), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss_mib(path: str) -> tuple[int, float]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", _RSS, path, root], check=True, capture_output=True, text=True
    )
    clips, kib = (int(x) for x in out.stdout.split()[-2:])
    return clips, kib / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--full", action="store_true", help="1280x720; 2 and 10 minute RSS videos")
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--seconds", type=float, default=None, help="throughput video length")
    ap.add_argument("--fps", type=int, default=30)
    args = ap.parse_args()
    w, h = args.width or 1280, args.height or 720
    seconds = args.seconds or (120.0 if args.full else 12.0)
    rss_short, rss_long = (120.0, 600.0) if args.full else (20.0, 100.0)
    rss_size = (1280, 720) if args.full else (320, 180)

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.mp4")
        truth = make_video(path, w, h, seconds, args.fps, seed=1)
        frames = round(seconds * args.fps)
        cfg = SplitConfig()
        t_cli, cuts_cli = cli_cuts(path)
        t_shots, found = timed(shots, path)
        cuts_ours = [s["start_frame"] for s in found][1:]
        t_split, rows = timed(run_split, path, cfg)
        t_decode, n_decoded = timed(plain_decode, path)
        try:
            t_decord, _ = timed(decord_decode, path)
        except Exception as exc:  # decord is optional at run time
            print(f"decord failed: {exc}")
            t_decord = float("nan")
        assert n_decoded == frames, (n_decoded, frames)

        short = os.path.join(tmp, "short.mp4")
        long = os.path.join(tmp, "long.mp4")
        make_video(short, *rss_size, rss_short, args.fps, seed=2)
        make_video(long, *rss_size, rss_long, args.fps, seed=3)
        clips_s, rss_s = peak_rss_mib(short)
        clips_l, rss_l = peak_rss_mib(long)

    print(f"\nvideo {w}x{h}, {seconds:g} s, {frames} frames, {len(truth)} true cuts")
    print(
        f"cuts: truth {len(truth)}, ours {len(cuts_ours)}, CLI {len(cuts_cli)}; "
        f"ours == CLI: {cuts_ours == cuts_cli}; ours == truth (±1): "
        f"{len(cuts_ours) == len(truth) and all(abs(a - b) <= 1 for a, b in zip(cuts_ours, truth, strict=False))}"
    )
    print(f"clips written by split: {len(rows)}\n")
    print(f"{'measure':44s} {'value':>10s} {'goal':>10s}")
    table = [
        ("scenedetect CLI detect-adaptive, frames/s", frames / t_cli, ""),
        ("reelpack shots (decode+detect), frames/s", frames / t_shots, ""),
        ("reelpack split (decode+detect+clips), frames/s", frames / t_split, ""),
        ("split throughput / CLI", t_cli / t_split, ">= 1.5"),
        ("shots throughput / CLI", t_cli / t_shots, ""),
        ("plain PyAV decode (rgb24), frames/s", frames / t_decode, ""),
        ("decord decode, frames/s", frames / t_decord, ""),
        ("split wall / plain decode wall", t_split / t_decode, "<= 1.3"),
        (f"peak RSS, split {rss_short:g} s {rss_size[0]}x{rss_size[1]} (MiB)", rss_s, "< 1536"),
        (f"peak RSS, split {rss_long:g} s {rss_size[0]}x{rss_size[1]} (MiB)", rss_l, "< 1536"),
        ("RSS growth long - short (MiB)", rss_l - rss_s, "~ 0"),
    ]
    for name, value, goal in table:
        print(f"{name:44s} {value:10.2f} {goal:>10s}")
    print(
        f"(clips: short {clips_s}, long {clips_l}; peak RSS process "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB)"
    )


if __name__ == "__main__":
    main()
