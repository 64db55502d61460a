"""Settings: parsed once, validated, and errors name the variable and the allowed range."""

from __future__ import annotations

from pathlib import Path

import pytest

from sllm.errors import ValidationFailed
from sllm.settings import ENVIRONMENT, GatewaySettings, NodeSettings, StoreSettings


def test_defaults() -> None:
    node = NodeSettings.from_env({"SLLM_HOME": "/data"})
    assert node.node_id == "node-0"
    assert node.cache_dir == Path("/data/cache/node-0")
    assert node.store.url == "/data/store"
    assert node.dram_capacity == 8 * 2**30
    gw = GatewaySettings.from_env({})
    assert gw.port == 8080 and gw.policy == "locality+migration"


def test_s3_settings_fall_back_to_aws_variables() -> None:
    store = StoreSettings.from_env(
        {"SLLM_STORE_URL": "s3://b/p", "AWS_ENDPOINT_URL": "http://x:1", "AWS_REGION": "eu"}
    )
    assert store.url == "s3://b/p"
    assert store.s3_endpoint == "http://x:1" and store.s3_region == "eu"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"SLLM_GATEWAY_PORT": "70000"},
            "SLLM_GATEWAY_PORT='70000': must be an integer in [1, 65535]",
        ),
        ({"SLLM_GATEWAY_PORT": "http"}, "SLLM_GATEWAY_PORT='http'"),
        ({"SLLM_POLICY": "fastest"}, "SLLM_POLICY='fastest': must be one of"),
        ({"SLLM_WAKE_TIMEOUT": "soon"}, "SLLM_WAKE_TIMEOUT='soon'"),
        ({"SLLM_S3_PATH_STYLE": "maybe"}, "must be true or false"),
        ({"SLLM_NATS_URL": "127.0.0.1:4222"}, "'127.0.0.1:4222' is not a NATS server URL"),
        ({"SLLM_NATS_URL": "nats://a:1,http://b:2"}, "'http://b:2' is not a NATS server URL"),
        ({"SLLM_NATS_URL": "nats://a:port"}, "'nats://a:port' is not a NATS server URL"),
        ({"SLLM_NATS_URL": " , "}, "must name at least one NATS server"),
        ({"SLLM_NATS_REPLICAS": "7"}, "SLLM_NATS_REPLICAS='7': must be an integer in [1, 5]"),
    ],
)
def test_gateway_settings_errors(env: dict[str, str], expected: str) -> None:
    with pytest.raises(ValidationFailed) as info:
        GatewaySettings.from_env(env)
    assert expected in str(info.value)


def test_node_settings_errors() -> None:
    with pytest.raises(ValidationFailed, match="SLLM_NODE_ID='Node 1'"):
        NodeSettings.from_env({"SLLM_NODE_ID": "Node 1"})
    with pytest.raises(ValidationFailed, match="SLLM_DRAM_CAPACITY='many'"):
        NodeSettings.from_env({"SLLM_DRAM_CAPACITY": "many"})
    with pytest.raises(ValidationFailed, match="SLLM_INSTANCES='docker': must be one of"):
        NodeSettings.from_env({"SLLM_INSTANCES": "docker"})
    assert NodeSettings.from_env({}).instances == "process"  # containers only when asked


def test_every_variable_is_documented() -> None:
    assert all(desc for _, desc in ENVIRONMENT.values())


def test_node_vllm_pool_and_spare() -> None:
    node = NodeSettings.from_env({})
    assert (node.vllm_pool_size, node.vllm_spare) == (1, 1)
    env = {"SLLM_VLLM_POOL_SIZE": "2", "SLLM_VLLM_SPARE": "0"}
    assert NodeSettings.from_env(env).vllm_spare == 0
    with pytest.raises(ValidationFailed, match="SLLM_VLLM_SPARE='-1'"):
        NodeSettings.from_env({"SLLM_VLLM_SPARE": "-1"})


def test_node_dram_preallocate() -> None:
    assert NodeSettings.from_env({}).dram_preallocate == 0
    assert NodeSettings.from_env({"SLLM_DRAM_PREALLOCATE": "2Gi"}).dram_preallocate == 2 << 30
    with pytest.raises(ValidationFailed, match="SLLM_DRAM_PREALLOCATE='9Gi': must be at most"):
        NodeSettings.from_env({"SLLM_DRAM_PREALLOCATE": "9Gi"})
    with pytest.raises(ValidationFailed, match="SLLM_DRAM_PREALLOCATE='lots'"):
        NodeSettings.from_env({"SLLM_DRAM_PREALLOCATE": "lots"})


def test_node_store_bandwidth_prior() -> None:
    assert NodeSettings.from_env({}).store_bandwidth == 0.0
    assert NodeSettings.from_env({"SLLM_STORE_BANDWIDTH": "125M"}).store_bandwidth == 125e6
    with pytest.raises(ValidationFailed, match="SLLM_STORE_BANDWIDTH='fast'"):
        NodeSettings.from_env({"SLLM_STORE_BANDWIDTH": "fast"})


def test_nats_urls_are_a_list() -> None:
    assert GatewaySettings.from_env({}).nats_urls == ("nats://127.0.0.1:4222",)
    three = "nats://10.0.0.1:4222, nats://10.0.0.2:4222,nats://nats-2.nats:4222"
    node = NodeSettings.from_env({"SLLM_NATS_URL": three})
    assert node.nats_urls == (
        "nats://10.0.0.1:4222",
        "nats://10.0.0.2:4222",
        "nats://nats-2.nats:4222",
    )
    assert GatewaySettings.from_env({"SLLM_NATS_REPLICAS": "3"}).nats_replicas == 3


def test_every_scheduler_policy_is_accepted_from_the_environment() -> None:
    # SLLM_POLICY accepted 4 names while --policy accepted the scheduler's 5.
    from gateway.scheduler.policies import POLICIES

    for policy in POLICIES:
        assert GatewaySettings.from_env({"SLLM_POLICY": policy}).policy == policy
    assert GatewaySettings.from_env({"SLLM_POLICY": "download-every-time"}).policy == (
        "download-every-time"
    )
