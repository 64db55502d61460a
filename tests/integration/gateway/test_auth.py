"""Who gets in, over real sockets (gateway, node, instance, NATS with credentials): a private
function answers 401 without a key and with a revoked one, 403 to a key for another function,
200 to the official ``openai`` client with the right key; the instance itself refuses a call
that does not carry its secret; no secret shows in /metrics."""

from __future__ import annotations

import httpx
import openai
import pytest

from sllm.instance_auth import auth_header
from tests.instance_secrets import instance_secret

from .conftest import AUTH, TOKEN, Cluster

pytestmark = pytest.mark.integration

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def new_key(cluster: Cluster, functions: list[str]) -> dict[str, str]:
    r = httpx.post(
        f"{cluster.url}/system/keys", json={"name": "it", "functions": functions}, headers=AUTH
    )
    assert r.status_code == 201, r.text
    created: dict[str, str] = r.json()
    return created


def test_private_function_keys_and_the_instance_secret(cluster: Cluster) -> None:
    cluster.deploy("priv", auth="private", min=0, max=1, keep_alive="10m")
    try:
        url = f"{cluster.url}/function/priv"
        anonymous = httpx.post(url, json=CHAT, timeout=30)
        assert anonymous.status_code == 401
        assert anonymous.json()["error"]["code"] == "unauthorized"

        other = new_key(cluster, ["not-priv"])
        forbidden = httpx.post(url, json=CHAT, headers=auth_header(other["key"]), timeout=30)
        assert forbidden.status_code == 403

        key = new_key(cluster, ["priv"])
        client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key=key["key"], max_retries=0)
        reply = client.chat.completions.create(
            model="priv", messages=[{"role": "user", "content": "hi"}], max_tokens=3, timeout=120
        )
        assert reply.choices[0].message.content is not None

        r = httpx.delete(f"{cluster.url}/system/keys/{key['id']}", headers=AUTH, timeout=10)
        assert r.status_code == 204
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(
                model="priv", messages=[{"role": "user", "content": "hi"}], max_tokens=3
            )

        # the instance that served it: nothing without its secret, everything with it
        (inst,) = httpx.get(f"{cluster.url}/system/functions/priv", headers=AUTH).json()[
            "instances"
        ]
        secret = instance_secret(cluster.env, inst["id"])
        assert secret not in str(inst)
        stolen = {"authorization": f"Bearer {TOKEN}"}  # the admin token is not the secret
        for headers in ({}, stolen):
            r = httpx.get(f"{inst['address']}/v1/migration/requests", headers=headers)
            assert r.status_code == 401
        ok = httpx.get(f"{inst['address']}/v1/migration/requests", headers=auth_header(secret))
        assert ok.status_code == 200

        metrics = httpx.get(f"{cluster.url}/metrics", timeout=5).text
        for value in (secret, key["key"], other["key"], TOKEN):
            assert value not in metrics
        assert 'status="401"' in metrics and 'status="403"' in metrics
    finally:
        httpx.delete(f"{cluster.url}/system/functions/priv", headers=AUTH, timeout=10)
