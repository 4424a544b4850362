"""OpenAI protocol types: request parsing and validation, responses, error bodies.

The strongest checks run the official ``openai`` client against our types through an
in-process HTTP transport: its request bodies must parse, our responses must satisfy its
pydantic models, and our error bodies must become its exceptions.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pydantic
import pytest
from hypothesis import given
from hypothesis import strategies as st
from openai.types import Completion as OACompletion
from openai.types import Model as OAModel
from openai.types.chat import ChatCompletion as OAChatCompletion
from openai.types.chat import ChatCompletionChunk as OAChatCompletionChunk

from resultity_core import (
    DONE,
    ERROR_KINDS,
    ERROR_STATUS,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatLogprobs,
    ChatMessage,
    ChatMessageOut,
    ChatResponseBuilder,
    ChatTokenLogprob,
    ChunkDelta,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponseBuilder,
    InvalidRequestError,
    ModelCard,
    ModelList,
    OpenAIRequestError,
    ResultityError,
    StreamOptions,
    TextPart,
    TopLogprob,
    Usage,
    encode_event,
    error_body,
    error_event,
    insufficient_quota,
    invalid_api_key,
    invalid_request,
    model_not_found,
    no_capacity,
    parse_chat_request,
    parse_completion_request,
    request_to_dict,
    request_too_large,
    sampling_fields,
)

try:  # the openai client's HTTP library (httpx2 in recent releases, httpx before)
    import httpx2 as httpx
except ImportError:  # pragma: no cover - depends on the installed openai release
    import httpx  # type: ignore[no-redef,import-not-found,unused-ignore]

USER = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": USER, **fields}


def comp(**fields: Any) -> dict[str, Any]:
    return {"model": "tiny", "prompt": "Once", **fields}


def assert_no_extra(model: Any) -> None:
    """Fail if any of our keys landed in a pydantic model's extras (a misspelt field)."""
    if isinstance(model, pydantic.BaseModel):
        assert not model.model_extra, f"{type(model).__name__} got unknown keys {model.model_extra}"
        for name in type(model).model_fields:
            assert_no_extra(getattr(model, name))
    elif isinstance(model, list):
        for item in model:
            assert_no_extra(item)


# --- parsing: what clients send -------------------------------------------------------------


def test_minimal_chat_request_and_defaults() -> None:
    req = parse_chat_request(chat())
    assert req.model == "tiny"
    assert req.messages == (ChatMessage(role="user", content="hi"),)
    assert (req.stream, req.n, req.stop, req.logprobs, req.include_usage) == (
        False,
        1,
        (),
        False,
        False,
    )
    assert sampling_fields(req) == {
        "max_tokens": None,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "min_p": 0.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "logit_bias": {},
        "seed": None,
        "stop": [],
        "logprobs": None,
        "n": 1,
    }


def test_unknown_fields_are_ignored() -> None:
    body = chat(metadata={"a": "b"}, service_tier="auto", store=True, parallel_tool_calls=False)
    body["messages"] = [{"role": "user", "content": "hi", "weird": [1, 2]}]
    assert parse_chat_request(body) == parse_chat_request(chat())
    assert parse_completion_request(comp(xyz=1)) == parse_completion_request(comp())


def test_null_means_not_given() -> None:
    req = parse_chat_request(chat(stop=None, n=None, logprobs=None, temperature=None, seed=None))
    assert req == parse_chat_request(chat())


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, None),
        ({"max_tokens": 5}, 5),
        ({"max_completion_tokens": 7}, 7),
        ({"max_tokens": 5, "max_completion_tokens": 7}, 7),
        ({"max_tokens": 9, "max_completion_tokens": 7}, 7),
    ],
)
def test_max_completion_tokens_wins_over_max_tokens(
    fields: dict[str, int], expected: int | None
) -> None:
    req = parse_chat_request(chat(**fields))
    assert req.effective_max_tokens == expected
    assert sampling_fields(req)["max_tokens"] == expected


@pytest.mark.parametrize(
    ("stop", "expected"),
    [("END", ("END",)), (["a", "b"], ("a", "b")), ([], ()), (["1", "2", "3", "4"], tuple("1234"))],
)
def test_stop_as_string_or_list(stop: object, expected: tuple[str, ...]) -> None:
    assert parse_chat_request(chat(stop=stop)).stop == expected
    assert parse_completion_request(comp(stop=stop)).stop == expected
    assert sampling_fields(parse_chat_request(chat(stop=stop)))["stop"] == list(expected)


