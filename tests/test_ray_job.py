"""``ray job submit`` of ``jobs/build_corpus.py`` against a real ``ray start --head`` cluster.

The cluster is this test's own: every port is a free loopback port, its files live in
a dedicated ``--temp-dir``, and it runs as ``ray start --head --block`` in its own
process group, which the test ends by process-group id (``ray stop`` would stop every
Ray on the machine, not only this one). The job is submitted with the CLI exactly as
infra/README.md says — a working directory holding the code, the entrypoint after
``--`` — and polled until it ends; the corpus it wrote must be complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.synth import synth_video
from pipeline.writer import read_index, read_sources

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
_CODE = ("jobs", "pipeline", "model", "reelpack", "schemas", "pyproject.toml")
_START_TIMEOUT_S = 120.0
_JOB_TIMEOUT_S = 240.0


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _ray_exe() -> str:
    exe = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    if not Path(exe).exists():
        pytest.fail("the `ray` command is not installed", pytrace=False)
    return exe


@dataclass
class LocalCluster:
    dashboard: str  # http://127.0.0.1:PORT, the job submission address
    temp_dir: str
    proc: subprocess.Popen[bytes]
    log: Path


_TOKEN = secrets.token_hex(32)


def _env() -> dict[str, str]:
    """Environment of the head, the job (it inherits the head's) and every `ray` CLI call."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update(
        RAY_USAGE_STATS_ENABLED="0",
        # Ray resolves 127.0.0.1 to the machine's first non-loopback address unless
        # told that this is a single-machine cluster: keep every Ray address on loopback.
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        # Ray >= 2.5x enables token auth for new clusters; give ours its own token so
        # neither ~/.ray/auth_token nor another cluster's token is involved.
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=_TOKEN,
    )
    return env


def _ray_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_ray_exe(), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
        check=False,
    )


def _wait_dashboard(cluster: LocalCluster) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    last = ""
    while time.monotonic() < deadline:
        if cluster.proc.poll() is not None:
            break
        res = _ray_cli("job", "list", "--address", cluster.dashboard, timeout=60)
        if res.returncode == 0:
            return
        last = res.stderr[-500:]
        time.sleep(2.0)
    pytest.fail(
        f"ray head not ready in {_START_TIMEOUT_S:.0f} s (exit {cluster.proc.poll()}; {last}):\n"
        + cluster.log.read_text(errors="replace")[-3000:]
    )


