"""HTTPNetworkClient over real sockets against a stand-in of the Network's Cloud routes.

The stand-in serves ``ROUTES`` with a FakeNetwork behind it and speaks the wire formats the
client documents (core ``JobEvent`` payloads over SSE, logprobs as decimal strings, OpenAI
error bodies). The Cloud runs with the HTTP client in front of it, so the whole path
client -> Cloud -> HTTP -> "Network" is exercised.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import openai
import pytest

from resultity_core import JobEvent as WireEvent
from resultity_core import (
    JobUsage,
    OpenAIRequestError,
    encode_event,
    insufficient_quota,
    invalid_api_key,
)
from resultity_servers._http import (
    HTTPClient,
    Request,
    Response,
    Router,
    StreamingResponse,
    running_server,
)
from resultity_servers.cloud import (
    ROUTES,
    Account,
    CloudSettings,
    DoneEvent,
    ErrorEvent,
    FakeNetwork,
    HTTPNetworkClient,
    JobHandle,
    JobSubmission,
    TokenEvent,
    event_from_payload,
    running_cloud,
)

pytestmark = pytest.mark.anyio

TOKEN = "service-token"
KEY = "rk-user-key"


def wire_payload(job_id: str, seq: int, event: Any) -> dict[str, Any]:
    if isinstance(event, TokenEvent):
        lps = None
        if event.logprobs is not None:
            lps = tuple(
                {
                    "token": lp.token,
                    "logprob": str(lp.logprob),
                    "top_logprobs": [{"token": t, "logprob": str(v)} for t, v in lp.top],
                }
                for lp in event.logprobs
            )
        wire = WireEvent(
            job_id, seq, "token", index=event.index, text=event.text, token_ids=(seq,), logprobs=lps
        )
    elif isinstance(event, DoneEvent):
        usage = JobUsage(event.prompt_tokens or 0, event.completion_tokens or 0)
        wire = WireEvent(
            job_id, seq, "done", index=event.index, finish_reason=event.finish_reason, usage=usage
        )
    else:
        wire = WireEvent(job_id, seq, "error", error=event.error.message)
    return wire.to_payload()


def network_app(fake: FakeNetwork) -> Router:
    router = Router()

    def guard(handler: Any) -> Any:
        async def guarded(request: Request) -> Any:
            if request.header("authorization") != f"Bearer {TOKEN}":
                return Response.json({"error": {"message": "bad service token"}}, status=401)
            try:
                return await handler(request)
            except OpenAIRequestError as exc:
                return Response.json(exc.to_error_body(), status=exc.status)

        return guarded

    async def auth(request: Request) -> Response:
        account = await fake.authenticate(request.json()["api_key"])
        if account is None:
            return Response.json(invalid_api_key().to_error_body(), status=401)
        return Response.json({"account_id": account.account_id})

    async def models(request: Request) -> Response:
        data = [
            {
                "name": m.id,
                "version": "1",
                "ready_nodes": m.nodes,
                "price": {
                    "prompt_per_1k": m.price.prompt_per_1k,
                    "completion_per_1k": m.price.completion_per_1k,
                },
            }
            for m in await fake.list_models()
        ]
        return Response.json({"data": data})

    async def status(request: Request) -> Response:
        s = await fake.status()
        return Response.json(
            {"nodes_live": s.nodes_live, "nodes_ready": s.nodes_ready, "queue_depth": s.queue_depth}
        )

    async def submit(request: Request) -> Response:
        body = request.json()
        job = JobSubmission(
            body["kind"],
            body["model"],
            body["request"],
            body["reserve"],
            body["choices"],
            body["prompt_tokens_estimate"],
            body["max_tokens"],
        )
        handle = await fake.submit(Account(body["account_id"]), job)
        return Response.json({"job_id": handle.job_id})

    async def events(request: Request) -> StreamingResponse:
        job_id = request.path_params["job_id"]
        handle = fake.jobs[job_id].handle

        async def chunks() -> AsyncIterator[bytes]:
            seq = 0
            async for event in fake.events(handle):
                yield encode_event(wire_payload(job_id, seq, event))
                seq += 1

        return StreamingResponse.sse(chunks())

    async def cancel(request: Request) -> Response:
        await fake.cancel(fake.jobs[request.path_params["job_id"]].handle)
        return Response.json({})

    router.add("POST", ROUTES["auth"], guard(auth))
    router.add("GET", ROUTES["models"], guard(models))
    router.add("GET", ROUTES["status"], guard(status))
    router.add("POST", ROUTES["submit"], guard(submit))
    router.add("GET", ROUTES["events"], guard(events))
    router.add("POST", ROUTES["cancel"], guard(cancel))
    return router


@asynccontextmanager
async def stack(token: str = TOKEN) -> AsyncIterator[tuple[str, FakeNetwork]]:
    fake = FakeNetwork()
    fake.add_account(KEY)
    with anyio.fail_after(20):
        async with running_server(network_app(fake)) as network:
            settings = CloudSettings(port=0, network_url=network.url, service_token=token)
            async with running_cloud(settings) as (cloud, _):
                yield cloud.url, fake


def test_event_payloads_map_to_cloud_events() -> None:
    token = event_from_payload(
        {
            "_type": "job_event",
            "job_id": "j",
            "seq": 0,
            "kind": "token",
            "text": "hi",
            "token_ids": [5, 6],
            "logprobs": [
                {
                    "token": "hi",
                    "logprob": "-0.5",
                    "top_logprobs": [{"token": "hi", "logprob": "-0.5"}],
                }
            ],
        }
    )
    assert isinstance(token, TokenEvent)
    assert (token.text, token.tokens) == ("hi", 2)
    assert token.logprobs is not None
    assert token.logprobs[0].logprob == -0.5
    assert token.logprobs[0].top == (("hi", -0.5),)
    done = event_from_payload(
        {
            "_type": "job_event",
            "job_id": "j",
            "seq": 1,
            "kind": "done",
            "index": 1,
            "finish_reason": "length",
            "usage": {"prompt_tokens": 3, "completion_tokens": 4},
        }
    )
    assert done == DoneEvent(1, "length", 3, 4)
    error = event_from_payload(
        {"_type": "job_event", "job_id": "j", "seq": 2, "kind": "error", "error": "node died"}
    )
    assert isinstance(error, ErrorEvent)
    assert "node died" in error.error.message


async def test_openai_client_through_the_http_network_client() -> None:
    async with stack() as (url, fake):

        def run() -> None:
            with openai.OpenAI(
                base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=10
            ) as client:
                out = client.chat.completions.create(
                    model="tiny",
                    messages=[{"role": "user", "content": "hi"}],
                    n=2,
                    logprobs=True,
                    top_logprobs=1,
                    max_tokens=3,
                )
                assert [c.message.content for c in out.choices] == ["Hello from resultity,"] * 2
                assert out.usage is not None
                assert out.usage.completion_tokens == 6
                lp = out.choices[0].logprobs
                assert lp is not None
                assert lp.content is not None
                assert lp.content[1].logprob == -0.75
                stream = client.chat.completions.create(
                    model="tiny",
                    messages=[{"role": "user", "content": "hi"}],
                    stream=True,
                    stream_options={"include_usage": True},
                )
                chunks = list(stream)
                assert chunks[-1].usage is not None
                assert chunks[-1].usage.completion_tokens == 7
                text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
                assert text == "Hello from resultity, choice 0. The end."
                assert [m.id for m in client.models.list().data] == ["tiny"]
                with pytest.raises(openai.AuthenticationError):
                    client.with_options(api_key="rk-wrong").models.list()
                with pytest.raises(openai.NotFoundError):
                    client.completions.create(model="nope", prompt="x")
                fake.fail_submit = insufficient_quota(10, 2)
                with pytest.raises(openai.APIStatusError) as poor:
                    client.completions.create(model="tiny", prompt="x")
                assert poor.value.status_code == 402
                assert poor.value.code == "insufficient_quota"
                fake.fail_submit = None
                fake.fail_after_tokens = 1
                with pytest.raises(openai.APIError, match="mid-stream"):
                    for _ in client.chat.completions.create(
                        model="tiny", messages=[{"role": "user", "content": "hi"}], stream=True
                    ):
                        pass

        await anyio.to_thread.run_sync(run)
        sent = next(iter(fake.jobs.values())).submission
        assert (sent.prompt_tokens_estimate, sent.max_tokens) == (26, 6)


async def test_disconnect_cancels_through_http() -> None:
    async with stack() as (url, fake):
        fake.token_delay_s = 0.2
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        async with HTTPClient(url) as client:
            headers = {"authorization": f"Bearer {KEY}"}
            async with client.stream(
                "POST", "/v1/chat/completions", json=body, headers=headers
            ) as r:
                async for chunk in r.aiter_bytes():
                    if b"Hello" in chunk:
                        break
        with anyio.fail_after(1.0):
            await fake.cancelled.wait()
        assert next(iter(fake.jobs.values())).tokens_sent <= 3


async def test_unreachable_network_and_wrong_service_token_are_503() -> None:
    async with stack(token="wrong") as (url, _), HTTPClient(url) as client:
        r = await client.request("GET", "/v1/models", headers={"authorization": f"Bearer {KEY}"})
        assert r.status == 503
        assert r.json()["error"]["code"] == "no_capacity"
        assert (await client.request("GET", "/health")).status == 503
    # nothing listens on the network's port any more
    async with running_server(Router()) as gone:
        dead_url = gone.url
    net = HTTPNetworkClient(dead_url, TOKEN, timeout_s=2)
    try:
        with pytest.raises(OpenAIRequestError) as exc:
            await net.list_models()
        assert exc.value.status == 503
        with pytest.raises(OpenAIRequestError):
            await net.authenticate(KEY)
        with pytest.raises(OpenAIRequestError):
            await net.cancel(JobHandle("job-1", "tiny"))
    finally:
        await net.aclose()


async def test_event_stream_variants() -> None:
    token = WireEvent("j", 0, "token", text="hi", token_ids=(1,)).to_payload()
    done = WireEvent("j", 1, "done", finish_reason="stop", usage=JobUsage(1, 1)).to_payload()
    bodies = {
        "ok": encode_event(token) + encode_event(done) + b"data: [DONE]\n\n",
        "err": encode_event(token) + encode_event({"error": {"message": "boom"}}, event="error"),
        "busy": encode_event(
            {"error": {"message": "no node in time", "code": "no_capacity"}}, event="error"
        ),
        "bad": encode_event([1, 2]),
        "wire": encode_event({"_type": "job_event", "job_id": "j", "seq": 0, "kind": "nope"}),
    }
    router = Router()

    async def events(request: Request) -> Response:
        return Response(
            200, (("content-type", "text/event-stream"),), bodies[request.path_params["job_id"]]
        )

    router.add("GET", ROUTES["events"], events)
    with anyio.fail_after(10):
        async with running_server(router) as server:
            net = HTTPNetworkClient(server.url, TOKEN, timeout_s=2)
            try:
                got = [e async for e in net.events(JobHandle("ok", "tiny"))]
                assert got == [TokenEvent(0, "hi", 1), DoneEvent(0, "stop", 1, 1)]
                got = [e async for e in net.events(JobHandle("err", "tiny"))]
                assert isinstance(got[-1], ErrorEvent)
                assert got[-1].error.message == "The job failed: boom"
                assert got[-1].error.status == 500
                # "no node could take it" is the user's retryable 503, not a server fault
                got = [e async for e in net.events(JobHandle("busy", "tiny"))]
                assert isinstance(got[-1], ErrorEvent)
                assert got[-1].error.status == 503
                assert got[-1].error.code == "no_capacity"
                assert got[-1].error.message == "no node in time"
                for job_id in ("bad", "wire", "missing"):
                    with pytest.raises(OpenAIRequestError) as exc:
                        _ = [e async for e in net.events(JobHandle(job_id, "tiny"))]
                    assert exc.value.status == 503
            finally:
                await net.aclose()