def test_content_as_list_of_text_parts() -> None:
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    req = parse_chat_request(
        {
            "model": "tiny",
            "messages": [
                {"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
                {"role": "user", "content": parts},
                {"role": "assistant", "content": None},
                {"role": "tool", "content": "42", "tool_call_id": "t1"},
            ],
        }
    )
    assert req.messages[1].content == (TextPart(text="first"), TextPart(text="second"))
    assert [m.text for m in req.messages] == ["be brief", "first\nsecond", "", "42"]
    assert req.messages[3].tool_call_id == "t1"
    assert req.template_messages() == [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": "first\nsecond"},
        {"role": "assistant", "content": ""},
        {"role": "tool", "content": "42"},
    ]


def test_sampling_fields_map_every_setting() -> None:
    req = parse_chat_request(
        chat(
            max_tokens=10,
            temperature=0,
            top_p=0.5,
            top_k=40,
            min_p=0.05,
            presence_penalty=-1,
            frequency_penalty=1.5,
            logit_bias={"17": -100, "3": 2.5},
            seed=123,
            stop="x",
            logprobs=True,
            top_logprobs=3,
            n=2,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert req.include_usage
    assert sampling_fields(req) == {
        "max_tokens": 10,
        "temperature": 0.0,
        "top_p": 0.5,
        "top_k": 40,
        "min_p": 0.05,
        "presence_penalty": -1.0,
        "frequency_penalty": 1.5,
        "logit_bias": {17: -100.0, 3: 2.5},
        "seed": 123,
        "stop": ["x"],
        "logprobs": 3,
        "n": 2,
    }
    assert sampling_fields(parse_chat_request(chat(logprobs=True)))["logprobs"] == 0
    assert sampling_fields(parse_chat_request(chat(top_k=-1)))["top_k"] == 0
    assert not parse_chat_request(chat(stream_options={"include_usage": True})).include_usage


def test_completion_request_prompts_and_logprobs() -> None:
    req = parse_completion_request(comp(prompt=["a", "b"], n=2, logprobs=2, best_of=2))
    assert req.prompt == ("a", "b")
    assert sampling_fields(req)["logprobs"] == 2
    assert parse_completion_request(comp()).prompt == ("Once",)
    assert sampling_fields(parse_completion_request(comp()))["logprobs"] is None
    assert parse_completion_request(comp(echo=False, suffix=None, best_of=1)).echo is False


# --- parsing: every invalid value names its param -------------------------------------------

CHAT_ERRORS: list[tuple[dict[str, Any], str | None, str]] = [
    ({"messages": USER}, "model", "missing_required_parameter"),
    ({"model": "tiny"}, "messages", "missing_required_parameter"),
    (chat(messages=[]), "messages", "invalid_value"),
    (chat(model=""), "model", "invalid_value"),
    (chat(model=5), "model", "invalid_type"),
    (chat(messages="hi"), "messages", "invalid_type"),
    (chat(messages=["hi"]), "messages[0]", "invalid_type"),
    (chat(messages=[*USER, {"role": "user"}]), "messages[1].content", "missing_required_parameter"),
    (chat(messages=[*USER, {"content": "x"}]), "messages[1].role", "missing_required_parameter"),
    (
        chat(messages=[*USER, {"role": "function", "content": "x"}]),
        "messages[1].role",
        "invalid_value",
    ),
    (chat(messages=[*USER, {"role": "user", "content": 5}]), "messages[1].content", "invalid_type"),
    (
        chat(
            messages=[
                *USER,
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "look"},
                        {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
                    ],
                },
            ]
        ),
        "messages[1].content[1].type",
        "unsupported_value",
    ),
    (
        chat(messages=[{"role": "user", "content": [{"type": "text"}]}]),
        "messages[0].content[0].text",
        "missing_required_parameter",
    ),
    (
        chat(messages=[{"role": "user", "content": [{"type": "text", "text": 3}]}]),
        "messages[0].content[0].text",
        "invalid_type",
    ),
    (chat(messages=[{"role": "user", "content": [7]}]), "messages[0].content[0]", "invalid_type"),
    (chat(temperature="hot"), "temperature", "invalid_type"),
    (chat(temperature=True), "temperature", "invalid_type"),
    (chat(temperature=2.5), "temperature", "invalid_value"),
    (chat(temperature=float("nan")), "temperature", "invalid_value"),
    (chat(top_p=0), "top_p", "invalid_value"),
    (chat(top_p=1.01), "top_p", "invalid_value"),
    (chat(top_k=-2), "top_k", "invalid_value"),
    (chat(top_k=2.0), "top_k", "invalid_type"),
    (chat(min_p=-0.1), "min_p", "invalid_value"),
    (chat(presence_penalty=3), "presence_penalty", "invalid_value"),
    (chat(frequency_penalty=-2.01), "frequency_penalty", "invalid_value"),
    (chat(max_tokens=True), "max_tokens", "invalid_type"),
    (chat(max_tokens="10"), "max_tokens", "invalid_type"),
    (chat(max_tokens=0), "max_tokens", "invalid_value"),
    (chat(max_completion_tokens=-1), "max_completion_tokens", "invalid_value"),
    (chat(n=0), "n", "invalid_value"),
    (chat(n="2"), "n", "invalid_type"),
    (chat(seed=1.5), "seed", "invalid_type"),
    (chat(seed=2**64), "seed", "invalid_value"),
    (chat(stream="yes"), "stream", "invalid_type"),
    (chat(stream_options=5), "stream_options", "invalid_type"),
    (chat(stream_options={"include_usage": 1}), "stream_options.include_usage", "invalid_type"),
    (chat(stop=5), "stop", "invalid_type"),
    (chat(stop=["a", 5]), "stop[1]", "invalid_type"),
    (chat(stop=["a", ""]), "stop[1]", "invalid_value"),
    (chat(stop=list("abcde")), "stop", "invalid_value"),
    (chat(logit_bias=[1]), "logit_bias", "invalid_type"),
    (chat(logit_bias={"x": 1}), "logit_bias.x", "invalid_value"),
    (chat(logit_bias={"5": 101}), "logit_bias.5", "invalid_value"),
    (chat(logit_bias={"5": "1"}), "logit_bias.5", "invalid_type"),
    (chat(logprobs=1), "logprobs", "invalid_type"),
    (chat(top_logprobs=2), "top_logprobs", "invalid_value"),
    (chat(logprobs=True, top_logprobs=21), "top_logprobs", "invalid_value"),
    (chat(user=5), "user", "invalid_type"),
    (
        chat(tools=[{"type": "function", "function": {"name": "f"}}]),
        "tools",
        "unsupported_parameter",
    ),
    (chat(response_format={"type": "json_object"}), "response_format", "unsupported_value"),
    # when several fields are wrong the first in document order is named
    (chat(model=5, temperature="hot"), "model", "invalid_type"),
]


@pytest.mark.parametrize(("body", "param", "code"), CHAT_ERRORS)
def test_chat_validation_errors_name_the_param(
    body: dict[str, Any], param: str | None, code: str
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_chat_request(body)
    err = info.value
    assert (err.param, err.code, err.status, err.type) == (
        param,
        code,
        400,
        "invalid_request_error",
    )
    assert err.to_error_body() == {
        "error": {
            "message": err.message,
            "type": "invalid_request_error",
            "param": param,
            "code": code,
        }
    }
    assert param is None or f"'{param}'" in err.message


COMPLETION_ERRORS: list[tuple[dict[str, Any], str, str]] = [
    ({"model": "tiny"}, "prompt", "missing_required_parameter"),
    (comp(prompt=[]), "prompt", "invalid_value"),
    (comp(prompt=5), "prompt", "invalid_type"),
    (comp(prompt=["a", 5]), "prompt[1]", "invalid_type"),
    (comp(prompt=[1, 2, 3]), "prompt", "unsupported_value"),
    (comp(prompt=[[1, 2], [3]]), "prompt", "unsupported_value"),
    (comp(logprobs=True), "logprobs", "invalid_type"),
    (comp(logprobs=6), "logprobs", "invalid_value"),
    (comp(echo=True), "echo", "unsupported_value"),
    (comp(echo="no"), "echo", "invalid_type"),
    (comp(suffix="tail"), "suffix", "unsupported_parameter"),
    (comp(best_of=3), "best_of", "unsupported_value"),
    (comp(n=100, prompt=["a", "b"]), "n", "invalid_value"),
    (comp(temperature=-1), "temperature", "invalid_value"),
]


@pytest.mark.parametrize(("body", "param", "code"), COMPLETION_ERRORS)
def test_completion_validation_errors_name_the_param(
    body: dict[str, Any], param: str, code: str
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_completion_request(body)
    assert (info.value.param, info.value.code) == (param, code)


@pytest.mark.parametrize("body", [None, [], "x", 3, True])
def test_body_that_is_not_an_object(body: object) -> None:
    for parse in (parse_chat_request, parse_completion_request):
        with pytest.raises(InvalidRequestError) as info:
            parse(body)
        assert info.value.param is None
        assert isinstance(info.value, ResultityError)


def test_building_in_python_validates_too() -> None:
    msg = ChatMessage(role="user", content="x")
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        ChatCompletionRequest(model="m", messages=(msg,), temperature=3.0)
    with pytest.raises(ValueError, match="content is required"):
        ChatMessage(role="user")


# --- properties -----------------------------------------------------------------------------


def floats(lo: float, hi: float, **kw: Any) -> st.SearchStrategy[float | None]:
    return st.none() | st.floats(lo, hi, allow_nan=False, **kw)


_short = st.text(max_size=12)
_part = st.builds(TextPart, text=_short)
_content = _short | st.lists(_part, max_size=3).map(tuple)
_message = st.builds(
    ChatMessage,
    role=st.sampled_from(["system", "user", "developer", "tool"]),
    content=_content,
    name=st.none() | _short,
) | st.builds(ChatMessage, role=st.just("assistant"), content=st.none() | _content)
_stop = st.lists(st.text(min_size=1, max_size=6), max_size=4).map(tuple)
_bias = st.none() | st.dictionaries(
    st.integers(0, 200_000).map(str), st.floats(-100, 100, allow_nan=False), max_size=4
)
_sampling = {
    "stop": _stop,
    "stream": st.booleans(),
    "stream_options": st.none() | st.builds(StreamOptions, include_usage=st.booleans()),
    "n": st.integers(1, 8),
    "seed": st.none() | st.integers(-(2**63), 2**64 - 1),
    "temperature": floats(0, 2),
    "top_p": floats(0, 1, exclude_min=True),
    "top_k": st.none() | st.integers(-1, 1000),
    "min_p": floats(0, 1),
    "presence_penalty": floats(-2, 2),
    "frequency_penalty": floats(-2, 2),
    "logit_bias": _bias,
    "user": st.none() | _short,
}


def draw_sampling(draw: st.DrawFn) -> dict[str, Any]:
    return {k: draw(v) for k, v in _sampling.items()}


@st.composite
def chat_requests(draw: st.DrawFn) -> ChatCompletionRequest:
    logprobs = draw(st.booleans())
    return ChatCompletionRequest(
        model=draw(st.text(min_size=1, max_size=12)),
        messages=tuple(draw(st.lists(_message, min_size=1, max_size=4))),
        max_tokens=draw(st.none() | st.integers(1, 2**31 - 1)),
        max_completion_tokens=draw(st.none() | st.integers(1, 2**31 - 1)),
        logprobs=logprobs,
        top_logprobs=draw(st.none() | st.integers(0, 20)) if logprobs else None,
        **draw_sampling(draw),
    )


@st.composite
def completion_requests(draw: st.DrawFn) -> CompletionRequest:
    return CompletionRequest(
        model=draw(st.text(min_size=1, max_size=12)),
        prompt=tuple(draw(st.lists(_short, min_size=1, max_size=3))),
        max_tokens=draw(st.none() | st.integers(1, 2**31 - 1)),
        logprobs=draw(st.none() | st.integers(0, 5)),
        **draw_sampling(draw),
    )


@given(req=chat_requests())
def test_chat_request_round_trip(req: ChatCompletionRequest) -> None:
    as_dict = request_to_dict(req)
    assert parse_chat_request(as_dict) == req
    assert parse_chat_request(json.loads(json.dumps(as_dict))) == req


@given(req=completion_requests())
def test_completion_request_round_trip(req: CompletionRequest) -> None:
    as_dict = request_to_dict(req)
    assert parse_completion_request(json.loads(json.dumps(as_dict))) == req


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
_CHAT_FIELDS = [
    "model", "messages", "max_tokens", "max_completion_tokens", "stop", "stream", "stream_options",
    "n", "seed", "temperature", "top_p", "top_k", "min_p", "presence_penalty",
    "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "user", "tools",
    "response_format",
]  # fmt: skip
_COMPLETION_FIELDS = [
    "model", "prompt", "max_tokens", "stop", "n", "temperature", "logprobs", "echo", "suffix",
    "best_of", "logit_bias", "stream_options",
]  # fmt: skip


def blamed_param(parse: Callable[[object], object], body: dict[str, Any]) -> str | None:
    """Return the param named by the error, or "<valid>" if the body parsed."""
    try:
        parse(body)
    except InvalidRequestError as err:
        return err.param
    return "<valid>"


def check_blame(parse: Callable[[object], object], body: dict[str, Any], field: str) -> None:
    param = blamed_param(parse, body)
    assert param is not None
    assert param in ("<valid>", field) or param.startswith((f"{field}.", f"{field}["))


@given(field=st.sampled_from(_CHAT_FIELDS), value=_json)
def test_any_bad_chat_value_is_a_clean_error_naming_that_field(field: str, value: object) -> None:
    check_blame(parse_chat_request, {**chat(), field: value}, field)


@given(field=st.sampled_from(_COMPLETION_FIELDS), value=_json)
def test_any_bad_completion_value_is_a_clean_error_naming_that_field(
    field: str, value: object
) -> None:
    check_blame(parse_completion_request, {**comp(), field: value}, field)


@given(body=st.dictionaries(st.sampled_from(_CHAT_FIELDS), _json, max_size=6))
def test_arbitrary_bodies_never_raise_anything_else(body: dict[str, Any]) -> None:
    for parse in (parse_chat_request, parse_completion_request):
        blamed_param(parse, body)  # raises if anything but InvalidRequestError escapes


# --- responses: the official client's models accept them ------------------------------------

LOGPROBS = ChatLogprobs(
    content=(
        ChatTokenLogprob(
            token="Hi",
            logprob=-0.25,
            bytes=(72, 105),
            top_logprobs=(
                TopLogprob(token="Hi", logprob=-0.25, bytes=(72, 105)),
                TopLogprob(token="Hey", logprob=float("-inf"), bytes=None),
            ),
        ),
    )
)


def make_chat_completion(n: int = 1) -> ChatCompletion:
    return ChatCompletion(
        id="chatcmpl-1",
        created=1_700_000_000,
        model="tiny",
        choices=tuple(
            ChatChoice(
                index=i,
                message=ChatMessageOut(content=f"Hi {i}"),
                finish_reason="stop" if i == 0 else "length",
                logprobs=LOGPROBS,
            )
            for i in range(n)
        ),
        usage=Usage.of(5, 2 * n),
        system_fingerprint="fp_resultity",
    )


def test_chat_completion_shape_and_openai_model() -> None:
    d = make_chat_completion().to_dict()
    assert list(d) == [
        "id", "object", "created", "model", "choices", "usage", "system_fingerprint"
    ]  # fmt: skip
    assert d["object"] == "chat.completion"
    assert d["choices"][0] == {
        "index": 0,
        "message": {"role": "assistant", "content": "Hi 0", "refusal": None},
        "logprobs": {
            "content": [
                {
                    "token": "Hi",
                    "logprob": -0.25,
                    "bytes": [72, 105],
                    "top_logprobs": [
                        {"token": "Hi", "logprob": -0.25, "bytes": [72, 105]},
                        {"token": "Hey", "logprob": -9999.0, "bytes": None},
                    ],
                }
            ],
            "refusal": None,
        },
        "finish_reason": "stop",
    }
    assert d["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    parsed = OAChatCompletion.model_validate(d)
    assert_no_extra(parsed)
    assert parsed.choices[0].logprobs is not None
    assert parsed.choices[0].logprobs.content is not None
    assert parsed.choices[0].logprobs.content[0].top_logprobs[1].logprob == -9999.0
    json.dumps(d, allow_nan=False)


def test_chat_chunks_shape_and_openai_model() -> None:
    first = ChatCompletionChunk(
        id="c1",
        created=1,
        model="tiny",
        choices=(ChatChunkChoice(index=0, delta=ChunkDelta(role="assistant", content="")),),
    )
    middle = ChatCompletionChunk(
        id="c1",
        created=1,
        model="tiny",
        choices=(ChatChunkChoice(index=0, delta=ChunkDelta(content="Hi"), logprobs=LOGPROBS),),
    )
    last = ChatCompletionChunk(
        id="c1",
        created=1,
        model="tiny",
        choices=(ChatChunkChoice(index=0, delta=ChunkDelta(), finish_reason="length"),),
    )
    usage = ChatCompletionChunk(id="c1", created=1, model="tiny", choices=(), usage=Usage.of(3, 4))
    assert first.to_dict()["choices"][0] == {
        "index": 0,
        "delta": {"role": "assistant", "content": ""},
        "logprobs": None,
        "finish_reason": None,
    }
    assert middle.to_dict()["choices"][0]["delta"] == {"content": "Hi"}
    assert last.to_dict()["choices"][0]["delta"] == {}
    assert first.to_dict()["usage"] is None
    assert usage.to_dict()["choices"] == []
    assert usage.to_dict()["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "total_tokens": 7,
    }
    for chunk in (first, middle, last, usage):
        d = chunk.to_dict()
        assert d["object"] == "chat.completion.chunk"
        assert_no_extra(OAChatCompletionChunk.model_validate(d))


def test_completion_and_chunk_shape_and_openai_model() -> None:
    lp = CompletionLogprobs(
        tokens=("Once", " upon"),
        token_logprobs=(-1.0, float("-inf")),
        top_logprobs=({"Once": -1.0, "Twice": -2.0}, {" upon": -0.5}),
        text_offset=(0, 4),
    )
    done = Completion(
        id="cmpl-1",
        created=2,
        model="tiny",
        choices=(CompletionChoice(index=0, text="Once upon", finish_reason="length", logprobs=lp),),
        usage=Usage.of(1, 2),
    )
    d = done.to_dict()
    assert d["object"] == "text_completion"
    assert d["choices"][0] == {
        "text": "Once upon",
        "index": 0,
        "logprobs": {
            "tokens": ["Once", " upon"],
            "token_logprobs": [-1.0, -9999.0],
            "top_logprobs": [{"Once": -1.0, "Twice": -2.0}, {" upon": -0.5}],
            "text_offset": [0, 4],
        },
        "finish_reason": "length",
    }
    assert_no_extra(OACompletion.model_validate(d))
    streaming = CompletionChunk(
        id="cmpl-1", created=2, model="tiny", choices=(CompletionChunkChoice(index=0, text="On"),)
    )
    d = streaming.to_dict()
    assert d["choices"][0] == {"text": "On", "index": 0, "logprobs": None, "finish_reason": None}
    assert d["object"] == "text_completion"
    assert d["usage"] is None
    ended = CompletionChunk(
        id="cmpl-1",
        created=2,
        model="tiny",
        choices=(CompletionChunkChoice(index=0, text="", finish_reason="stop"),),
    )
    assert_no_extra(OACompletion.model_validate(ended.to_dict()))


def test_model_list_shape_and_openai_model() -> None:
    listing = ModelList(data=(ModelCard(id="tiny", created=0, owned_by="resultity"),))
    d = listing.to_dict()
    assert d == {
        "object": "list",
        "data": [{"id": "tiny", "object": "model", "created": 0, "owned_by": "resultity"}],
    }
    assert_no_extra(OAModel.model_validate(d["data"][0]))


@given(
    contents=st.lists(st.none() | st.text(max_size=10), min_size=1, max_size=3),
    reason=st.sampled_from(["stop", "length", "content_filter", "tool_calls", "function_call"]),
    tokens=st.integers(0, 10**6),
)
def test_any_chat_completion_satisfies_the_openai_model(
    contents: list[str | None], reason: Any, tokens: int
) -> None:
    cc = ChatCompletion(
        id="x",
        created=tokens,
        model="m",
        choices=tuple(
            ChatChoice(index=i, message=ChatMessageOut(content=c), finish_reason=reason)
            for i, c in enumerate(contents)
        ),
        usage=Usage.of(tokens, tokens),
    )
    parsed = OAChatCompletion.model_validate(json.loads(json.dumps(cc.to_dict())))
    assert [c.message.content for c in parsed.choices] == contents
    assert [c.finish_reason for c in parsed.choices] == [reason] * len(contents)


def test_finish_reason_is_checked_against_openai_values() -> None:
    # the type says it; the openai model enforces the same set
    bad = make_chat_completion().to_dict()
    bad["choices"][0]["finish_reason"] = "eos"
    with pytest.raises(pydantic.ValidationError):
        OAChatCompletion.model_validate(bad)


# --- errors ---------------------------------------------------------------------------------


def test_error_table_and_constructors() -> None:
    assert dict(ERROR_STATUS) == {
        "invalid_request": 400,
        "invalid_api_key": 401,
        "insufficient_quota": 402,
        "model_not_found": 404,
        "request_too_large": 413,
        "rate_limit_exceeded": 429,
        "server_error": 500,
        "no_capacity": 503,
    }
    assert all(issubclass(c, OpenAIRequestError) for c in ERROR_KINDS.values())
    assert invalid_api_key().to_error_body()["error"]["code"] == "invalid_api_key"
    assert insufficient_quota().status == 402
    assert insufficient_quota(status=429).status == 429
    assert "100" in insufficient_quota(needed=100, available=5).message
    nf = model_not_found("gpt-9")
    assert (nf.status, nf.param, nf.code) == (404, "model", "model_not_found")
    assert "`gpt-9`" in nf.message
    assert no_capacity("tiny").to_error_body()["error"]["type"] == "server_error"
    assert request_too_large(1024).status == 413
    assert invalid_request("bad", "temperature").to_error_body() == error_body(
        "bad", "invalid_request_error", "temperature", None
    )
    assert set(error_body("m")["error"]) == {"message", "type", "param", "code"}


# --- the official client, end to end through an in-process transport ------------------------

Handler = Callable[[Any], Any]


@pytest.fixture
def client_for() -> Iterator[Callable[[Handler], openai.OpenAI]]:
    clients: list[openai.OpenAI] = []

    def make(handler: Handler) -> openai.OpenAI:
        http = httpx.Client(transport=httpx.MockTransport(handler))
        client = openai.OpenAI(
            api_key="sk-test", base_url="http://cloud.test/v1", http_client=http, max_retries=0
        )
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.close()


def sse(*chunks: bytes) -> Any:
    return httpx.Response(
        200, headers={"content-type": "text/event-stream"}, content=b"".join(chunks)
    )


def test_client_chat_non_stream(client_for: Callable[[Handler], openai.OpenAI]) -> None:
    seen: list[ChatCompletionRequest] = []

    def handler(request: Any) -> Any:
        assert request.url.path == "/v1/chat/completions"
        seen.append(parse_chat_request(json.loads(request.content)))
        return httpx.Response(200, json=make_chat_completion(n=2).to_dict())

    client = client_for(handler)
    out = client.chat.completions.create(
        model="tiny",
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        ],
        max_completion_tokens=8,
        stop=["\n\n"],
        seed=7,
        n=2,
        temperature=0.7,
        top_p=0.9,
        presence_penalty=0.5,
        frequency_penalty=0.25,
        logit_bias={"42": -100},
        logprobs=True,
        top_logprobs=2,
        user="u1",
        extra_body={"top_k": 40, "min_p": 0.05},
    )
    (req,) = seen
    assert sampling_fields(req) == {
        "max_tokens": 8,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 40,
        "min_p": 0.05,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.25,
        "logit_bias": {42: -100.0},
        "seed": 7,
        "stop": ["\n\n"],
        "logprobs": 2,
        "n": 2,
    }
    assert req.messages[1].text == "hi"
    assert [c.message.content for c in out.choices] == ["Hi 0", "Hi 1"]
    assert out.usage is not None
    assert out.usage.total_tokens == 9
    assert out.system_fingerprint == "fp_resultity"


def test_client_chat_stream_with_usage(client_for: Callable[[Handler], openai.OpenAI]) -> None:
    def handler(request: Any) -> Any:
        req = parse_chat_request(json.loads(request.content))
        assert req.stream
        assert req.include_usage

        def chunk(choices: tuple[ChatChunkChoice, ...], usage: Usage | None = None) -> bytes:
            c = ChatCompletionChunk(id="c9", created=3, model="tiny", choices=choices, usage=usage)
            return encode_event(c.to_dict())

        return sse(
            chunk((ChatChunkChoice(index=0, delta=ChunkDelta(role="assistant", content="")),)),
            chunk((ChatChunkChoice(index=0, delta=ChunkDelta(content="Hel")),)),
            chunk((ChatChunkChoice(index=0, delta=ChunkDelta(content="lo ☃")),)),
            chunk((ChatChunkChoice(index=0, delta=ChunkDelta(), finish_reason="stop"),)),
            chunk((), Usage.of(4, 3)),
            DONE,
        )

    client = client_for(handler)
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello ☃"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3


def test_client_completions(client_for: Callable[[Handler], openai.OpenAI]) -> None:
    def handler(request: Any) -> Any:
        req = parse_completion_request(json.loads(request.content))
        if not req.stream:
            choice = CompletionChoice(index=0, text=" upon", finish_reason="length")
            body = Completion(
                id="k", created=1, model="tiny", choices=(choice,), usage=Usage.of(1, 1)
            )
            return httpx.Response(200, json=body.to_dict())
        parts = [
            CompletionChunk(id="k", created=1, model="tiny", choices=(ch,))
            for ch in (
                CompletionChunkChoice(index=0, text=" up"),
                CompletionChunkChoice(index=0, text="on", finish_reason="stop"),
            )
        ]
        return sse(*(encode_event(p.to_dict()) for p in parts), DONE)

    client = client_for(handler)
    out = client.completions.create(model="tiny", prompt="Once", max_tokens=1, logprobs=0)
    assert out.choices[0].text == " upon"
    streamed = list(client.completions.create(model="tiny", prompt=["Once"], stream=True))
    assert "".join(c.choices[0].text for c in streamed) == " upon"
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_client_models_list(client_for: Callable[[Handler], openai.OpenAI]) -> None:
    listing = ModelList(data=(ModelCard(id="tiny", created=5, owned_by="resultity"),))
    client = client_for(lambda request: httpx.Response(200, json=listing.to_dict()))
    assert [m.id for m in client.models.list()] == ["tiny"]


@pytest.mark.parametrize(
    ("error", "exc_type"),
    [
        (invalid_request("Invalid 'temperature'.", "temperature"), openai.BadRequestError),
        (invalid_api_key(), openai.AuthenticationError),
        (insufficient_quota(), openai.APIStatusError),
        (insufficient_quota(status=429), openai.RateLimitError),
        (model_not_found("nope"), openai.NotFoundError),
        (request_too_large(10), openai.APIStatusError),
        (no_capacity("tiny"), openai.InternalServerError),
    ],
)
def test_client_raises_our_errors_with_their_body(
    client_for: Callable[[Handler], openai.OpenAI],
    error: OpenAIRequestError,
    exc_type: type[openai.APIStatusError],
) -> None:
    client = client_for(lambda request: httpx.Response(error.status, json=error.to_error_body()))
    with pytest.raises(exc_type) as info:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == error.status
    assert info.value.body == error.to_error_body()["error"]
    assert info.value.code == error.code
    assert info.value.param == error.param


def test_client_raises_on_error_event_mid_stream(
    client_for: Callable[[Handler], openai.OpenAI],
) -> None:
    def handler(request: Any) -> Any:
        c = ChatCompletionChunk(
            id="c", created=1, model="tiny",
            choices=(ChatChunkChoice(index=0, delta=ChunkDelta(content="partial")),),
        )  # fmt: skip
        return sse(encode_event(c.to_dict()), error_event(no_capacity("tiny")))

    client = client_for(handler)
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "x"}], stream=True
    )
    got: list[str | None] = []
    with pytest.raises(openai.APIError, match="No node can serve"):
        got.extend(c.choices[0].delta.content for c in stream)
    assert got == ["partial"]


