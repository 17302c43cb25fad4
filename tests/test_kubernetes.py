"""deploy/kubernetes without a cluster (issue 24): every overlay renders with `kubectl kustomize`, the output
validates offline against the Kubernetes API schemas (kubernetes-validate, strict, pinned version), and what the
manifests name agrees with what the code serves: ports, probe paths (asked of the real embedded server), the metric
names of the autoscaler's query (found in the real server's /metrics), the admin protocols and key, the images of
docker-compose.yml, and the command lines (parsed by the real `templar` parsers and config loader)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml

from templar.server.embedded import ADMIN_HEADER, ADMIN_KEY_ENV, ADMIN_PROTOCOLS, LIVE_PATH, READY_PATH
from templar.server.ports import DEFAULT_PORTS

ROOT = Path(__file__).resolve().parents[1]
KUBERNETES = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("cpu", "gpu", "trainer")
KUBERNETES_VERSION = "1.32.0"  # the schemas the manifests are validated against (kubectl 1.32's API)


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (with its built-in kustomize) is needed to render deploy/kubernetes"
    out = {}
    for overlay in OVERLAYS:
        result = subprocess.run([kubectl, "kustomize", str(KUBERNETES / "overlays" / overlay)], capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        out[overlay] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return out


def find(docs: list[dict], kind: str, name: str | None = None) -> dict:
    matches = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(matches) == 1, f"{kind} {name}: {len(matches)} found"
    return matches[0]


def container(docs: list[dict], kind: str = "Deployment", name: str = "templar-rm") -> dict:
    (found,) = [c for c in find(docs, kind, name)["spec"]["template"]["spec"]["containers"]]
    return found


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda o: f"{o}-overlay")  # "gpu" alone marks a GPU test
def test_every_overlay_renders_and_validates_offline(rendered, overlay):
    import kubernetes_validate

    docs = rendered[overlay]
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com"):
            continue  # a CRD: kubernetes-validate ships the core API's schemas only (checked below instead)
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    monitor = find(docs, "ServiceMonitor")
    service = find(docs, "Service", "templar-rm")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    assert {d["metadata"].get("namespace", "templar") for d in docs} == {"templar"}


def test_ports_probes_and_secrets_agree_with_the_code(rendered, triton):
    for overlay in OVERLAYS:
        docs = rendered[overlay]
        triton_container = container(docs)
        ports = {p["name"]: p["containerPort"] for p in triton_container["ports"]}
        assert ports == DEFAULT_PORTS
        service = find(docs, "Service", "templar-rm")
        assert service["spec"]["clusterIP"] == "None" and not service["spec"]["publishNotReadyAddresses"]
        assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == DEFAULT_PORTS
        assert triton_container["readinessProbe"]["httpGet"]["path"] == READY_PATH
        assert triton_container["startupProbe"]["httpGet"]["path"] == READY_PATH
        assert triton_container["livenessProbe"]["httpGet"]["path"] == LIVE_PATH
        key = [e for e in triton_container["env"] if e["name"] == ADMIN_KEY_ENV]
        secret = find(docs, "Secret", key[0]["valueFrom"]["secretKeyRef"]["name"])
        assert ADMIN_KEY_ENV in secret["stringData"]
        spec = find(docs, "Deployment", "templar-rm")["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] and spec["automountServiceAccountToken"] is False
        for c in spec["containers"] + spec.get("initContainers", []):
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    for path in (READY_PATH, LIVE_PATH):  # the paths the probes ask are answered by the real server
        with urllib.request.urlopen(f"{triton.http_url}{path}", timeout=10) as answer:
            assert answer.status == 200


def test_the_autoscaler_scales_on_metrics_triton_really_exports(rendered, triton):
    from templar.reward_client import RewardClient, RewardClientConfig
    from templar.samples import sample_conversations

    docs = rendered["cpu"]
    hpa = find(docs, "HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    rules = yaml.safe_load(find(docs, "ConfigMap", "templar-prometheus-adapter-rules")["data"]["config.yaml"])
    (rule,) = rules["rules"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == rule["name"]["as"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "templar-rm" and hpa["spec"]["minReplicas"] >= 2
    named = set(re.findall(r"\b(nv_[a-z_]+)\b", rule["seriesQuery"] + rule["metricsQuery"]))
    assert named == {"nv_inference_queue_duration_us", "nv_inference_request_success"}
    with RewardClient(RewardClientConfig(model="rm_llama3_1", endpoints=[triton.grpc_url])) as client:
        client.score([sample_conversations()["single_turn"]])  # the counters exist once a model has run
    with urllib.request.urlopen(triton.metrics_url, timeout=10) as answer:
        exported = set(re.findall(r"^(nv_[a-z_]+)\{", answer.read().decode(), re.MULTILINE))
    assert named <= exported, f"not exported by Triton: {named - exported}"


def test_the_command_lines_are_the_tools_own(rendered):
    """The commands in the manifests parse with the real parsers; the images and the GPU server's admin protocols
    are docker-compose.yml's; the trainer's overrides load as a config."""
    from templar.cli import build_parser
    from templar.trainer.config import load_config

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    images = {compose["services"]["trainer"]["image"], compose["services"]["triton"]["image"]}
    serve = container(rendered["cpu"])["args"]
    args = build_parser(serve[1:]).parse_args(serve[1:])
    assert (args.command, str(args.repo), args.host) == ("serve", "/models", "0.0.0.0")
    assert (args.grpc_port, args.http_port, args.metrics_port) == tuple(DEFAULT_PORTS[k] for k in
                                                                         ("grpc", "http", "metrics"))
    gpu = " ".join(container(rendered["gpu"])["args"])
    restricted = re.findall(r"--(?:grpc-restricted-protocol|http-restricted-api)=([\w,-]+):([\w-]+)=", gpu)
    assert restricted == [(",".join(ADMIN_PROTOCOLS), ADMIN_HEADER)] * 2
    for overlay in OVERLAYS:
        used = {c["image"] for kind in ("Deployment", "Job") for d in rendered[overlay] if d["kind"] == kind
                for c in d["spec"]["template"]["spec"]["containers"] + d["spec"]["template"]["spec"].get(
                    "initContainers", [])}
        assert used <= images, f"{overlay}: {used - images} is not an image docker-compose.yml builds"
    export = find(rendered["cpu"], "Deployment")["spec"]["template"]["spec"]["initContainers"][0]
    trainer = container(rendered["trainer"], "Job", "templar-trainer")
    env = {e["name"]: e["value"] for e in trainer["env"]}
    for command in (export["command"][2], trainer["command"][2]):
        argv = shlex.split(command.split("exec ", 1)[1].replace("$TEMPLAR_REWARD_URL", env["TEMPLAR_REWARD_URL"])
                           .replace('"$TEMPLAR_CONFIG"', "configs/demo.yaml"))
        args = build_parser(argv[1:]).parse_args(argv[1:])
        config = load_config(ROOT / args.config, args.overrides)
        assert args.command == "train" and config.output_dir.startswith(("/runs", "/tmp"))
    assert config.reward.url == "dns:///templar-rm.templar.svc.cluster.local:8001"
    job = find(rendered["trainer"], "Job")
    assert int(env["WORLD_SIZE"]) == job["spec"]["completions"] == job["spec"]["parallelism"]
    pod_zero = f"{job['metadata']['name']}-0"
    assert env["MASTER_ADDR"].split(".") == [pod_zero, job["spec"]["template"]["spec"]["subdomain"]]
    policy = find(rendered["trainer"], "NetworkPolicy")
    allowed = policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchExpressions"][0]["values"]
    assert job["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] in allowed