def _kill_group(proc: subprocess.Popen[bytes], temp_dir: str) -> None:
    """End the head's process group, then any process still holding our temp dir."""
    for sig, wait_s in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        break
    time.sleep(1.0)
    for pid_dir in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (
                (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            )
        except OSError:
            continue
        if temp_dir in cmdline and int(pid_dir.name) != os.getpid():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(pid_dir.name), signal.SIGKILL)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    # Short path: Ray's unix sockets live under the temp dir (108-byte limit).
    temp_dir = tempfile.mkdtemp(prefix="rp-ray-", dir="/tmp")
    gcs, dash, agent, agent_grpc, renv, metrics, node_mgr, obj_mgr = _free_ports(8)
    args = [
        _ray_exe(), "start", "--head", "--block",
        "--node-ip-address", "127.0.0.1",
        "--port", str(gcs),
        "--include-dashboard", "true",
        "--dashboard-host", "127.0.0.1",
        "--dashboard-port", str(dash),
        "--dashboard-agent-listen-port", str(agent),
        "--dashboard-agent-grpc-port", str(agent_grpc),
        "--runtime-env-agent-port", str(renv),
        "--metrics-export-port", str(metrics),
        "--node-manager-port", str(node_mgr),
        "--object-manager-port", str(obj_mgr),
        "--num-cpus", "2",
        "--temp-dir", temp_dir,
        "--disable-usage-stats",
    ]  # fmt: skip
    log = Path(temp_dir) / "ray-start.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            args, stdout=fh, stderr=subprocess.STDOUT, env=_env(), start_new_session=True
        )
    c = LocalCluster(f"http://127.0.0.1:{dash}", temp_dir, proc, log)
    try:
        _wait_dashboard(c)
        yield c
    finally:
        _kill_group(proc, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _working_dir(dest: Path) -> Path:
    """The code a user's ``--working-dir .`` would upload (no tests, caches or data)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in _CODE:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        else:
            shutil.copy2(src, dest / name)
    return dest


def _wait_job(address: str, job_id: str) -> str:
    """Poll ``ray job status`` until the job ends (bounded); return its logs."""
    deadline = time.monotonic() + _JOB_TIMEOUT_S
    status, text = "", ""
    while time.monotonic() < deadline:
        res = _ray_cli("job", "status", job_id, "--address", address, "--log-style", "record")
        text = re.sub(r"\x1b\[[0-9;]*m", "", res.stdout + res.stderr)  # colour codes
        # "Job 'x' succeeded" when it ended, "... status: RUNNING" while it runs
        found = re.search(
            r"Job '[^']+' (succeeded|failed|stopped)|\b(PENDING|RUNNING|SUCCEEDED|FAILED|STOPPED)\b",
            text,
        )
        status = (found.group(1) or found.group(2)).upper() if found else ""
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(3.0)
    else:
        _ray_cli("job", "stop", job_id, "--address", address, "--no-wait")
    logs = _ray_cli("job", "logs", job_id, "--address", address).stdout
    assert status == "SUCCEEDED", (
        f"job {job_id} ended {status or 'unknown'} ({text[-600:]}); logs:\n{logs[-3000:]}"
    )
    return logs


def _run_job(
    cluster: LocalCluster, job_id: str, work: Path, runtime_env: dict, script: list[str]
) -> str:
    """``ray job submit`` of ``python SCRIPT...`` from ``work``; waits for it to succeed and
    returns its logs."""
    submit = _ray_cli(
        "job", "submit",
        "--address", cluster.dashboard,
        "--submission-id", job_id,
        "--working-dir", str(work),
        "--runtime-env-json", json.dumps(runtime_env),
        "--no-wait",
        "--",
        "python", *script,
        timeout=180,
    )  # fmt: skip
    assert submit.returncode == 0, submit.stdout[-2000:] + submit.stderr[-2000:]
    assert job_id in submit.stdout + submit.stderr
    return _wait_job(cluster.dashboard, job_id)


def test_build_corpus_job(cluster: LocalCluster, tmp_path: Path) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    synth_video(str(videos / "wide.mp4"), width=160, height=90, fps=12.0, shots=[24, 24], seed=0)
    synth_video(str(videos / "tall.mp4"), width=90, height=160, fps=12.0, shots=[30], seed=1)
    (videos / "broken.mp4").write_bytes(b"not a video")
    out = tmp_path / "corpus"
    work = _working_dir(tmp_path / "work")
    runtime_env = {
        # the tiny preset builds its random-weight models here, not in ~/.cache
        "env_vars": {"REELPACK_CACHE": str(tmp_path / "models"), "HF_HUB_OFFLINE": "1"}
    }
    job_id = f"reelpack-test-{os.getpid()}-{int(time.time())}"
    build = ["jobs/build_corpus.py", str(videos), "--out", str(out), "--preset", "tiny"]
    logs = _run_job(cluster, job_id, work, runtime_env, build)
    # the driver ran in the uploaded working dir, against this cluster
    assert "sources" in logs

    sources = {r["source"]: r for r in read_sources(str(out)).to_pylist()}
    assert set(sources) == {str(p) for p in videos.iterdir()}
    assert sources[str(videos / "broken.mp4")]["status"] == "error"
    index = read_index(str(out)).to_pylist()
    assert index and len({r["clip_id"] for r in index}) == len(index)
    for s, row in sources.items():
        assert sum(r["source"] == s for r in index) == (row["num_clips"] or 0)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["clips"] == len(index)
    assert (tmp_path / "models" / "tiny").is_dir(), "the job did not use REELPACK_CACHE"

    # the report job, on the same cluster, writes its page where it is told
    report = tmp_path / "reports" / "v1.html"
    report_job = ["jobs/report.py", str(out), "--out", str(report), "--samples", "2"]
    logs = _run_job(cluster, f"{job_id}-report", work, runtime_env, report_job)
    assert str(report) in logs
    page = report.read_text()
    assert page.startswith("<!DOCTYPE html>") and f"<td>clips</td><td>{len(index)}</td>" in page
