"""Invocation keys (``/system/keys``) and private functions, on the in-process gateway: 401
without a valid key, 403 with a key for other functions, the official ``openai`` client's
``api_key`` accepted, only a hash in the bucket. (tests/integration/gateway repeats the main
cases over a real socket and node.)"""

from __future__ import annotations

import hashlib
import json

import httpx
import openai
import pytest
from openai import AsyncOpenAI

from gateway.keys import KEY_PREFIX, TTL_S, KeyStore, parse_token
from sllm.bus import MemoryKeyValue
from sllm.clock import ManualClock
from tests.unit.gateway.conftest import AUTH, TOKEN, Harness

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def new_key(h: Harness, **body: object) -> dict[str, object]:
    r = await h.client.post("/system/keys", json=body, headers=AUTH)
    assert r.status_code == 201, r.text
    created: dict[str, object] = r.json()
    return created


def openai_client(h: Harness, key: str) -> AsyncOpenAI:
    return AsyncOpenAI(
        base_url="http://gateway/v1",
        api_key=key,
        http_client=httpx.AsyncClient(transport=h.client._transport),
        max_retries=0,
    )


async def test_private_function_wants_a_valid_key_for_it(h: Harness) -> None:
    await h.deploy("chat", auth="private")
    await h.deploy("other", auth="private")
    missing = await h.client.post("/function/chat", json=CHAT)
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "unauthorized"
    assert "private" in missing.json()["error"]["message"]
    wrong = await h.client.post("/function/chat", json=CHAT, headers=bearer("sllm_nope"))
    assert wrong.status_code == 401

    only_other = str((await new_key(h, name="o", functions=["other"]))["key"])
    forbidden = await h.client.post("/function/chat", json=CHAT, headers=bearer(only_other))
    assert forbidden.status_code == 403
    assert forbidden.json()["error"]["code"] == "forbidden"
    ok = await h.client.post("/function/other", json=CHAT, headers=bearer(only_other))
    assert ok.status_code == 200, ok.text

    every = str((await new_key(h))["key"])
    assert (
        await h.client.post("/function/chat", json=CHAT, headers=bearer(every))
    ).status_code == 200
    # the admin token opens every function too (the CLI's fallback)
    assert (await h.client.post("/function/chat", json=CHAT, headers=AUTH)).status_code == 200
    # a refused request never reached an instance
    assert all(iid for iid, _, _ in h.instances.seen)
    assert len(h.instances.seen) == 3


async def test_public_function_needs_no_key(h: Harness) -> None:
    await h.deploy("chat", auth="public")
    assert (await h.client.post("/function/chat", json=CHAT)).status_code == 200


async def test_a_wrong_secret_with_a_real_id_is_refused(h: Harness) -> None:
    await h.deploy("chat", auth="private")
    key = str((await new_key(h))["key"])
    key_id, secret = parse_token(key) or ("", "")
    forged = f"sllm_{key_id}_{'A' * len(secret)}"
    r = await h.client.post("/function/chat", json=CHAT, headers=bearer(forged))
    assert r.status_code == 401


async def test_revoked_key_is_refused(h: Harness) -> None:
    await h.deploy("chat", auth="private")
    created = await new_key(h, name="ci")
    key = str(created["key"])
    assert (
        await h.client.post("/function/chat", json=CHAT, headers=bearer(key))
    ).status_code == 200
    r = await h.client.delete(f"/system/keys/{created['id']}", headers=AUTH)
    assert r.status_code == 204
    refused = await h.client.post("/function/chat", json=CHAT, headers=bearer(key))
    assert refused.status_code == 401
    again = await h.client.delete(f"/system/keys/{created['id']}", headers=AUTH)
    assert again.status_code == 404


async def test_openai_client_api_key(h: Harness) -> None:
    await h.deploy("chat", auth="private")
    await h.deploy("open", auth="public")
    await h.deploy("other", auth="private")
    key = str((await new_key(h, functions=["chat"]))["key"])
    good = openai_client(h, key)
    reply = await good.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.choices[0].message.content
    # /v1/models shows what the caller may call
    assert sorted(m.id for m in (await good.models.list()).data) == ["chat", "open"]
    anonymous = openai_client(h, "not-a-key")
    assert [m.id for m in (await anonymous.models.list()).data] == ["open"]
    with pytest.raises(openai.AuthenticationError) as unauth:
        await anonymous.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "x"}]
        )
    assert "not valid" in unauth.value.message
    with pytest.raises(openai.PermissionDeniedError):
        await good.completions.create(model="other", prompt="x")


async def test_keys_are_listed_without_secrets_and_stored_as_hashes(h: Harness) -> None:
    created = await new_key(h, name="ci", functions=["b", "a"])
    assert created["functions"] == ["a", "b"]
    key = str(created["key"])
    listed = (await h.client.get("/system/keys", headers=AUTH)).json()
    assert listed == [{k: created[k] for k in ("id", "name", "functions", "created")}]
    stored = await h.kv.get(f"{KEY_PREFIX}{created['id']}")
    assert stored is not None
    _, secret = parse_token(key) or ("", "")
    assert secret not in stored.decode() and key not in stored.decode()
    assert json.loads(stored)["sha256"] == hashlib.sha256(secret.encode()).hexdigest()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"functions": "chat"}, "functions"),
        ({"functions": ["Not A Name"]}, "functions[0]"),
        ({"name": 3}, "name"),
        ({"scope": "x"}, "scope"),
        ([], "body"),
    ],
)
async def test_bad_key_requests_name_the_field(h: Harness, body: object, field: str) -> None:
    r = await h.client.post("/system/keys", json=body, headers=AUTH)
    assert r.status_code == 400
    assert r.json()["error"]["message"].startswith(field)


async def test_key_routes_want_the_admin_token(h: Harness) -> None:
    key = str((await new_key(h))["key"])
    assert (await h.client.get("/system/keys")).status_code == 401
    # an invocation key is not an admin token
    assert (await h.client.get("/system/keys", headers=bearer(key))).status_code == 401
    assert (await h.client.post("/system/keys", json={}, headers=bearer(key))).status_code == 401
    assert TOKEN not in key


async def test_a_revocation_elsewhere_holds_here_within_the_ttl() -> None:
    """Two gateways on one bucket: a key revoked through one is refused by the other once its
    cached view is older than TTL_S."""
    kv, clock = MemoryKeyValue(), ManualClock()
    here, there = KeyStore(kv, clock), KeyStore(kv, clock)
    _, token = await here.create("k", [])
    key = await there.verify(token)
    assert key is not None
    await here.revoke(key.id)
    clock.advance(TTL_S + 0.01)
    assert await there.verify(token) is None
