"""Split benchmark: throughput vs the PySceneDetect CLI, wall time vs one plain decode,
peak memory vs video length. Every ratio is measured in one run on the same files.

    python benchmarks/split_bench.py            # small default sizes, a few minutes on 2 cores
    python benchmarks/split_bench.py --full     # the issue's sizes: 2 min throughput video,
                                                # 2 and 10 min 1280x720 RSS videos

Throughput, on a generated 1280x720 video with hard cuts and on the real
``../shared/videos/testvideo.mp4`` (1280x720, cuts and fades), each timing the best
of ``--repeats`` runs:

- ``split`` (our Split stage after Probe: one decode pass, AdaptiveDetector, clip
  payloads encoded as a default build does: 480x832 pixels at the VAE's 16 fps) and
  ``shots`` (decode + detect only, the same work as the CLI; what ``reelpack shots``
  does) against ``scenedetect -i FILE
  detect-adaptive`` (the CLI, run as a subprocess; its cuts are read back from
  ``list-scenes`` and compared with ours);
- ``split`` against one plain PyAV decode pass of the same file: frames as the
  decoder outputs them (``decode``), and also each converted to RGB (``decode+rgb``).

Memory: peak RSS of a fresh process splitting a short and a long video of one size,
through ``Split.stream`` with the environment Ray workers get
(``pipeline.graph.WORKER_ENV_DEFAULTS``), as a build runs it.
"""

from __future__ import annotations

import argparse
import csv
import glob
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.graph import WORKER_ENV_DEFAULTS
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


def plain_decode(path: str, rgb: bool = True) -> int:
    """One PyAV decode pass: frames as decoded, or each converted to RGB."""
    import av

    n = 0
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            if rgb:
                frame.to_ndarray(format="rgb24")
            n += 1
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


# Peak RSS from VmHWM (getrusage's ru_maxrss survives exec: a child would report this
# process's peak when that is higher than its own).
_RSS = """
import sys, numpy as np
sys.path.insert(0, sys.argv[2])
from pipeline.stages.probe import Probe
from pipeline.stages.split import Split, SplitConfig
b = Probe()({"source": np.array([sys.argv[1]], dtype=object)})
fps = float(sys.argv[4]) if sys.argv[4] != "None" else None
clips = payload = 0
# as a build runs it: chunks are handed on (to Ray's object store) as payloads finish
for chunk in Split(SplitConfig(work_max_area=int(sys.argv[3]), work_fps=fps)).stream(b):
    clips += len(chunk["clip_id"])
    payload += sum(len(x) for x in chunk["clip_bytes"] if x is not None)
hwm = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM:"))
print(clips, payload, hwm)
"""


def peak_rss_mib(path: str, cfg: SplitConfig) -> tuple[int, float, float]:
    """(clips, payload MiB streamed out, peak RSS MiB) of a fresh process splitting ``path``."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", _RSS, path, root, str(cfg.work_max_area), str(cfg.work_fps)],
        env=dict(os.environ, **{k: os.environ.get(k, v) for k, v in WORKER_ENV_DEFAULTS.items()}),
        check=True,
        capture_output=True,
        text=True,
    )
    clips, payload, kib = (int(x) for x in out.stdout.split()[-3:])
    return clips, payload / (1 << 20), kib / 1024


def best_of(repeats: int, fn, *args):  # type: ignore[no-untyped-def]
    """(best wall seconds, result of the last run)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        wall, out = timed(fn, *args)
        best = min(best, wall)
    return best, out


