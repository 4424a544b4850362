"""The official ``openai`` client against the Cloud on 127.0.0.1 (FakeNetwork behind it).

The client is synchronous: it runs in a worker thread while the server runs on the loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import openai
import pytest

from resultity_servers.cloud import CloudSettings, FakeNetwork, running_cloud

pytestmark = pytest.mark.anyio

KEY = "sk-openai-e2e"
T = TypeVar("T")


async def with_client(
    check: Callable[[openai.OpenAI, FakeNetwork], T], network: FakeNetwork | None = None
) -> T:
    net = network or FakeNetwork()
    net.add_account(KEY)
    with anyio.fail_after(20):
        async with running_cloud(CloudSettings(port=0), net) as (server, _):

            def run() -> T:
                client = openai.OpenAI(
                    base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=10
                )
                with client:
                    return check(client, net)

            return await anyio.to_thread.run_sync(run)


async def test_chat_non_stream() -> None:
    def check(client: openai.OpenAI, _: FakeNetwork) -> Any:
        out = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "Say hello"}],
            n=2,
            seed=3,
            stop=["."],
            logprobs=True,
            top_logprobs=1,
        )
        assert out.object == "chat.completion"
        assert [c.message.content for c in out.choices] == [
            "Hello from resultity, choice 0 seed 3",
            "Hello from resultity, choice 1 seed 3",
        ]
        assert [c.finish_reason for c in out.choices] == ["stop", "stop"]
        assert out.choices[0].logprobs is not None
        content = out.choices[0].logprobs.content or []
        assert content[0].token == "Hello"
        assert content[0].top_logprobs[0].token == "Hello"
        assert out.usage is not None
        assert out.usage.completion_tokens == 14

    await with_client(check)


async def test_chat_stream_with_usage() -> None:
    def check(client: openai.OpenAI, _: FakeNetwork) -> Any:
        stream = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "Say hello"}],
            stream=True,
            stream_options={"include_usage": True},
            max_tokens=4,
        )
        text, reason, usage = "", None, None
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                text += choice.delta.content or ""
                reason = choice.finish_reason or reason
        assert text == "Hello from resultity, choice"
        assert reason == "length"
        assert usage is not None
        assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (2, 4, 6)

    await with_client(check)


async def test_completions_and_models() -> None:
    def check(client: openai.OpenAI, _: FakeNetwork) -> Any:
        out = client.completions.create(model="tiny", prompt="Once", max_tokens=2, logprobs=2)
        assert out.choices[0].text == "Hello from"
        assert out.choices[0].finish_reason == "length"
        assert out.choices[0].logprobs is not None
        assert out.choices[0].logprobs.tokens == ["Hello", " from"]
        assert out.usage is not None
        assert out.usage.completion_tokens == 2
        pieces = [
            c.choices[0].text
            for c in client.completions.create(model="tiny", prompt="Once", stream=True)
        ]
        assert "".join(pieces) == "Hello from resultity, choice 0. The end."
        models = client.models.list()
        assert [m.id for m in models.data] == ["tiny"]
        assert client.models.retrieve("tiny").owned_by == "resultity"

    await with_client(check)


async def test_errors_raise_the_matching_exceptions() -> None:
    def check(client: openai.OpenAI, net: FakeNetwork) -> Any:
        bad = client.with_options(api_key="sk-not-a-key")
        with pytest.raises(openai.AuthenticationError) as auth:
            bad.models.list()
        assert auth.value.status_code == 401
        assert auth.value.code == "invalid_api_key"
        with pytest.raises(openai.NotFoundError) as missing:
            client.chat.completions.create(
                model="no-such-model", messages=[{"role": "user", "content": "x"}]
            )
        assert missing.value.code == "model_not_found"
        with pytest.raises(openai.BadRequestError) as bad_request:
            client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "x"}], temperature=3
            )
        assert bad_request.value.param == "temperature"
        net.fail_after_tokens = 1
        stream = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x"}], stream=True
        )
        with pytest.raises(openai.APIError, match="mid-stream"):
            for _ in stream:
                pass

    await with_client(check)
