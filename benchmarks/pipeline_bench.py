"""The build graph on a local Ray with 2 CPUs vs the same stages in one process.

    python benchmarks/pipeline_bench.py                    # 8 videos, tiny preset
    python benchmarks/pipeline_bench.py --videos 16 --shots 4

Generates ``--videos`` synthetic videos (``pipeline.synth``), then builds the same
corpus twice with the ``tiny`` preset (random-weight models, CPU):

- ``sequential``: one process calls the stage classes directly, source by source —
  Probe, Split, Score, [AestheticScorer], Decide, Captioner, Encode — and feeds a
  :class:`~pipeline.writer.CorpusWriter`; models are loaded once, as the actors do;
- ``ray``: :func:`pipeline.graph.build` on a fresh local Ray with ``num_cpus=2``
  (Ray's start-up is timed separately and excluded from the ratio).

Both corpora must hold the same clips. Reported: wall times, ratio ``ray / sequential``
(goal <= 0.65, a real parallel gain on 2 cores), and Ray's overhead per clip,
``(ray_wall * cpus - sequential_wall) / clips``: the core-seconds per clip Ray spends
beyond the sequential work (0 would be perfect 2-way parallelism).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from pipeline.config import BuildConfig, load_config
from pipeline.synth import synth_video
from pipeline.writer import read_index

CPUS = 2


def make_videos(root: Path, n: int, shots: int) -> list[str]:
    sizes = [(192, 108), (108, 192), (144, 144), (160, 90)]
    out = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        path = root / f"v{i:02d}.mp4"
        synth_video(str(path), width=w, height=h, fps=12.0, shots=[24] * shots, seed=i)
        out.append(str(path))
    return out


def run_sequential(sources: list[str], out: str, cfg: BuildConfig) -> int:
    """The graph's steps (``pipeline.graph.build_steps``) in this process, source by
    source; returns the number of clips written."""
    from pipeline.graph import run_in_process

    run_in_process(sources, out, cfg)
    return read_index(out).num_rows


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
    p.add_argument("--shots", type=int, default=3, help="2 s shots per video")
    args = p.parse_args()
    os.environ["RAY_ADDRESS"] = "local"  # a fresh local Ray, never someone else's cluster
    with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as tmp:
        root = Path(tmp)
        (root / "videos").mkdir()
        sources = make_videos(root / "videos", args.videos, args.shots)
        cfg = load_config(
            preset="tiny",
            model_cache=str(root / "models"),
            split={"min_clip_s": 1.0, "max_clip_s": 3.0},
            ray={"num_cpus": CPUS},
        )
        # warm the model files and the OS page cache once, outside both timings
        run_sequential(sources[:1], str(root / "warm"), cfg)

        t0 = time.perf_counter()
        seq_clips = run_sequential(sources, str(root / "seq"), cfg)
        seq_s = time.perf_counter() - t0
        print(f"sequential: {seq_s:.2f} s, {seq_clips} clips", flush=True)

        t0 = time.perf_counter()
        startup, ray_clips = run_ray(sources, str(root / "ray"), cfg)
        ray_total = time.perf_counter() - t0
        ray_s = ray_total - startup

        a = sorted(read_index(str(root / "seq")).column("clip_id").to_pylist())
        b = sorted(read_index(str(root / "ray")).column("clip_id").to_pylist())
        same = "yes" if a == b else "NO"
        ratio = ray_s / seq_s
        overhead = (ray_s * CPUS - seq_s) / max(ray_clips, 1)
        rows = [
            ("sequential (1 process)", seq_s, seq_clips, seq_clips / seq_s),
            (f"ray build ({CPUS} CPUs)", ray_s, ray_clips, ray_clips / ray_s),
            ("ray start-up (excluded)", startup, 0, float("nan")),
        ]
        print(f"{len(sources)} videos x {args.shots} shots, tiny preset, same clips: {same}")
        print(f"{'run':<26} {'wall s':>8} {'clips':>6} {'clips/s':>8}")
        for name, wall, clips, rate in rows:
            print(f"{name:<26} {wall:>8.2f} {clips:>6d} {rate:>8.2f}")
        print(f"ratio ray / sequential: {ratio:.2f} (goal <= 0.65)")
        print(
            f"ray overhead per clip: {overhead:.2f} core-s "
            f"((ray wall x {CPUS} - sequential wall) / clips)"
        )
        print(f"with start-up: ratio {ray_total / seq_s:.2f}")


if __name__ == "__main__":
    main()
