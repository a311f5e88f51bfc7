"""deploy/kubernetes: every manifest of the overlays valid for a current Kubernetes, and the
Deployment's probes, ports, grace period and command in agreement with the server's CLI."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from server.cli import build_parser
from tests.server.launch import ROOT

KUBE = Path(ROOT) / "deploy" / "kubernetes"
OVERLAYS = ["cpu", "gpu", "gpu-tp"]
VERSION = "1.34.0"  # a current release, supported by kubernetes-validate's bundled schemas


def render(directory: Path) -> list[dict]:
    """The overlay's objects: its kustomization's resources, in order (files, or directories
    with a kustomization of their own). Our overlays only list resources, so this is exactly
    what `kubectl kustomize` builds (checked below where kubectl is installed)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert set(kustomization) <= {"apiVersion", "kind", "resources"}, "a kustomize feature render() does not do"
    out = []
    for entry in kustomization["resources"]:
        path = (directory / entry).resolve()
        out += render(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    return out


def _by_kind(docs: list[dict]) -> dict[str, dict]:
    return {d["kind"]: d for d in docs}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_is_valid_for_a_current_kubernetes(overlay):
    docs = render(KUBE / overlay)
    assert sorted(d["kind"] for d in docs) == ["Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                                                "Service"]
    for doc in docs:
        kubernetes_validate.validate(doc, VERSION, strict=True)


def test_the_validator_catches_what_it_should():
    deployment = _by_kind(render(KUBE / "cpu"))["Deployment"]
    deployment["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 45  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSION, strict=True)


@pytest.mark.skipif(not shutil.which("kubectl"), reason="kubectl is not installed (render() is used alone)")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_render_matches_kubectl_kustomize(overlay):
    built = subprocess.run(["kubectl", "kustomize", str(KUBE / overlay)], capture_output=True, text=True,
                           check=True, timeout=60).stdout
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted(yaml.safe_load_all(built), key=key) == sorted(render(KUBE / overlay), key=key)


def _container(overlay: str) -> tuple[dict, dict]:
    pod = _by_kind(render(KUBE / overlay))["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_deployment_agrees_with_the_cli(overlay):
    pod, c = _container(overlay)
    command = c["command"]
    assert command[:2] == ["/app/.venv/bin/kvserve", "serve"]
    args = build_parser().parse_args(command[1:])  # the server's own parser accepts every flag
    (port,) = c["ports"]
    assert port["containerPort"] == args.port == 8000 and port["name"] == "http"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    pause = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    # the kubelet kills the pod only after the pause and the server's whole drain
    assert pod["terminationGracePeriodSeconds"] > pause + args.shutdown_timeout
    secret = {"secretKeyRef": {"name": "kvserve", "key": "api-key"}}
    assert c["env"] == [{"name": "KVSERVE_API_KEY", "valueFrom": secret}]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001
    assert c["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert "/app/.cache" in mounts and mounts <= {"/app/.cache", "/dev/shm"}  # the image's KVSERVE_CACHE_DIR
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]


def test_cpu_and_gpu_deployments_differ_only_in_the_gpu_parts():
    cpu_pod, cpu = _container("cpu")
    gpu_pod, gpu = _container("gpu")
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1 and "nvidia.com/gpu" not in cpu["resources"]["limits"]
    assert gpu_pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    for pod, c in ((cpu_pod, cpu), (gpu_pod, gpu)):
        c.pop("image"), c.pop("resources"), pod.pop("tolerations", None)
    assert cpu_pod == gpu_pod


def test_the_autoscaler_reads_the_queue_the_adapter_serves():
    hpa = _by_kind(render(KUBE / "cpu"))["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "kvserve"}
    (metric,) = hpa["spec"]["metrics"]
    (rule,) = yaml.safe_load((KUBE / "prometheus-adapter-values.yaml").read_text())["rules"]["custom"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == rule["name"]["as"]
    assert rule["seriesQuery"].startswith("kvserve:num_requests_waiting{")


def test_the_tensor_parallel_deployment_is_the_gpu_one_split_over_its_gpus():
    """gpu-tp: as many ranks as GPUs, a RAM-backed /dev/shm for NCCL; nothing else differs from gpu."""
    one_pod, one = _container("gpu")
    tp_pod, tp = _container("gpu-tp")
    args = build_parser().parse_args(tp["command"][1:])
    gpus = tp["resources"]["limits"]["nvidia.com/gpu"]
    assert args.tensor_parallel_size == gpus == tp["resources"]["requests"]["nvidia.com/gpu"] > 1
    (shm,) = [v for v in tp_pod["volumes"] if v["name"] == "shm"]
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "shm", "mountPath": "/dev/shm"} in tp["volumeMounts"]
    tp["command"] = tp["command"][:-2]  # --tensor-parallel-size N, last
    tp["volumeMounts"].remove({"name": "shm", "mountPath": "/dev/shm"})
    tp_pod["volumes"].remove(shm)
    tp.pop("resources"), one.pop("resources")
    assert tp_pod == one_pod
