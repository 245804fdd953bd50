"""The KubeRay manifests and the container image definition in ``infra/``.

No Kubernetes here, and no KubeRay CRD schema ships in any package we can install, so
each manifest is checked two ways: against the fields the KubeRay ``ray.io/v1`` CRDs
require (and the invariants the operator enforces: replica bounds, a head container
image, GPU limits), and by Ray's own KubeRay autoscaler, which derives node types
from a RayCluster spec exactly as the in-tree autoscaler sidecar does on a cluster.
The Ray versions of ``pyproject.toml``'s pin, the Dockerfile's base image, the
manifests' ``rayVersion`` and the image tags must all agree.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import tomllib
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
SECRET = "reelpack-s3"
MANIFESTS = sorted(INFRA.glob("*.yaml"))


def _load(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} holds no YAML document"
    return docs


def _docs(kind: str) -> list[dict[str, Any]]:
    return [d for p in MANIFESTS for d in _load(p) if d.get("kind") == kind]


def _pinned_ray() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        m = re.fullmatch(r"ray(\[[^\]]*\])?>=([\d.]+)", dep.replace(" ", ""))
        if m:
            return m.group(2)
    raise AssertionError(f"no `ray>=` pin in pyproject.toml dependencies: {deps}")


def _full(version: str) -> str:
    """``2.40`` -> ``2.40.0``."""
    parts = version.split(".")
    return ".".join(parts + ["0"] * (3 - len(parts)))


def _tag_ray_version(image: str) -> str:
    m = re.search(r"ray-?(\d+\.\d+\.\d+)", image.rsplit("/", 1)[-1])
    assert m, f"image {image!r}: its tag names no Ray version (ray2.40.0)"
    return m.group(1)


def _cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    specs = [(f"RayCluster {d['metadata']['name']}", d["spec"]) for d in _docs("RayCluster")]
    specs += [
        (f"RayJob {d['metadata']['name']}", d["spec"]["rayClusterSpec"]) for d in _docs("RayJob")
    ]
    return specs


def _containers(group: dict[str, Any]) -> list[dict[str, Any]]:
    return list(group["template"]["spec"]["containers"])


def _quantity(value: Any) -> float:
    return float(str(value))


# --- the files exist and parse ------------------------------------------------------------


def test_infra_files_exist() -> None:
    for name in ("Dockerfile", "README.md", "raycluster.yaml", "rayjob.yaml"):
        assert (INFRA / name).is_file(), f"infra/{name} is missing"
    assert {d["kind"] for p in MANIFESTS for d in _load(p)} >= {"RayCluster", "RayJob"}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_header(path: Path) -> None:
    for doc in _load(path):
        assert doc["apiVersion"] == "ray.io/v1", f"{path.name}: apiVersion {doc.get('apiVersion')}"
        assert doc["kind"] in ("RayCluster", "RayJob", "RayService")
        name = doc["metadata"]["name"]
        # Kubernetes object names are DNS-1123 subdomains; KubeRay derives service
        # names from it, so keep it a label too.
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", name), name
        assert isinstance(doc["spec"], dict)


# --- RayClusterSpec structure -----------------------------------------------------------------


@pytest.mark.parametrize(
    "where,spec", _cluster_specs(), ids=lambda x: x if isinstance(x, str) else ""
)
def test_cluster_spec_structure(where: str, spec: dict[str, Any]) -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+", str(spec["rayVersion"])), f"{where}: rayVersion"
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict), f"{where}: head rayStartParams"
    # Every rayStartParams value is a string in the CRD (map[string]string).
    groups = [head, *spec["workerGroupSpecs"]]
    for g in groups:
        assert all(isinstance(v, str) for v in g["rayStartParams"].values()), g["rayStartParams"]
        containers = _containers(g)
        assert containers and containers[0]["image"] and containers[0]["name"]
    # job submission goes through the dashboard, which must listen beyond the pod
    assert head["rayStartParams"].get("dashboard-host") == "0.0.0.0"
    names = [g["groupName"] for g in spec["workerGroupSpecs"]]
    assert len(set(names)) == len(names), f"{where}: duplicate groupName in {names}"
    for g in spec["workerGroupSpecs"]:
        lo, n, hi = g["minReplicas"], g["replicas"], g["maxReplicas"]
        assert all(isinstance(v, int) for v in (lo, n, hi)), g["groupName"]
        assert 0 <= lo <= n <= hi, f"{where} group {g['groupName']}: {lo} <= {n} <= {hi} broken"
        assert hi >= 1, f"{where} group {g['groupName']} can never run a worker"


@pytest.mark.parametrize(
    "where,spec", _cluster_specs(), ids=lambda x: x if isinstance(x, str) else ""
)
def test_cpu_and_gpu_groups(where: str, spec: dict[str, Any]) -> None:
    gpu_groups, cpu_groups = [], []
    for g in spec["workerGroupSpecs"]:
        res = _containers(g)[0].get("resources", {})
        limits, requests = res.get("limits", {}), res.get("requests", {})
        if "nvidia.com/gpu" in limits:
            gpus = _quantity(limits["nvidia.com/gpu"])
            assert gpus >= 1 and gpus == int(gpus), f"{where}: whole GPUs per pod, got {gpus}"
            # extended resources: requests, when given, must equal limits
            if "nvidia.com/gpu" in requests:
                assert _quantity(requests["nvidia.com/gpu"]) == gpus
            gpu_groups.append(g["groupName"])
        else:
            assert "nvidia.com/gpu" not in requests, f"{where}: GPU request without a limit"
            cpu_groups.append(g["groupName"])
        assert "cpu" in limits and "memory" in limits, f"{where} {g['groupName']}: no limits"
    assert gpu_groups, f"{where}: no worker group with an nvidia.com/gpu limit"
    assert cpu_groups, f"{where}: no CPU-only worker group"


@pytest.mark.parametrize(
    "where,spec", _cluster_specs(), ids=lambda x: x if isinstance(x, str) else ""
)
def test_autoscaling_enabled(where: str, spec: dict[str, Any]) -> None:
    assert spec.get("enableInTreeAutoscaling") is True, f"{where}: autoscaling off"
    opts = spec.get("autoscalerOptions", {})
    assert opts.get("upscalingMode", "Default") in ("Default", "Conservative", "Aggressive")
    assert any(g["maxReplicas"] > g["minReplicas"] for g in spec["workerGroupSpecs"]), (
        f"{where}: no group can scale"
    )


def _secret_refs(container: dict[str, Any]) -> set[str]:
    refs = {e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e}
    refs |= {
        e["valueFrom"]["secretKeyRef"]["name"]
        for e in container.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    return refs


@pytest.mark.parametrize(
    "where,spec", _cluster_specs(), ids=lambda x: x if isinstance(x, str) else ""
)
def test_s3_secret_in_every_container(where: str, spec: dict[str, Any]) -> None:
    # Every node can run a stage that reads or writes S3, and the head runs the writer.
    for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        for c in _containers(g):
            assert SECRET in _secret_refs(c), f"{where} {g.get('groupName', 'head')}: no {SECRET}"
    readme = (INFRA / "README.md").read_text()
    assert f"kubectl create secret generic {SECRET}" in readme


def test_ray_autoscaler_reads_the_cluster() -> None:
    """Ray's KubeRay autoscaler derives the node types (CPU/GPU per worker, bounds) from
    the RayCluster spec as on a real cluster; our groups must come out as intended."""
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )

    for where, spec in _cluster_specs():
        cr = {"metadata": {"name": "reelpack", "namespace": "default"}, "spec": spec}
        config = _derive_autoscaling_config_from_ray_cr(cr)
        types = config["available_node_types"]
        assert types["headgroup"]["resources"].get("CPU", 0) == 0, where  # num-cpus "0"
        for g in spec["workerGroupSpecs"]:
            node = types[g["groupName"]]
            assert (node["min_workers"], node["max_workers"]) == (
                g["minReplicas"],
                g["maxReplicas"],
            )
            limits = _containers(g)[0]["resources"]["limits"]
            assert node["resources"]["CPU"] == int(_quantity(limits["cpu"])), where
            assert node["resources"].get("GPU", 0) == _quantity(limits.get("nvidia.com/gpu", 0))
        assert config["max_workers"] == sum(g["maxReplicas"] for g in spec["workerGroupSpecs"])


# --- the RayJob entrypoint ------------------------------------------------------------------


def test_rayjob_entrypoint_runs_an_existing_job_script() -> None:
    jobs = _docs("RayJob")
    assert jobs
    for job in jobs:
        argv = shlex.split(job["spec"]["entrypoint"])
        assert argv[0] == "python", argv
        script = argv[1]
        assert script == "jobs/build_corpus.py", argv
        assert (REPO / script).is_file()
        assert "--out" in argv, "the build needs --out"
        # the relative script path resolves in the image's copy of the repo
        runtime_env = yaml.safe_load(job["spec"].get("runtimeEnvYAML", "{}"))
        assert runtime_env["working_dir"] == "/app"
        assert job["spec"].get("shutdownAfterJobFinishes") is True


def test_entrypoint_flags_parse() -> None:
    """The RayJob's arguments are ones `reelpack build` accepts."""
    from reelpack.cli import _parser

    for job in _docs("RayJob"):
        argv = shlex.split(job["spec"]["entrypoint"])[2:]
        args = _parser().parse_args(["build", *argv])
        assert args.out and args.sources


