"""What a leased job asks the node to run, and the digests its Receipt carries.

A ``Lease.request`` is the JSON form of the parsed OpenAI request (``request_to_dict``): a
chat request has ``messages``, a completion request ``prompt``. Leases travel as canonical
JSON, so fractional settings may arrive as decimal strings (``"temperature": "0.7"``); they
are read back as numbers and the request is checked with the core's OpenAI parsers.

To the Runtime the node sends its own sampling object (``check_sampling``): integers, decimal
strings for the fractional settings, nothing else. A completion with several prompts runs one
Runtime request per prompt; choice ``i * n + j`` is sample ``j`` of prompt ``i``.

``job_request_hash`` and ``job_output_hash`` are the Receipt's digests; the Network can
recompute both (from the lease and from the streamed events).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

import attrs

from resultity_core import (
    ChatCompletionRequest,
    OpenAIRequestError,
    canonical_digest,
    parse_chat_request,
    parse_completion_request,
    sampling_fields,
)

from ._errors import JobSpecError

__all__ = [
    "DECIMAL_FIELDS",
    "JobSpec",
    "check_sampling",
    "decimal_text",
    "job_output_hash",
    "job_request_hash",
    "parse_job_request",
]

DECIMAL_FIELDS = (
    "temperature",
    "top_p",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
)
_DECIMAL = re.compile(r"-?[0-9]{1,12}(\.[0-9]{1,20})?([eE][-+]?[0-9]{1,3})?")
_MAX_STOP = 16
_MAX_N = 128


def decimal_text(value: float | int) -> str | int:
    """Return ``value`` in its pipe form: an int as is, a float as its shortest decimal text."""
    if isinstance(value, int):
        return value
    return repr(float(value))


def _is_decimal(value: object) -> bool:
    return not isinstance(value, bool) and (
        isinstance(value, int) or (isinstance(value, str) and bool(_DECIMAL.fullmatch(value)))
    )


def _int(obj: Mapping[str, Any], key: str, path: str, lo: int, hi: int) -> None:
    value = obj.get(key)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise JobSpecError(f"{path}.{key}", f"must be an integer in [{lo}, {hi}]")


def check_sampling(obj: object, path: str = "sampling") -> dict[str, Any]:
    """Return a copy of a Runtime sampling object when every key has the right type.

    Keys (all optional): ``max_tokens`` (int or null: up to the context), the
    ``DECIMAL_FIELDS`` (decimal strings or ints), ``top_k``, ``seed``, ``logprobs``
    (int or null), ``n``, ``stop`` (strings), ``logit_bias`` (token id -> decimal),
    ``ignore_eos`` (bool). Raises JobSpecError naming the first bad field.
    """
    if not isinstance(obj, Mapping):
        raise JobSpecError(path, "must be a JSON object")
    out = dict(obj)
    for key in DECIMAL_FIELDS:
        if out.get(key) is not None and not _is_decimal(out[key]):
            raise JobSpecError(f"{path}.{key}", "must be a decimal string or an integer")
    _int(out, "max_tokens", path, 1, 2**31 - 1)
    _int(out, "top_k", path, -1, 2**31 - 1)
    _int(out, "n", path, 1, _MAX_N)
    _int(out, "seed", path, -(2**63), 2**64 - 1)
    _int(out, "logprobs", path, 0, 20)
    stop = out.get("stop", [])
    if not isinstance(stop, list) or len(stop) > _MAX_STOP or not all(
        isinstance(s, str) and s for s in stop
    ):
        raise JobSpecError(f"{path}.stop", f"must be a list of at most {_MAX_STOP} strings")
    bias = out.get("logit_bias", {})
    if not isinstance(bias, Mapping):
        raise JobSpecError(f"{path}.logit_bias", "must be a JSON object")
    for token, value in bias.items():
        if not token.isdigit() or not _is_decimal(value):
            raise JobSpecError(f"{path}.logit_bias.{token}",
                               "keys must be token ids, values decimal strings")
    if not isinstance(out.get("ignore_eos", False), bool):
        raise JobSpecError(f"{path}.ignore_eos", "must be a boolean")
    return out


@attrs.frozen
class JobSpec:
    """A checked job: chat ``messages`` or completion ``prompts``, and Runtime sampling.

    ``n`` is the number of choices per prompt; the job has ``n * len(prompts)`` choices (a
    chat job has one "prompt").
    """

    kind: str
    messages: tuple[dict[str, str], ...] | None
    prompts: tuple[str, ...]
    sampling: dict[str, Any]

    @property
    def n(self) -> int:
        """Choices per prompt."""
        n = self.sampling.get("n", 1)
        return n if isinstance(n, int) and n >= 1 else 1

    @property
    def choices(self) -> int:
        """Choices of the whole job."""
        return self.n * max(1, len(self.prompts))


def _numbers(obj: Mapping[str, Any]) -> dict[str, Any]:
    """Return the request with decimal-string settings turned back into numbers."""
    out = dict(obj)
    for key in DECIMAL_FIELDS:
        value = out.get(key)
        if isinstance(value, str):
            try:
                out[key] = float(Decimal(value))
            except InvalidOperation:
                raise JobSpecError(f"request.{key}", "must be a number") from None
    bias = out.get("logit_bias")
    if isinstance(bias, Mapping):
        out["logit_bias"] = {
            k: float(Decimal(v)) if isinstance(v, str) and _DECIMAL.fullmatch(v) else v
            for k, v in bias.items()
        }
    return out


def parse_job_request(obj: object) -> JobSpec:
    """Return the JobSpec of a ``Lease.request`` (an OpenAI chat or completion request).

    Raises JobSpecError naming the first bad field (as the OpenAI parsers report it).
    """
    if not isinstance(obj, Mapping):
        raise JobSpecError("request", "must be a JSON object")
    body = _numbers(obj)
    try:
        if "messages" in body:
            chat = parse_chat_request(body)
            fields = sampling_fields(chat)
            request: Any = chat
        elif "prompt" in body:
            request = parse_completion_request(body)
            fields = sampling_fields(request)
        else:
            raise JobSpecError("request", "needs messages (chat) or prompt (completion)")
    except OpenAIRequestError as exc:
        raise JobSpecError(f"request.{getattr(exc, 'param', None) or ''}".rstrip("."),
                           str(exc)) from None
    sampling: dict[str, Any] = {
        "max_tokens": fields["max_tokens"],
        "top_k": fields["top_k"],
        "seed": fields["seed"],
        "stop": list(fields["stop"]),
        "logprobs": fields["logprobs"],
        "n": fields["n"],
        "logit_bias": {str(k): decimal_text(v) for k, v in fields["logit_bias"].items()},
    }
    for key in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty"):
        sampling[key] = decimal_text(fields[key])
    sampling = check_sampling(sampling, "request")
    if isinstance(request, ChatCompletionRequest):
        return JobSpec("chat", tuple(request.template_messages()), (), sampling)
    return JobSpec("completion", None, tuple(request.prompt), sampling)


def job_request_hash(request: Mapping[str, Any]) -> str:
    """Return the Receipt's ``request_hash``: ``sha256:`` of the lease request's canonical bytes.

    Raises CanonicalEncodingError when it has no canonical form.
    """
    return canonical_digest(dict(request))


def job_output_hash(texts: Sequence[str], finish_reasons: Sequence[str | None]) -> str:
    """Return the Receipt's ``output_hash``: ``sha256:`` of the canonical bytes of
    ``{"choices": [{"index": i, "text": texts[i], "finish_reason": finish_reasons[i]}, ...]}``.

    Raises ValueError when the two sequences differ in length.
    """
    if len(texts) != len(finish_reasons):
        raise ValueError("texts and finish_reasons must have the same length")
    choices = [
        {"index": i, "text": t, "finish_reason": r}
        for i, (t, r) in enumerate(zip(texts, finish_reasons, strict=True))
    ]
    return canonical_digest({"choices": choices})
