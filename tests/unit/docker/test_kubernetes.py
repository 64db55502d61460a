"""The Kubernetes manifests (docker/kubernetes/) hold together, offline: every resource passes
the Kubernetes API's JSON schema (the ``kubernetes-validate`` package ships them; strict, so a
misspelt field fails), and what the manifests say agrees with the code: probes on routes the
gateway serves, variables the settings know, the NATS URLs a client accepts, a /dev/shm big
enough for the DRAM tier, replicas matching the NATS cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from sllm.nats_auth import ROUTE_USER
from sllm.settings import ENVIRONMENT, as_nats_urls
from sllm.spec import parse_duration, parse_memory
from sllm_cli.gateway import STOP_BACKSTOP_S

DEPLOY = Path(__file__).resolve().parents[3] / "docker" / "kubernetes"
MANIFESTS = ["config.yaml", "secrets.yaml", "gateway.yaml", "node.yaml"]
# The oldest Kubernetes still widely run, and the newest the package knows.
VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]


def _docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def _all() -> list[dict[str, Any]]:
    return [d for name in MANIFESTS for d in _docs(name)]


def _one(kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in _all() if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def _container(workload: dict[str, Any]) -> dict[str, Any]:
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return container


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", MANIFESTS)
def test_every_resource_passes_the_api_schema(name: str, version: str) -> None:
    for doc in _docs(name):
        kubernetes_validate.validate(doc, version, strict=True)


def test_a_misspelt_field_is_caught() -> None:
    """The validator is strict: the check above can fail."""
    gateway = _one("Deployment", "sllm-gateway")
    _container(gateway)["readinesProbe"] = _container(gateway).pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(gateway, VERSIONS[-1], strict=True)


def test_gateways_are_replicated_behind_a_service_with_health_probes() -> None:
    from gateway.routes.ops import routes

    gateway = _one("Deployment", "sllm-gateway")
    assert gateway["spec"]["replicas"] >= 2
    labels = gateway["spec"]["template"]["metadata"]["labels"]
    service = _one("Service", "sllm-gateway")
    assert service["spec"]["selector"].items() <= labels.items()
    container = _container(gateway)
    port_names = {p["name"] for p in container["ports"]}
    served = {route.path for route in routes}
    for probe in ("readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] in served and get["port"] in port_names
    assert {"name": "SLLM_GATEWAY_PORT", "value": "8080"} in container["env"]
    assert container["ports"][0]["containerPort"] == 8080
    budget = _one("PodDisruptionBudget", "sllm-gateway")
    assert budget["spec"]["minAvailable"] >= 1
    # a stopping gateway ends its streams with an error event before Kubernetes kills it
    env = {e["name"]: e.get("value") for e in container["env"]}
    grace = parse_duration(env["SLLM_SHUTDOWN_GRACE"], "SLLM_SHUTDOWN_GRACE")
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    total = pre_stop + grace + STOP_BACKSTOP_S
    assert total < gateway["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]


def _env_names(container: dict[str, Any]) -> set[str]:
    names = {e["name"] for e in container.get("env", [])}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef") or source.get("secretRef")
        kind = "ConfigMap" if "configMapRef" in source else "Secret"
        doc = _one(kind, ref["name"])
        names |= set(doc.get("data", {})) | set(doc.get("stringData", {}))
    return names


@pytest.mark.parametrize(
    ("kind", "name"), [("Deployment", "sllm-gateway"), ("DaemonSet", "sllm-node")]
)
def test_every_variable_is_a_setting(kind: str, name: str) -> None:
    names = _env_names(_container(_one(kind, name)))
    unknown = {n for n in names if n not in ENVIRONMENT}
    assert unknown == set()


def test_nats_urls_name_the_three_servers_of_the_chart() -> None:
    config = _one("ConfigMap", "sllm-config")["data"]
    urls = as_nats_urls(config["SLLM_NATS_URL"])
    values = yaml.safe_load((DEPLOY / "nats-values.yaml").read_text())
    cluster = values["config"]["cluster"]
    assert cluster["enabled"] and len(urls) == cluster["replicas"] == 3
    assert [u.split("//")[1].split(".")[0] for u in urls] == ["nats-0", "nats-1", "nats-2"]
    assert int(config["SLLM_NATS_REPLICAS"]) == cluster["replicas"]
    store = values["config"]["jetstream"]["fileStore"]
    assert values["config"]["jetstream"]["enabled"] and store["enabled"] and store["pvc"]["enabled"]
    assert "auth.conf" in values["configMap"]["merge"]["data"]
    # routes authenticate as the user sllm's own clusters use (sllm.nats_auth)
    assert cluster["routeURLs"]["user"] == ROUTE_USER and cluster["routeURLs"]["password"]


def test_nodes_own_their_gpus_and_caches() -> None:
    node = _one("DaemonSet", "sllm-node")
    spec = node["spec"]["template"]["spec"]
    container = _container(node)
    env = {e["name"]: e for e in container["env"]}
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert env["SLLM_NODE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["SLLM_NODE_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert "hostPath" in volumes[mounts[env["SLLM_CACHE_DIR"]["value"]]]
    shm = volumes[mounts["/dev/shm"]]["emptyDir"]
    assert shm["medium"] == "Memory"
    dram = parse_memory(env["SLLM_DRAM_CAPACITY"]["value"], "SLLM_DRAM_CAPACITY")
    assert parse_memory(shm["sizeLimit"], "sizeLimit") > dram
    assert parse_memory(container["resources"]["limits"]["memory"], "memory") > dram
    # The pod outlives the node's drain of its instances.
    drain = parse_duration(container["args"][container["args"].index("--drain") + 1], "--drain")
    assert spec["terminationGracePeriodSeconds"] > drain


def test_store_credentials_come_from_a_secret() -> None:
    secret = _one("Secret", "sllm-s3")["stringData"]
    assert set(secret) == {"SLLM_S3_ACCESS_KEY_ID", "SLLM_S3_SECRET_ACCESS_KEY"}
    for kind, name in (("Deployment", "sllm-gateway"), ("DaemonSet", "sllm-node")):
        refs = [s.get("secretRef", {}).get("name") for s in _container(_one(kind, name))["envFrom"]]
        assert "sllm-s3" in refs