def test_the_default_build_fits_each_cluster_as_it_starts() -> None:
    """Before autoscaling adds a node, the build's resource check (pipeline.graph) must
    place every model stage of the RayJob's config on the groups' starting replicas."""
    from pipeline.config import load_config
    from pipeline.graph import check_resources

    for where, spec in _cluster_specs():
        head_cpus = spec["headGroupSpec"]["rayStartParams"].get("num-cpus", "0")
        nodes = [{"CPU": _quantity(head_cpus)}]
        for g in spec["workerGroupSpecs"]:
            limits = _containers(g)[0]["resources"]["limits"]
            node = {
                "CPU": _quantity(limits["cpu"]),
                "GPU": _quantity(limits.get("nvidia.com/gpu", 0)),
            }
            nodes += [node] * g["replicas"]
        assert any(n.get("GPU", 0) > 0 for n in nodes), where
        check_resources(load_config(preset="default"), nodes)


# --- one Ray version everywhere ---------------------------------------------------------------


def _dockerfile_base() -> str:
    text = (INFRA / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, flags=re.M))
    m = re.search(r"^FROM\s+(\S+)", text, flags=re.M)
    assert m, "Dockerfile has no FROM"
    base = m.group(1)
    ref = re.fullmatch(r"\$\{?(\w+)\}?", base)
    return args[ref.group(1)] if ref else base


def test_dockerfile_installs_the_package() -> None:
    text = (INFRA / "Dockerfile").read_text()
    assert re.search(r"^RUN\s.*pip install\b.*\s\.(\s|$)", text, flags=re.M), "no `pip install .`"
    assert re.search(r"^COPY\b.*\bjobs\b", text, flags=re.M), "jobs/ not in the image"
    assert re.search(r"^WORKDIR\s+/app\s*$", text, flags=re.M), "the RayJob expects /app"


def test_ray_versions_agree() -> None:
    pinned = _full(_pinned_ray())
    base = _dockerfile_base()
    m = re.fullmatch(r"rayproject/ray(?:-ml)?:(\d+\.\d+\.\d+)(-[\w.-]+)?", base)
    assert m, f"Dockerfile base {base!r} is not an official rayproject/ray:<version> image"
    assert m.group(1) == pinned, f"Dockerfile Ray {m.group(1)} != pyproject pin {pinned}"
    for where, spec in _cluster_specs():
        assert spec["rayVersion"] == pinned, f"{where}: rayVersion {spec['rayVersion']}"
        for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            for c in _containers(g):
                assert _tag_ray_version(c["image"]) == pinned, f"{where}: image {c['image']}"
