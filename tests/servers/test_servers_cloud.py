"""The Cloud over real sockets on 127.0.0.1 with the in-memory FakeNetwork.

Every route and status, streaming (n > 1, include_usage, stop, logprobs), errors before and
after the stream started, cancel on disconnect, metrics, and the no-torch import rule.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anyio
import pytest

from resultity_core import SSEDecoder, canonical_bytes, insufficient_quota, parse_chat_request
from resultity_servers._http import HTTPClient, HTTPServer
from resultity_servers.cloud import (
    CloudApp,
    CloudSettings,
    FakeNetwork,
    bearer_token,
    job_request,
    running_cloud,
    serve_cloud,
)

pytestmark = pytest.mark.anyio

KEY = "sk-test-key"
AUTH = {"authorization": f"Bearer {KEY}"}


@asynccontextmanager
async def cloud(
    network: FakeNetwork | None = None, **settings: Any
) -> AsyncIterator[tuple[HTTPClient, FakeNetwork, CloudApp, HTTPServer]]:
    net = network or FakeNetwork()
    if not net.keys:
        net.add_account(KEY)
    with anyio.fail_after(10):
        async with (
            running_cloud(CloudSettings(port=0, **settings), net) as (server, app),
            HTTPClient(server.url, timeout_s=5) as client,
        ):
            yield client, net, app, server


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "user", "content": "Hi there"}], **extra}


async def sse(client: HTTPClient, path: str, body: Any) -> tuple[int, list[Any]]:
    """Return the status and the decoded events (``[DONE]`` as the string, errors as
    ``("error", body)``)."""
    out: list[Any] = []
    async with client.stream("POST", path, json=body, headers=AUTH) as response:
        decoder = SSEDecoder()
        async for chunk in response.aiter_bytes():
            for event in decoder.feed(chunk):
                if event.data == "[DONE]":
                    out.append("[DONE]")
                elif event.event == "error":
                    out.append(("error", event.json()))
                else:
                    out.append(event.json())
        return response.status, out


def error_of(response: Any) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    error: dict[str, Any] = body["error"]
    return error


# --- auth -----------------------------------------------------------------------------------


def test_bearer_token_parsing() -> None:
    assert bearer_token("Bearer sk-1") == "sk-1"
    assert bearer_token("bearer   sk-1 ") == "sk-1"
    assert bearer_token("Basic abc") is None
    assert bearer_token("Bearer") is None
    assert bearer_token("Bearer a b") is None
    assert bearer_token(None) is None


async def test_missing_and_invalid_keys_get_401_and_valid_keys_are_cached() -> None:
    async with cloud() as (client, net, _, _):
        for headers in ({}, {"authorization": "Bearer sk-wrong"}, {"authorization": "Basic x"}):
            for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
                r = await client.request(method, path, json=chat_body(), headers=headers)
                assert r.status == 401, (headers, path)
                err = error_of(r)
                assert err["type"] == "invalid_request_error"
                assert err["code"] == "invalid_api_key"
                assert "sk-wrong" not in err["message"]
        calls = net.auth_calls
        for _ in range(3):
            assert (await client.request("GET", "/v1/models", headers=AUTH)).status == 200
        assert net.auth_calls == calls + 1  # positive answers are cached
        # Unknown keys are never cached: each attempt asks the network.
        for _ in range(2):
            await client.request("GET", "/v1/models", headers={"authorization": "Bearer sk-no"})
        assert net.auth_calls == calls + 3


# --- models, health, routing ------------------------------------------------------------------


async def test_models_list_and_retrieve() -> None:
    async with cloud() as (client, _, _, _):
        r = await client.request("GET", "/v1/models", headers=AUTH)
        assert r.status == 200
        assert r.json() == {
            "object": "list",
            "data": [{"id": "tiny", "object": "model", "created": 1, "owned_by": "resultity"}],
        }
        r = await client.request("GET", "/v1/models/tiny", headers=AUTH)
        assert r.json()["id"] == "tiny"
        r = await client.request("GET", "/v1/models/nope", headers=AUTH)
        assert r.status == 404
        assert error_of(r)["code"] == "model_not_found"


async def test_health_follows_the_network_nodes() -> None:
    async with cloud() as (client, net, _, _):
        r = await client.request("GET", "/health")
        assert (r.status, r.json()) == (200, {"status": "ok"})
        net.set_nodes(0)
        r = await client.request("GET", "/health")
        assert r.status == 503
        assert error_of(r)["code"] == "no_capacity"
        net.set_nodes(2)
        net.unreachable = True
        assert (await client.request("GET", "/health")).status == 503


async def test_unknown_route_404_and_wrong_method_405() -> None:
    async with cloud() as (client, _, _, _):
        r = await client.request("GET", "/v1/nothing", headers=AUTH)
        assert r.status == 404
        error_of(r)
        r = await client.request("GET", "/v1/chat/completions", headers=AUTH)
        assert r.status == 405
        assert r.header("allow") == "POST"
        error_of(r)
        r = await client.request("DELETE", "/v1/models", headers=AUTH)
        assert r.status == 405


# --- bad input: always 4xx with an OpenAI body, never 500 -------------------------------------


@pytest.mark.parametrize(
    ("content", "ctype", "code"),
    [
        (b"{not json", "application/json", "invalid_json"),
        (b"", "application/json", "invalid_json"),
        (b"\xff\xfe", "application/json", "invalid_json"),
        (b"[1, 2]", "application/json", "invalid_type"),
        (json.dumps(chat_body()).encode(), "text/plain", "invalid_content_type"),
        (b"model=tiny", "application/x-www-form-urlencoded", "invalid_content_type"),
    ],
)
async def test_invalid_bodies_get_400(content: bytes, ctype: str, code: str) -> None:
    async with cloud() as (client, net, _, _):
        for path in ("/v1/chat/completions", "/v1/completions"):
            headers = {**AUTH, "content-type": ctype}
            r = await client.request("POST", path, content=content, headers=headers)
            assert r.status == 400
            assert error_of(r)["code"] == code
        assert net.jobs == {}


async def test_invalid_fields_name_the_param() -> None:
    async with cloud() as (client, net, _, _):
        cases = [
            ("/v1/chat/completions", chat_body(temperature=5), "temperature"),
            ("/v1/chat/completions", chat_body(messages=[]), "messages"),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, "model"),
            ("/v1/chat/completions", chat_body(n=0), "n"),
            ("/v1/chat/completions", chat_body(max_tokens=5000), "max_tokens"),
            ("/v1/completions", {"model": "tiny", "prompt": "x", "logprobs": 9}, "logprobs"),
            ("/v1/completions", {"model": "tiny"}, "prompt"),
        ]
        for path, body, param in cases:
            r = await client.request("POST", path, json=body, headers=AUTH)
            assert r.status == 400, (body, r.body)
            assert error_of(r)["param"] == param
        assert net.jobs == {}


async def test_body_over_the_limit_gets_413() -> None:
    async with cloud(max_body_bytes=1000) as (client, net, _, _):
        body = chat_body(messages=[{"role": "user", "content": "x" * 2000}])
        r = await client.request("POST", "/v1/chat/completions", json=body, headers=AUTH)
        assert r.status == 413
        error_of(r)
        assert net.jobs == {}


async def test_network_refusals_keep_their_status() -> None:
    async with cloud() as (client, net, _, _):
        r = await client.request(
            "POST", "/v1/chat/completions", json=chat_body(model="big"), headers=AUTH
        )
        assert r.status == 404
        assert error_of(r)["param"] == "model"
        net.set_nodes(0)
        for stream in (False, True):
            body = chat_body(stream=stream)
            r = await client.request("POST", "/v1/chat/completions", json=body, headers=AUTH)
            assert r.status == 503
            assert error_of(r)["code"] == "no_capacity"
        net.set_nodes(1)
        net.fail_submit = insufficient_quota(10, 1)
        r = await client.request(
            "POST", "/v1/completions", json={"model": "tiny", "prompt": "a"}, headers=AUTH
        )
        assert r.status == 402
        assert error_of(r)["code"] == "insufficient_quota"


async def test_reservation_is_the_worst_case_and_poor_accounts_get_402() -> None:
    net = FakeNetwork()
    net.add_account(KEY, credits=50)
    async with cloud(net) as (client, net, _, _):
        # price 1000/2000 per 1k: 16 tokens of max_tokens cost 32 micro-credits, the prompt
        # (8 bytes + 8 per message + 16 per request = 32) costs 32 more: 64 > 50.
        body = chat_body(max_tokens=16)
        r = await client.request("POST", "/v1/chat/completions", json=body, headers=AUTH)
        assert r.status == 402
        assert "64" in error_of(r)["message"]
        r = await client.request(
            "POST", "/v1/chat/completions", json=chat_body(max_tokens=4), headers=AUTH
        )
        assert r.status == 200
        (job,) = net.jobs.values()
        assert job.submission.reserve == 40
        assert job.submission.prompt_tokens_estimate == 32
        assert job.submission.max_tokens == 4
        assert job.charged <= job.submission.reserve


# --- generation -------------------------------------------------------------------------------


async def test_chat_non_stream_with_n_stop_seed_and_logprobs() -> None:
    async with cloud() as (client, net, _, _):
        body = chat_body(n=2, stop=[" The"], seed=7, logprobs=True, top_logprobs=2)
        r = await client.request("POST", "/v1/chat/completions", json=body, headers=AUTH)
        assert r.status == 200
        out = r.json()
        assert out["object"] == "chat.completion"
        assert out["id"].startswith("chatcmpl-")
        texts = [c["message"]["content"] for c in out["choices"]]
        assert texts == [
            "Hello from resultity, choice 0 seed 7.",
            "Hello from resultity, choice 1 seed 7.",
        ]
        assert [c["finish_reason"] for c in out["choices"]] == ["stop", "stop"]
        lp = out["choices"][1]["logprobs"]["content"]
        assert "".join(t["token"] for t in lp) == texts[1]
        assert all(len(t["top_logprobs"]) == 2 for t in lp)
        assert out["usage"] == {"prompt_tokens": 2, "completion_tokens": 14, "total_tokens": 16}
        (job,) = net.jobs.values()
        sent = job.submission.request
        assert (sent["seed"], sent["stop"], sent["n"]) == (7, [" The"], 2)
        assert job.submission.choices == 2


async def test_chat_stream_n2_with_usage() -> None:
    async with cloud() as (client, _, app, _):
        body = chat_body(n=2, max_tokens=3, stream=True, stream_options={"include_usage": True})
        status, events = await sse(client, "/v1/chat/completions", body)
        assert status == 200
        assert events[-1] == "[DONE]"
        chunks = events[:-1]
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert len({c["id"] for c in chunks}) == 1
        first = chunks[0]
        assert [ch["delta"] for ch in first["choices"]] == [
            {"role": "assistant", "content": ""}
        ] * 2
        usage_chunk = chunks[-1]
        assert usage_chunk["choices"] == []
        assert usage_chunk["usage"] == {
            "prompt_tokens": 2,
            "completion_tokens": 6,
            "total_tokens": 8,
        }
        texts = ["", ""]
        reasons: list[Any] = [None, None]
        for c in chunks[1:-1]:
            assert c["usage"] is None
            (ch,) = c["choices"]
            texts[ch["index"]] += ch["delta"].get("content", "")
            if ch["finish_reason"]:
                reasons[ch["index"]] = ch["finish_reason"]
        assert texts == ["Hello from resultity,", "Hello from resultity,"]
        assert reasons == ["length", "length"]
        m = app.metrics
        assert m.requests.value("/v1/chat/completions", "200") == 1
        assert m.completion_tokens.value("tiny") == 6
        assert m.ttft.count("/v1/chat/completions") == 1


async def test_stream_without_usage_has_no_usage_chunk() -> None:
    async with cloud() as (client, _, _, _):
        _, events = await sse(client, "/v1/chat/completions", chat_body(stream=True))
        assert events[-1] == "[DONE]"
        assert all(e["choices"] for e in events[:-1])


async def test_completions_batch_stream_and_logprob_offsets() -> None:
    async with cloud() as (client, _, _, _):
        body = {"model": "tiny", "prompt": ["ab", "cdef"], "n": 1, "logprobs": 1, "max_tokens": 2}
        r = await client.request("POST", "/v1/completions", json=body, headers=AUTH)
        out = r.json()
        assert out["object"] == "text_completion"
        assert [c["text"] for c in out["choices"]] == ["Hello from"] * 2
        assert [c["finish_reason"] for c in out["choices"]] == ["length"] * 2
        lp0, lp1 = (c["logprobs"] for c in out["choices"])
        assert lp0["tokens"] == ["Hello", " from"]
        assert lp0["text_offset"] == [2, 7]  # counted from the start of prompt 0
        assert lp1["text_offset"] == [4, 9]
        assert len(lp0["top_logprobs"][0]) == 1
        status, events = await sse(
            client,
            "/v1/completions",
            {**body, "stream": True, "stream_options": {"include_usage": True}},
        )
        assert status == 200
        assert events[-1] == "[DONE]"
        assert events[-2]["usage"]["completion_tokens"] == 4
        second = [c["choices"][0] for c in events[:-2] if c["choices"][0]["index"] == 1]
        text = "".join(ch["text"] for ch in second)
        assert text == "Hello from"


async def test_error_mid_stream_is_an_sse_error_event() -> None:
    net = FakeNetwork()
    net.fail_after_tokens = 2
    async with cloud(net) as (client, _, _, _):
        status, events = await sse(client, "/v1/chat/completions", chat_body(stream=True))
        assert status == 200
        assert "[DONE]" not in events
        kind, body = events[-1]
        assert kind == "error"
        assert body["error"]["type"] == "server_error"
        tokens = [e for e in events[:-1] if e["choices"][0]["delta"].get("content")]
        assert len(tokens) == 2
        # Before the first token the same failure is a plain status.
        net.fail_after_tokens = 0
        r = await client.request(
            "POST", "/v1/chat/completions", json=chat_body(stream=True), headers=AUTH
        )
        assert r.status == 500
        assert error_of(r)["type"] == "server_error"
        r = await client.request("POST", "/v1/chat/completions", json=chat_body(), headers=AUTH)
        assert r.status == 500


@pytest.mark.parametrize(("stream", "queued"), [(True, False), (False, False), (True, True)])
async def test_client_disconnect_cancels_the_job_within_a_second(
    stream: bool, queued: bool
) -> None:
    net = FakeNetwork()
    net.token_delay_s = 0.2
    if queued:  # the client leaves while the job waits for its first token
        net.first_token_delay_s = 2.0
    async with cloud(net) as (client, net, app, _):
        body = chat_body(stream=stream)
        if stream and not queued:
            async with client.stream("POST", "/v1/chat/completions", json=body, headers=AUTH) as r:
                async for chunk in r.aiter_bytes():
                    if b"Hello" in chunk:
                        break
        else:
            with anyio.move_on_after(0.3):  # cancelling the request drops its connection
                await client.request("POST", "/v1/chat/completions", json=body, headers=AUTH)
        left = time.monotonic()
        with anyio.fail_after(1.0):
            await net.cancelled.wait()
        (job,) = net.jobs.values()
        assert job.cancelled_at is not None
        assert job.cancelled_at - left < 1.0
        assert job.tokens_sent <= 3  # generation stopped early (the reply has 7 tokens)
        with anyio.fail_after(1.0):
            while app.metrics.in_flight.value != 0:
                await anyio.sleep(0.01)
        assert app.metrics.cancelled.value() == 1
        status = "200" if stream and not queued else "499"  # 499: gone before the head
        assert app.metrics.requests.value("/v1/chat/completions", status) == 1


async def test_metrics_exposition() -> None:
    async with cloud() as (client, net, _, _):
        await client.request("POST", "/v1/chat/completions", json=chat_body(), headers=AUTH)
        await client.request("GET", "/v1/models")
        await client.request("GET", "/v1/unknown/path")
        net.queue_depth = 3
        r = await client.request("GET", "/metrics")
        assert r.status == 200
        assert r.header("content-type").startswith("text/plain; version=0.0.4")
        text = r.body.decode()
        lines = set(text.splitlines())
        chat_ok = 'resultity_cloud_requests_total{route="/v1/chat/completions",status="200"} 1'
        assert chat_ok in lines
        assert 'resultity_cloud_requests_total{route="/v1/models",status="401"} 1' in lines
        assert 'resultity_cloud_requests_total{route="other",status="404"} 1' in lines
        assert 'resultity_cloud_completion_tokens_total{model="tiny"} 7' in lines
        assert 'resultity_cloud_prompt_tokens_total{model="tiny"} 2' in lines
        assert "resultity_cloud_queue_depth 3" in lines
        assert "resultity_cloud_nodes_live 1" in lines
        assert "resultity_cloud_nodes_ready 1" in lines
        assert "# TYPE resultity_cloud_time_to_first_token_seconds histogram" in lines
        assert (
            'resultity_cloud_time_to_first_token_seconds_count{route="/v1/chat/completions"} 1'
            in lines
        )
        assert (
            'resultity_cloud_request_duration_seconds_bucket{route="/v1/chat/completions",'
            'le="+Inf"} 1' in lines
        )
        # the scrape itself is in flight while rendering; nothing else is
        assert "resultity_cloud_in_flight_requests 1" in lines
        assert "resultity_cloud_jobs_in_flight 0" in lines
        # every sample line parses as name{labels} value
        for line in text.splitlines():
            if not line.startswith("#"):
                float(line.rsplit(" ", 1)[1])


def test_cloud_does_not_import_torch() -> None:
    code = "import resultity_servers.cloud, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_job_request_is_canonical_json_with_decimal_strings() -> None:
    request = parse_chat_request(
        chat_body(temperature=0.7, top_p=1, logit_bias={"5": -1.5, "7": 2}, seed=3, stop="x")
    )
    out = job_request(request)
    assert out["temperature"] == "0.7"
    assert out["top_p"] == "1.0"
    assert out["logit_bias"] == {"5": "-1.5", "7": "2.0"}
    assert (out["seed"], out["stop"]) == (3, ["x"])
    canonical_bytes(out)  # raises on any float left
    back = {**out, "temperature": 0.7, "top_p": 1.0, "logit_bias": {"5": -1.5, "7": 2.0}}
    assert parse_chat_request(back) == request


async def test_submitted_request_has_no_floats() -> None:
    async with cloud() as (client, net, _, _):
        body = chat_body(temperature=0.25, presence_penalty=-1)
        r = await client.request("POST", "/v1/chat/completions", json=body, headers=AUTH)
        assert r.status == 200
        (job,) = net.jobs.values()
        assert job.submission.request["temperature"] == "0.25"
        assert job.submission.request["presence_penalty"] == "-1.0"
        canonical_bytes(job.submission.request)


async def test_serve_cloud_reports_its_port_and_stops_on_cancel() -> None:
    net = FakeNetwork()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            port = await tg.start(partial(serve_cloud, CloudSettings(port=0), network=net))
            async with HTTPClient(f"http://127.0.0.1:{port}") as client:
                r = await client.request("GET", "/health")
                assert (r.status, r.json()) == (200, {"status": "ok"})
            tg.cancel_scope.cancel()
