"""Each bad input of issue 5 against the real gateway, node and NATS: the status, a message
naming what was wrong, and nothing reaches the node (the function never gets an instance)."""

from __future__ import annotations

import httpx
import pytest

from .conftest import AUTH, Cluster

pytestmark = pytest.mark.integration

MSG = [{"role": "user", "content": "x"}]
CASES = [
    ("/function/missing", {"prompt": "x"}, 404, "'missing' is not deployed"),
    (
        "/v1/chat/completions",
        {"model": "missing", "messages": MSG},
        404,
        "'missing' does not exist",
    ),
    ("/function/never", b'{"prompt": "x",}', 400, "invalid JSON"),
    ("/v1/chat/completions", b"{", 400, "invalid JSON"),
    ("/function/never", {"prompt": "x", "max_tokens": -5}, 400, "max_tokens"),
    ("/function/never", {"prompt": "x", "max_tokens": 10**7}, 400, "max_tokens"),
    ("/function/never", {"prompt": "x", "temperature": 2.5}, 400, "temperature"),
    ("/function/never", {"messages": []}, 400, "messages"),
    ("/function/never", {"prompt": ["x"]}, 400, "prompt"),
    ("/v1/chat/completions", {"model": "never", "messages": []}, 400, "messages"),
    (
        "/v1/chat/completions",
        {"model": "never", "messages": MSG, "temperature": -1},
        400,
        "temperature",
    ),
    (
        "/v1/chat/completions",
        {"model": "never", "messages": MSG, "max_tokens": "10"},
        400,
        "max_tokens",
    ),
    ("/v1/completions", {"model": "never", "prompt": "x", "top_p": 7}, 400, "top_p"),
    ("/function/never", b'{"prompt": "' + b"x" * 70_000 + b'"}', 413, "limit"),
    # issue 14: these reached the instance (TypeError in its tokenizer) or failed with 500
    ("/function/never", b'{"prompt": "a\\ud800b"}', 400, "prompt: not valid Unicode"),
    (
        "/v1/chat/completions",
        b'{"model": "never", "messages": [{"role": "user", "content": "a\\udc00"}]}',
        400,
        "messages[0].content: not valid Unicode",
    ),
    ("/function/never", b"[" * 20_000 + b"]" * 20_000, 400, "nested too deeply"),
    ("/v1/completions", b'{"a":' * 10_000 + b"1" + b"}" * 10_000, 400, "nested too deeply"),
]


@pytest.fixture(scope="module")
def never(cluster: Cluster) -> str:
    cluster.deploy("never", min=0, max=1)
    return "never"


@pytest.mark.parametrize(("path", "body", "status", "needle"), CASES)
def test_bad_invocation(
    cluster: Cluster, never: str, path: str, body: object, status: int, needle: str
) -> None:
    if isinstance(body, bytes):
        r = httpx.post(
            cluster.url + path, content=body, headers={"content-type": "application/json"}
        )
    else:
        r = httpx.post(cluster.url + path, json=body)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]


def test_system_needs_the_token(cluster: Cluster) -> None:
    for headers in ({}, {"authorization": "Bearer nope"}):
        r = httpx.get(f"{cluster.url}/system/functions", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"


def test_an_invalid_spec_is_422_naming_the_field(cluster: Cluster) -> None:
    body = {
        "spec": {"name": "ok", "model": "m", "scale": {"max": 0}},
        "checkpoint": "k",
        "checkpoint_bytes": 1,
    }
    r = httpx.post(f"{cluster.url}/system/functions", json=body, headers=AUTH)
    assert r.status_code == 422 and "spec.scale.max" in r.json()["error"]["message"]


def test_none_of_it_reached_the_node(cluster: Cluster, never: str) -> None:
    info = httpx.get(f"{cluster.url}/system/functions/never", headers=AUTH).json()
    assert info["instances"] == [] and info["replicas"]["desired"] == 0
    nodes = httpx.get(f"{cluster.url}/system/nodes", headers=AUTH).json()
    assert not [i for n in nodes for i in n["instances"] if i["function"] == "never"]
    text = httpx.get(f"{cluster.url}/metrics").text
    assert 'sllm_wakes_total{function="never"}' not in text


def test_a_checkpoint_key_that_escapes_the_store_is_422(cluster: Cluster) -> None:
    for key in ("../../../../tmp/x", "/etc/passwd", "a//b", "ok/./x"):
        body = {"spec": {"name": "escape", "model": "m"}, "checkpoint": key, "checkpoint_bytes": 1}
        r = httpx.post(f"{cluster.url}/system/functions", json=body, headers=AUTH)
        assert r.status_code == 422, r.text
        assert r.json()["error"]["message"].startswith("checkpoint: ")
    r = httpx.get(f"{cluster.url}/system/functions/escape", headers=AUTH)
    assert r.status_code == 404
