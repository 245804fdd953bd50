"""The build graph on a local Ray with 2 CPUs vs the same steps in one process.

    python benchmarks/pipeline_bench.py                    # 8 videos x 4 shots of 3 s
    python benchmarks/pipeline_bench.py --shots 10         # more work per actor start-up

Generates ``--videos`` synthetic 360p videos (landscape, portrait, square), then
builds the same corpus twice with the ``tiny`` preset (random-weight models, CPU):

- ``sequential``: :func:`pipeline.graph.run_in_process`, the graph's own steps
  (``build_steps``) in this process, source by source, each model loaded once;
  torch limited to one thread, as Ray gives each 1-CPU or fractional worker
  (``OMP_NUM_THREADS=1``). The split stage's own decode and encode threads run as
  they do under Ray;
- ``ray``: :func:`pipeline.graph.build` on a fresh local Ray with ``num_cpus=2``
  (``ray.init`` is timed separately and excluded; starting the model actors is not).

Both corpora must hold the same clips. Reported: wall times, the ratio ``ray /
sequential`` (goal <= 0.65, a real parallel gain on 2 cores), and CPU accounting:
the sequential process's CPU seconds (above its wall time when split's threads
overlap), the machine's busy CPU seconds during the Ray build (``/proc/stat``), and
Ray's overhead per clip, ``(busy CPU - sequential CPU) / clips``. The best ratio 2
cores allow is ``sequential CPU / 2 / sequential wall``: a sequential run that
already keeps 1.2 cores busy cannot be beaten by 2x.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from pipeline.config import BuildConfig, load_config
from pipeline.synth import synth_video
from pipeline.writer import read_index

CPUS = 2


def make_videos(root: Path, n: int, shots: int, shot_s: float, fps: float, side: int) -> list[str]:
    """``n`` videos of ``shots`` shots, landscape, portrait and square in turn."""
    sizes = [(side * 16 // 9, side), (side, side * 16 // 9), (side, side)]
    out = []
    for i in range(n):
        w, h = (x // 2 * 2 for x in sizes[i % len(sizes)])
        path = root / f"v{i:02d}.mp4"
        frames = [round(shot_s * fps)] * shots
        synth_video(str(path), width=w, height=h, fps=fps, shots=frames, seed=i)
        out.append(str(path))
    return out


def run_sequential(sources: list[str], out: str, cfg: BuildConfig) -> int:
    """The graph's steps (``pipeline.graph.build_steps``) in this process, source by
    source; returns the number of clips written."""
    from pipeline.graph import run_in_process

    run_in_process(sources, out, cfg)
    return read_index(out).num_rows


def busy_cpu_s() -> float:
    """CPU seconds all processes of this machine spent busy so far (Linux)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait


def run_ray(sources: list[str], out: str, cfg: BuildConfig) -> tuple[float, int]:
    """Ray start-up seconds, clips written."""
    from pipeline.graph import build, init_ray

    t0 = time.perf_counter()
    init_ray(cfg)
    startup = time.perf_counter() - t0
    build(sources, out, cfg, echo=lambda _: None)
    return startup, read_index(out).num_rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--videos", type=int, default=8)
    p.add_argument("--shots", type=int, default=4, help="shots per video")
    p.add_argument("--shot-s", type=float, default=3.0, help="seconds per shot")
    p.add_argument("--fps", type=float, default=24.0)
    p.add_argument("--side", type=int, default=360, help="short side of the videos")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for both runs, as reelpack build --set (e.g. ray.split.num_cpus=0.5)",
    )
    args = p.parse_args()
    os.environ["RAY_ADDRESS"] = "local"  # a fresh local Ray, never someone else's cluster
    with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as tmp:
        root = Path(tmp)
        (root / "videos").mkdir()
        sources = make_videos(
            root / "videos", args.videos, args.shots, args.shot_s, args.fps, args.side
        )
        cfg = load_config(
            preset="tiny",
            model_cache=str(root / "models"),
            split={"min_clip_s": 1.0, "max_clip_s": 5.0},
            sets=args.set,
            ray={"num_cpus": CPUS},
        )
        # warm the model files and the OS page cache once, outside both timings
        run_sequential(sources[:1], str(root / "warm"), cfg)

        torch.set_num_threads(1)
        t0, c0 = time.perf_counter(), time.process_time()
        seq_clips = run_sequential(sources, str(root / "seq"), cfg)
        seq_s, seq_cpu = time.perf_counter() - t0, time.process_time() - c0
        print(f"sequential: {seq_s:.2f} s, {seq_clips} clips", flush=True)

        t0, busy0 = time.perf_counter(), busy_cpu_s()
        startup, ray_clips = run_ray(sources, str(root / "ray"), cfg)
        ray_total, busy = time.perf_counter() - t0, busy_cpu_s() - busy0
        ray_s = ray_total - startup

        a = sorted(read_index(str(root / "seq")).column("clip_id").to_pylist())
        b = sorted(read_index(str(root / "ray")).column("clip_id").to_pylist())
        same = "yes" if a == b else "NO"
        rows = [
            ("sequential (1 process)", seq_s, seq_cpu, seq_clips),
            (f"ray build ({CPUS} CPUs)", ray_s, busy, ray_clips),
        ]
        print(f"\n{len(sources)} videos x {args.shots} shots, tiny preset, same clips: {same}")
        print(f"{'run':<26} {'wall s':>8} {'CPU s':>8} {'clips':>6} {'clips/s':>8}")
        for name, wall, cpu, clips in rows:
            print(f"{name:<26} {wall:>8.2f} {cpu:>8.2f} {clips:>6d} {clips / wall:>8.2f}")
        print(f"ray.init (excluded)        {startup:>8.2f}")
        print(f"ratio ray / sequential: {ray_s / seq_s:.2f} (goal <= 0.65)")
        print(f"best ratio 2 cores allow: {seq_cpu / CPUS / seq_s:.2f} (sequential CPU / 2 / wall)")
        print(
            f"ray overhead per clip: {(busy - seq_cpu) / max(ray_clips, 1):.2f} CPU-s "
            "((busy CPU during the build - sequential CPU) / clips)"
        )


if __name__ == "__main__":
    main()