# --- response builders ----------------------------------------------------------------------


def tok(text: str, logprob: float) -> ChatTokenLogprob:
    return ChatTokenLogprob(
        token=text,
        logprob=logprob,
        bytes=tuple(text.encode()),
        top_logprobs=(TopLogprob(token=text, logprob=logprob, bytes=tuple(text.encode())),),
    )


def test_chat_builder_stream_n2_interleaved_through_the_client(
    client_for: Callable[[Handler], openai.OpenAI],
) -> None:
    def handler(request: Any) -> Any:
        req = parse_chat_request(json.loads(request.content))
        b = ChatResponseBuilder(id="chatcmpl-b", created=9, model=req.model, n=req.n)
        chunks = [
            b.start(),
            b.add(0, "Hel", [tok("Hel", -0.5)]),
            b.add(1, "Bye", [tok("Bye", -1.5)]),
            b.add(0, "lo", [tok("lo", -0.25)]),
            b.finish(1, "length"),
            b.finish(0, "stop"),
        ]
        if req.include_usage:
            chunks.append(b.usage_chunk(Usage.of(2, 3)))
        return sse(*(encode_event(c.to_dict()) for c in chunks), DONE)

    client = client_for(handler)
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        n=2,
        logprobs=True,
        top_logprobs=1,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts = ["", ""]
    reasons: dict[int, str | None] = {}
    logprobs: list[float] = []
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
            if choice.logprobs and choice.logprobs.content:
                logprobs += [t.logprob for t in choice.logprobs.content]
    assert texts == ["Hello", "Bye"]
    assert reasons == {0: "stop", 1: "length"}
    assert logprobs == [-0.5, -1.5, -0.25]
    assert usage is not None
    assert usage.total_tokens == 5


