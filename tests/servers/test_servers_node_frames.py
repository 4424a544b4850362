"""The Agent <-> Runtime frame protocol and the job request parsing (no processes)."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resultity_core import canonical_bytes, canonical_digest
from resultity_servers.node import (
    Abort,
    ErrorFrame,
    FrameDecoder,
    FrameError,
    Generate,
    JobSpecError,
    LoadModel,
    ModelLoaded,
    Ping,
    Pong,
    Ready,
    Shutdown,
    TokenEvent,
    check_sampling,
    decode_frame_body,
    encode_frame,
    job_output_hash,
    job_request_hash,
    parse_job_request,
)

MESSAGES = [
    LoadModel("tiny", "/models/tiny", kv_cache_bytes=1 << 20, max_model_len=256),
    Generate("job-1", "Hello", None, {"max_tokens": 4, "temperature": "0.7", "stop": ["\n"]}),
    Generate("job-2", None, [{"role": "user", "content": "Hi"}], {}),
    Abort("job-1"),
    Ping(7),
    Shutdown(),
    Ready(1234, "0.1.0", {"network_namespace": True}),
    ModelLoaded("tiny", 4096),
    Pong(7, 2),
    TokenEvent("job-1", 0, " wörld", [5, 6]),
    TokenEvent("job-1", 1, "", [], "length", {"prompt_tokens": 3, "completion_tokens": 4},
               [{"token": " a", "logprob": "-0.5", "top_logprobs": []}]),
    ErrorFrame("job-1", "prompt: too long"),
    ErrorFrame(None, "engine crashed", fatal=True),
]


def frame(payload: object) -> bytes:
    body = json.dumps(payload).encode()
    return struct.pack(">I", len(body)) + body


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: m.TYPE)
def test_round_trip_is_canonical(message: object) -> None:
    data = encode_frame(message)  # type: ignore[arg-type]
    (length,) = struct.unpack(">I", data[:4])
    assert length == len(data) - 4
    assert data[4:] == canonical_bytes(message.to_payload())  # type: ignore[attr-defined]
    assert FrameDecoder().feed(data) == [message]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=30))
def test_any_split_of_the_stream_gives_the_same_messages(cuts: list[int]) -> None:
    stream = b"".join(encode_frame(m) for m in MESSAGES)
    decoder = FrameDecoder()
    out = []
    pos = 0
    for cut in cuts:
        out += decoder.feed(stream[pos:pos + cut])
        pos += cut
    out += decoder.feed(stream[pos:])
    assert out == MESSAGES
    assert decoder.pending == 0


def test_oversize_frame_is_refused_from_its_header() -> None:
    decoder = FrameDecoder(max_frame=100)
    with pytest.raises(FrameError, match="exceed the 100-byte frame limit"):
        decoder.feed(struct.pack(">I", 101))  # refused before any body byte arrives
    assert decoder.failed
    with pytest.raises(FrameError, match="already failed"):
        decoder.feed(encode_frame(Ping(1)))


def test_encoder_refuses_oversize_messages() -> None:
    with pytest.raises(FrameError, match="frame limit"):
        encode_frame(TokenEvent("j", 0, "x" * 200), max_frame=100)


@pytest.mark.parametrize(
    ("data", "field", "reason"),
    [
        (struct.pack(">I", 5) + b"hello", "<frame>", "invalid JSON"),
        (struct.pack(">I", 2) + b"\xff\xfe", "<frame>", "UTF-8"),
        (frame([1, 2]), "<frame>", "JSON object"),
        (frame({"_type": "nope"}), "_type", "unknown message type"),
        (frame({"_type": "ping"}), "seq", "missing"),
        (frame({"_type": "ping", "seq": 1, "extra": 1}), "extra", "unknown field"),
        (frame({"_type": "ping", "seq": "1"}), "seq", "integer"),
        (frame({"_type": "ping", "seq": 1.5}), "seq", "floats"),
        (frame({"_type": "ping", "seq": True}), "seq", "integer"),
        (struct.pack(">I", 25) + b'{"_type":"ping","seq":1,"seq":2}'[:25], "<frame>", ""),
        (frame({"_type": "token", "job_id": "j", "finish_reason": "exploded"}),
         "finish_reason", "one of"),
        (frame({"_type": "token", "job_id": "j", "token_ids": [-1]}), "token_ids", "non-neg"),
        (frame({"_type": "token", "job_id": "j", "usage": {"prompt_tokens": 1}}), "usage", ""),
        (frame({"_type": "generate", "job_id": "j", "prompt": "a", "messages": [],
                "sampling": {}}), "prompt", "exactly one"),
        (frame({"_type": "generate", "job_id": "j", "prompt": "a",
                "sampling": {"temperature": "hot"}}), "sampling.temperature", "decimal"),
        (frame({"_type": "ready", "pid": 0, "version": "x", "sandbox": {}}), "pid", "integer"),
    ],
)
def test_garbage_is_refused_naming_the_field(data: bytes, field: str, reason: str) -> None:
    with pytest.raises(FrameError) as info:
        FrameDecoder().feed(data)
    assert info.value.field == field
    assert reason in info.value.reason


def test_duplicate_keys_are_refused() -> None:
    with pytest.raises(FrameError, match="duplicate key"):
        decode_frame_body(b'{"_type":"ping","seq":1,"seq":2}')


def test_valid_frames_before_garbage_are_not_delivered_after_failure() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(encode_frame(Ping(1))) == [Ping(1)]
    with pytest.raises(FrameError):
        decoder.feed(struct.pack(">I", 3) + b"{x}")
    assert decoder.failed


# --- job requests ---------------------------------------------------------------------------


def test_chat_request_with_decimal_strings() -> None:
    spec = parse_job_request({
        "model": "tiny", "messages": [{"role": "user", "content": "Hi"}],
        "temperature": "0.7", "top_p": "0.9", "max_tokens": 5, "n": 2, "seed": 3,
        "stop": ["\n"], "logprobs": True, "top_logprobs": 2, "logit_bias": {"5": "-100"},
    })
    assert spec.kind == "chat"
    assert spec.messages == ({"role": "user", "content": "Hi"},)
    assert spec.choices == 2
    s = spec.sampling
    assert (s["temperature"], s["top_p"], s["max_tokens"], s["n"], s["seed"]) == (
        "0.7", "0.9", 5, 2, 3)
    assert s["stop"] == ["\n"]
    assert s["logprobs"] == 2
    assert s["logit_bias"] == {"5": "-100.0"}
    canonical_bytes(s)  # no floats reach the pipe


def test_completion_request_with_several_prompts() -> None:
    spec = parse_job_request({"model": "tiny", "prompt": ["a", "b", "c"], "n": 2})
    assert spec.kind == "completion"
    assert spec.prompts == ("a", "b", "c")
    assert spec.choices == 6
    assert spec.sampling["temperature"] == "1.0"


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        ({"model": "tiny"}, "request"),
        ({"model": "tiny", "messages": []}, "request.messages"),
        ({"model": "tiny", "prompt": "a", "temperature": "warm"}, "request.temperature"),
        ({"model": "tiny", "prompt": "a", "temperature": 9}, "request.temperature"),
        ([1], "request"),
    ],
)
def test_bad_job_requests_name_the_field(request_: object, field: str) -> None:
    with pytest.raises(JobSpecError) as info:
        parse_job_request(request_)
    assert info.value.field == field


def test_check_sampling_refuses_floats_and_bad_types() -> None:
    with pytest.raises(JobSpecError, match=r"sampling\.top_p\b"):
        check_sampling({"top_p": 0.5})
    with pytest.raises(JobSpecError, match=r"sampling\.stop\b"):
        check_sampling({"stop": [""]})
    with pytest.raises(JobSpecError, match=r"sampling\.n\b"):
        check_sampling({"n": 0})


def test_receipt_digests() -> None:
    request = {"model": "tiny", "prompt": "a"}
    assert job_request_hash(request) == canonical_digest(request)
    digest = job_output_hash(["ab", "c"], ["stop", "length"])
    assert digest == canonical_digest({"choices": [
        {"index": 0, "text": "ab", "finish_reason": "stop"},
        {"index": 1, "text": "c", "finish_reason": "length"}]})
    assert job_output_hash(["ab", "c"], ["stop", "stop"]) != digest
    with pytest.raises(ValueError, match="same length"):
        job_output_hash(["a"], [])


def test_public_surface_imports_without_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys, resultity_servers.node as n\n"
        "missing = [name for name in n.__all__ if not hasattr(n, name)]\n"
        "assert not missing, missing\n"
        "assert 'torch' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=8)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                 max_size=4),
    max_leaves=12,
)
_FIELDS = sorted({name for m in MESSAGES for name in m.SPEC} | {"_type"})


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([m.TYPE for m in MESSAGES] + ["bogus"]),
    st.dictionaries(st.sampled_from(_FIELDS), _JSON, max_size=8),
)
def test_random_payloads_decode_or_raise_frame_error(tag: str, fields: dict[str, object]
                                                     ) -> None:
    payload = {**fields, "_type": tag}
    try:
        messages = FrameDecoder().feed(frame(payload))
    except FrameError:
        return
    (message,) = messages
    assert FrameDecoder().feed(encode_frame(message)) == [message]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_never_raise_anything_but_frame_error(data: bytes) -> None:
    decoder = FrameDecoder(max_frame=32)
    try:
        decoder.feed(data)
    except FrameError:
        assert decoder.failed
