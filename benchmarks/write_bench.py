"""Shard write throughput of the corpus writer vs a raw copy of the same bytes.

    python benchmarks/write_bench.py                 # 256 MB in 128 MB shards, local + SeaweedFS
    python benchmarks/write_bench.py --mb 2048 --shard-mb 1024 --no-s3

Generates ``--mb`` of samples (safetensors latents of ``--sample-kb`` each, JSON,
caption), then measures, each best of ``--repeat``:

- ``writer local``: ``CorpusWriter`` into a local folder, from rows in memory to
  committed shards + parquet parts (tar framing, JSON, fsync, rename);
- ``cp local``: copying the finished shard files to another folder of the same disk,
  with fsync (what a durable ``cp`` of the same bytes costs);
- ``writer s3``: ``CorpusWriter`` to ``s3://`` on a loopback SeaweedFS (``weed mini``,
  started here when ``weed`` is on PATH): temp tar, then (multipart) upload;
- ``put_object s3``: boto3 ``put_object`` of the same shard bytes from memory.

Throughput is shard bytes / wall time; the ratio column is writer / raw (goal >= 0.8).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from safetensors.numpy import save

import schemas
from pipeline.stages.base import rows_to_batch
from pipeline.writer import CorpusWriter, WriteConfig


def _batches(total: int, sample: int, per_batch: int = 16) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    n = max(1, total // sample)
    rows = []
    for i in range(n):
        latents = rng.standard_normal(sample // 2, dtype=np.float32).astype(np.float16)
        rows.append(
            {
                "source": f"/bench/v{i:06d}.mp4",
                "src_status": "done",
                "src_num_clips": 1,
                "clip_id": f"clip{i:06d}",
                "status": "kept",
                "caption": "a synthetic benchmark caption describing a scene " * 4,
                "latent_shape": [16, 1, 1, sample // 32],
                "num_tokens": sample // 128,
                "latents": save({schemas.TENSOR_LATENTS: latents.reshape(16, 1, 1, -1)}),
            }
        )
    return [
        rows_to_batch(rows[i : i + per_batch], columns=schemas.STREAM_COLUMNS)
        for i in range(0, n, per_batch)
    ]


def _write(root: str, batches: list[dict[str, np.ndarray]], shard_bytes: int) -> None:
    writer = CorpusWriter(root, WriteConfig(shard_max_bytes=shard_bytes))
    for batch in batches:
        writer.add(batch)
    writer.close()


def _best(fn: Callable[[int], None], repeat: int) -> float:
    times = []
    for i in range(repeat):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return min(times)


def _copy_fsync(src: Path, dst: Path) -> None:
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
        fout.flush()
        os.fsync(fout.fileno())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def _seaweed(workdir: str) -> Iterator[str]:
    """A loopback ``weed mini``; yields its S3 endpoint."""
    import boto3

    ports = {name: _free_port() for name in ("master", "volume", "filer", "s3", "admin")}
    args = [
        "weed", "mini", f"-dir={workdir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-webdav=false", "-admin.ui=false", "-master.telemetry=false",
        "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-filer.localSocket={workdir}/filer.sock", f"-s3.localSocket={workdir}/s3.sock",
    ]  # fmt: skip
    for name, port in ports.items():
        args += [f"-{name}.port={port}", f"-{name}.port.grpc={_free_port()}"]
    log = open(os.path.join(workdir, "weed.log"), "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    try:
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        deadline = time.monotonic() + 60
        while True:
            try:
                client.list_buckets()
                break
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"weed mini did not start; see {workdir}/weed.log") from None
                time.sleep(0.3)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--mb", type=int, default=256, help="sample bytes to write in total (MB)")
    p.add_argument("--shard-mb", type=int, default=128, help="target shard size (MB)")
    p.add_argument("--sample-kb", type=int, default=1024, help="latent bytes per sample (KB)")
    p.add_argument("--repeat", type=int, default=3, help="runs per measurement; best counts")
    p.add_argument("--no-s3", action="store_true", help="skip the SeaweedFS measurements")
    args = p.parse_args()
    batches = _batches(args.mb << 20, args.sample_kb << 10)
    shard_bytes = args.shard_mb << 20
    results: list[tuple[str, float, float]] = []  # (what, MB/s writer, MB/s raw)

    with tempfile.TemporaryDirectory(prefix="write-bench-") as tmp:
        roots = [os.path.join(tmp, f"w{i}") for i in range(args.repeat)]
        t_writer = _best(lambda i: _write(roots[i], batches, shard_bytes), args.repeat)
        shards = sorted(Path(roots[0], schemas.SHARDS_DIR).glob("*.tar"))
        total = sum(s.stat().st_size for s in shards)

        def copy_all(i: int) -> None:
            dest = Path(tmp, f"cp{i}")
            dest.mkdir()
            for s in shards:
                _copy_fsync(s, dest / s.name)

        t_cp = _best(copy_all, args.repeat)
        results.append(("local: writer vs cp+fsync", total / t_writer, total / t_cp))

        if not args.no_s3 and shutil.which("weed"):
            import boto3

            os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
            os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench-secret")
            os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
            weed_dir = os.path.join(tmp, "weed")
            os.mkdir(weed_dir)
            with _seaweed(weed_dir) as endpoint:
                os.environ["AWS_ENDPOINT_URL"] = endpoint
                client = boto3.client("s3", endpoint_url=endpoint)
                bucket = f"bench-{uuid.uuid4().hex[:8]}"
                client.create_bucket(Bucket=bucket)
                t_w3 = _best(
                    lambda i: _write(f"s3://{bucket}/w{i}", batches, shard_bytes), args.repeat
                )
                bodies = [s.read_bytes() for s in shards]

                def put_all(i: int) -> None:
                    for j, body in enumerate(bodies):
                        client.put_object(Bucket=bucket, Key=f"raw{i}/shard-{j:06d}.tar", Body=body)

                t_put = _best(put_all, args.repeat)
                results.append(("s3:    writer vs put_object", total / t_w3, total / t_put))

    mb = 1 << 20
    print(f"{len(shards)} shards, {total / mb:.1f} MB of shard bytes, best of {args.repeat}")
    print(f"{'measurement':<30} {'writer MB/s':>12} {'raw MB/s':>10} {'ratio':>7}")
    for what, w, raw in results:
        print(f"{what:<30} {w / mb:>12.1f} {raw / mb:>10.1f} {w / raw:>7.2f}")


if __name__ == "__main__":
    main()