def throughput(path: str, repeats: int, cfg: SplitConfig) -> dict:
    """Timings and cuts of one file."""
    frames = plain_decode(path, rgb=False)
    t_cli, (_, cuts_cli) = best_of(repeats, cli_cuts, path)
    t_shots, found = best_of(repeats, shots, path)
    t_split, rows = best_of(repeats, run_split, path, cfg)
    t_decode, _ = best_of(repeats, plain_decode, path, False)
    t_rgb, _ = best_of(repeats, plain_decode, path)
    return {
        "frames": frames,
        "cli": t_cli,
        "shots": t_shots,
        "split": t_split,
        "decode": t_decode,
        "decode_rgb": t_rgb,
        "cuts_cli": cuts_cli,
        "cuts_ours": [s["start_frame"] for s in found][1:],
        "clips": len(rows),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--full", action="store_true", help="1280x720; 2 and 10 minute RSS videos")
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--seconds", type=float, default=None, help="generated video length")
    ap.add_argument("--fps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3, help="timings are the best of these")
    ap.add_argument(
        "--work-area",
        type=int,
        default=None,
        help="payload pixel budget (default: what a build with the default config uses)",
    )
    ap.add_argument(
        "--work-fps",
        type=float,
        default=None,
        help="payload frame rate, 0 for every source frame (default: as a build, the VAE's)",
    )
    args = ap.parse_args()
    from pipeline.config import load_config

    cfg = load_config().split
    if args.work_area:
        cfg = replace(cfg, work_max_area=args.work_area)
    if args.work_fps is not None:
        cfg = replace(cfg, work_fps=args.work_fps or None)
    w, h = args.width or 1280, args.height or 720
    seconds = args.seconds or (120.0 if args.full else 12.0)
    rss_short, rss_long = (120.0, 600.0) if args.full else (20.0, 100.0)
    rss_size = (1280, 720) if args.full else (320, 180)
    real = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "videos", "testvideo.mp4")

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.mp4")
        truth = make_video(path, w, h, seconds, args.fps, seed=1)
        runs = {f"generated {w}x{h} {seconds:g} s": throughput(path, args.repeats, cfg)}
        if os.path.exists(real):
            runs["testvideo.mp4 (real)"] = throughput(real, args.repeats, cfg)
        short = os.path.join(tmp, "short.mp4")
        long = os.path.join(tmp, "long.mp4")
        make_video(short, *rss_size, rss_short, args.fps, seed=2)
        make_video(long, *rss_size, rss_long, args.fps, seed=3)
        clips_s, out_s, rss_s = peak_rss_mib(short, cfg)
        clips_l, out_l, rss_l = peak_rss_mib(long, cfg)

    rate = f"{cfg.work_fps:g} fps" if cfg.work_fps else "every frame"
    print(
        f"\nclip payloads: {cfg.work_max_area} pixels, {rate} ({cfg.work_preset}, CRF {cfg.work_crf})"
    )
    generated = next(iter(runs.values()))
    ours = generated["cuts_ours"]
    print(
        f"\ngenerated video: {len(truth)} true cuts; ours == truth (+-1): "
        f"{len(ours) == len(truth) and all(abs(a - b) <= 1 for a, b in zip(ours, truth, strict=False))}"
    )
    names = list(runs)
    print(f"\n{'measure':46s} " + " ".join(f"{n[:22]:>22s}" for n in names) + f" {'goal':>8s}")
    table = [
        ("frames", lambda r: r["frames"], "", "{:.0f}"),
        ("same cuts as the CLI", lambda r: float(r["cuts_ours"] == r["cuts_cli"]), "1", "{:.0f}"),
        ("clips written by split", lambda r: r["clips"], "", "{:.0f}"),
        (
            "scenedetect CLI detect-adaptive, frames/s",
            lambda r: r["frames"] / r["cli"],
            "",
            "{:.0f}",
        ),
        (
            "reelpack shots (decode+detect), frames/s",
            lambda r: r["frames"] / r["shots"],
            "",
            "{:.0f}",
        ),
        (
            "reelpack split (+ clip payloads), frames/s",
            lambda r: r["frames"] / r["split"],
            "",
            "{:.0f}",
        ),
        ("plain PyAV decode, frames/s", lambda r: r["frames"] / r["decode"], "", "{:.0f}"),
        ("shots throughput / CLI (same work)", lambda r: r["cli"] / r["shots"], ">= 1.5", "{:.2f}"),
        ("split throughput / CLI", lambda r: r["cli"] / r["split"], ">= 1.5", "{:.2f}"),
        ("split wall / plain decode wall", lambda r: r["split"] / r["decode"], "<= 1.3", "{:.2f}"),
        ("split wall / decode+rgb wall", lambda r: r["split"] / r["decode_rgb"], "", "{:.2f}"),
        ("shots wall / plain decode wall", lambda r: r["shots"] / r["decode"], "", "{:.2f}"),
    ]
    for name, get, goal, fmt in table:
        cells = " ".join(f"{fmt.format(get(runs[n])):>22s}" for n in names)
        print(f"{name:46s} {cells} {goal:>8s}")
    print(f"\n{'memory':46s} {'MiB':>22s}")
    for name, value in [
        (f"peak RSS, split {rss_short:g} s {rss_size[0]}x{rss_size[1]}", rss_s),
        (f"peak RSS, split {rss_long:g} s {rss_size[0]}x{rss_size[1]}", rss_l),
        ("RSS growth long - short", rss_l - rss_s),
        (f"payloads handed on, {rss_short:g} s", out_s),
        (f"payloads handed on, {rss_long:g} s", out_l),
    ]:
        print(f"{name:46s} {value:22.0f}")
    print(f"(goal: < 1536 MiB, no growth; clips: short {clips_s}, long {clips_l})")


if __name__ == "__main__":
    main()