def test_chat_builder_non_stream() -> None:
    b = ChatResponseBuilder(id="x", created=1, model="m", n=2, system_fingerprint="fp")
    b.start()
    b.add(1, "b", [tok("b", -1.0)])
    b.add(0, "a", [tok("a", -2.0)])
    b.add(0, "c", [tok("c", -3.0)])
    b.finish(0, "stop")
    with pytest.raises(OpenAIRequestError, match=r"\[1\] have not finished"):
        b.completion(Usage.of(1, 3))
    b.finish(1, "length")
    with pytest.raises(OpenAIRequestError, match="already finished"):
        b.add(1, "late")
    with pytest.raises(OpenAIRequestError, match="out of range"):
        b.add(2, "x")
    done = b.completion(Usage.of(1, 3), logprobs=True)
    parsed = OAChatCompletion.model_validate(done.to_dict())
    assert [c.message.content for c in parsed.choices] == ["ac", "b"]
    assert [c.finish_reason for c in parsed.choices] == ["stop", "length"]
    lp = parsed.choices[0].logprobs
    assert lp is not None
    assert lp.content is not None
    assert [t.token for t in lp.content] == ["a", "c"]
    assert b.completion(Usage.of(1, 3)).choices[0].logprobs is None


def test_completion_builder_stream_and_final(
    client_for: Callable[[Handler], openai.OpenAI],
) -> None:
    def lp(text: str, offset: int) -> CompletionLogprobs:
        return CompletionLogprobs(
            tokens=(text,),
            token_logprobs=(-1.0,),
            top_logprobs=({text: -1.0},),
            text_offset=(offset,),
        )

    def build() -> tuple[CompletionResponseBuilder, list[CompletionChunk]]:
        b = CompletionResponseBuilder(id="cmpl-b", created=4, model="tiny", n=2)
        chunks = [
            b.add(0, " up", lp(" up", 4)),
            b.add(1, " and", lp(" and", 4)),
            b.add(0, "on", lp("on", 7)),
            b.finish(0, "stop"),
            b.finish(1, "length"),
            b.usage_chunk(Usage.of(1, 3)),
        ]
        return b, chunks

    def handler(request: Any) -> Any:
        req = parse_completion_request(json.loads(request.content))
        b, chunks = build()
        if req.stream:
            return sse(*(encode_event(c.to_dict()) for c in chunks), DONE)
        return httpx.Response(200, json=b.completion(Usage.of(1, 3), logprobs=True).to_dict())

    client = client_for(handler)
    texts = ["", ""]
    for chunk in client.completions.create(model="tiny", prompt="Once", n=2, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [" upon", " and"]
    out = client.completions.create(model="tiny", prompt="Once", n=2, logprobs=1)
    assert [c.text for c in out.choices] == [" upon", " and"]
    assert out.choices[0].logprobs is not None
    assert out.choices[0].logprobs.tokens == [" up", "on"]
    assert out.choices[0].logprobs.text_offset == [4, 7]
    assert_no_extra(out)
