"""Parsing OpenAI request bodies into request types, and what the servers take from them.

A cattrs converter with strict hooks (no ``"5"`` -> 5, no ``true`` -> 1) and detailed
validation; every failure becomes one ``InvalidRequestError`` whose ``param`` names the first
bad field in document order (``messages[1].content``, ``stop[0]``, ``temperature``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, TypedDict, TypeVar, get_args, get_origin

import attrs
import cattrs
from cattrs.errors import (
    AttributeValidationNote,
    IterableValidationError,
    IterableValidationNote,
)
from cattrs.gen import make_dict_structure_fn, override

from ._errors import InvalidRequestError
from ._openai_requests import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    FieldError,
    TextPart,
)

__all__ = [
    "SamplingFields",
    "parse_chat_request",
    "parse_completion_request",
    "request_to_dict",
    "sampling_fields",
]

T = TypeVar("T")
_Path = list[str | int]


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _type_error(expected: str, value: object, path: _Path | None = None) -> FieldError:
    return FieldError(path or [], f"expected {expected}, got {_json_type(value)}", "invalid_type")


def _structure_str(value: object, _t: object) -> str:
    if not isinstance(value, str):
        raise _type_error("a string", value)
    return value


def _structure_int(value: object, _t: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error("an integer", value)
    return value


def _structure_float(value: object, _t: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _type_error("a number", value)
    return float(value)


def _structure_bool(value: object, _t: object) -> bool:
    if not isinstance(value, bool):
        raise _type_error("a boolean", value)
    return value


def _is_literal(t: Any) -> bool:
    return get_origin(t) is Literal


def _literal_hook(t: Any) -> Callable[[object, object], object]:
    allowed = get_args(t)

    def hook(value: object, _t: object) -> object:
        for a in allowed:
            if type(value) is type(a) and value == a:
                return value
        names = ", ".join(repr(a) for a in allowed)
        raise FieldError([], f"must be one of {names}, got {value!r}", "invalid_value")

    return hook


def _is_var_tuple(t: Any) -> bool:
    args = get_args(t)
    return get_origin(t) is tuple and len(args) == 2 and args[1] is Ellipsis


def _structure_items(
    conv: cattrs.Converter, items: list[Any], item_type: Any, t: Any
) -> tuple[Any, ...]:
    out: list[Any] = []
    errors: list[Exception] = []
    for i, item in enumerate(items):
        try:
            out.append(conv.structure(item, item_type))
        except Exception as e:  # collected and re-raised with its index, as cattrs does
            e.add_note(IterableValidationNote(f"Structuring {t} @ index {i}", i, item_type))
            errors.append(e)
    if errors:
        raise IterableValidationError(f"While structuring {t}", errors, t)
    return tuple(out)


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(detailed_validation=True, unstruct_collection_overrides={tuple: list})
    conv.register_structure_hook(str, _structure_str)
    conv.register_structure_hook(int, _structure_int)
    conv.register_structure_hook(float, _structure_float)
    conv.register_structure_hook(bool, _structure_bool)
    conv.register_structure_hook_factory(_is_literal, _literal_hook)

    def tuple_hook(t: Any) -> Callable[[object, object], tuple[Any, ...]]:
        item_type = get_args(t)[0]

        def hook(value: object, _t: object) -> tuple[Any, ...]:
            if not isinstance(value, list):
                raise _type_error("an array", value)
            return _structure_items(conv, value, item_type, t)

        return hook

    conv.register_structure_hook_factory(_is_var_tuple, tuple_hook)

    def class_hook(cls: type[Any]) -> Callable[[object, object], Any]:
        overrides = {}
        if cls is ChatMessage:
            overrides["content"] = override(struct_hook=_structure_content)
        elif cls in (ChatCompletionRequest, CompletionRequest):
            overrides["stop"] = override(struct_hook=_structure_stop)
            overrides["logit_bias"] = override(struct_hook=_structure_logit_bias)
        if cls is CompletionRequest:
            overrides["prompt"] = override(struct_hook=_structure_prompt)
        inner = make_dict_structure_fn(cls, conv, **overrides)  # type: ignore[arg-type]

        def hook(value: object, _t: object) -> Any:
            if not isinstance(value, dict):
                raise _type_error("an object", value)
            # JSON null means "not given" for every optional field
            return inner({k: v for k, v in value.items() if v is not None}, cls)

        return hook

    conv.register_structure_hook_factory(attrs.has, class_hook)

    def _structure_content(value: object, _t: object) -> str | tuple[TextPart, ...] | None:
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise _type_error("a string or an array of content parts", value)
        for i, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind != "text":
                raise FieldError(
                    [i, "type"],
                    f"content parts of type {kind!r} are not supported; only 'text' parts are",
                    "unsupported_value",
                )
        return _structure_items(conv, value, TextPart, tuple[TextPart, ...])

    return conv


def _structure_string_or_list(value: object, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list):
        raise _type_error(f"a string or an array of {what}", value)
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise _type_error("a string", item, [i])
    return tuple(value)


def _structure_stop(value: object, _t: object) -> tuple[str, ...]:
    return _structure_string_or_list(value, "strings")


def _structure_prompt(value: object, _t: object) -> tuple[str, ...]:
    if (
        isinstance(value, list)
        and value
        and all(isinstance(v, int | list) and not isinstance(v, bool) for v in value)
    ):
        raise FieldError(
            [], "token-id prompts are not supported; send the prompt as text", "unsupported_value"
        )
    return _structure_string_or_list(value, "strings")


def _structure_logit_bias(value: object, _t: object) -> dict[str, float] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _type_error("an object mapping token ids to numbers", value)
    out: dict[str, float] = {}
    for key, bias in value.items():
        if isinstance(bias, bool) or not isinstance(bias, int | float):
            raise _type_error("a number", bias, [key])
        out[key] = float(bias)
    return out


_CONVERTER = _make_converter()

_UNSUPPORTED_CHAT = ("tools", "functions")


def _format_path(path: _Path) -> str:
    out = ""
    for seg in path:
        if isinstance(seg, int):
            out += f"[{seg}]"
        else:
            out += f".{seg}" if out else seg
    return out


def _first_error(exc: BaseException, path: _Path) -> tuple[_Path, BaseException]:
    for note in getattr(exc, "__notes__", ()):
        if isinstance(note, AttributeValidationNote):
            path = [*path, note.name]
        elif isinstance(note, IterableValidationNote):
            path = [*path, note.index]
    if isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        return _first_error(exc.exceptions[0], path)
    return path, exc


def _to_invalid_request(exc: Exception) -> InvalidRequestError:
    path, leaf = _first_error(exc, [])
    if isinstance(leaf, FieldError):
        param = _format_path([*path, *leaf.path])
        return InvalidRequestError(
            f"Invalid '{param}': {leaf.message}.", param=param, code=leaf.code
        )
    if isinstance(leaf, KeyError) and not path:
        path = [leaf.args[0]] if leaf.args else []
    param = _format_path(path)
    if isinstance(leaf, KeyError):
        return InvalidRequestError(
            f"Missing required parameter: '{param}'.",
            param=param,
            code="missing_required_parameter",
        )
    return InvalidRequestError(f"Invalid '{param}'.", param=param or None, code="invalid_value")


def _parse(obj: object, cls: type[T]) -> T:
    if not isinstance(obj, dict):
        raise InvalidRequestError(
            f"The request body must be a JSON object, got {_json_type(obj)}.", code="invalid_type"
        )
    try:
        return _CONVERTER.structure(obj, cls)
    except Exception as exc:  # every failure inside becomes one 400 naming a field
        raise _to_invalid_request(exc) from None


def parse_chat_request(obj: object) -> ChatCompletionRequest:
    """Return the ``ChatCompletionRequest`` in a decoded JSON body; unknown fields are ignored.

    Raises ``InvalidRequestError`` (``param`` names the first bad field) for a wrong JSON type,
    a missing or empty ``model``/``messages``, an out-of-range value, image or audio content
    parts, or ``tools``/``functions``/a non-text ``response_format`` (not supported here).
    """
    if isinstance(obj, dict):
        for name in _UNSUPPORTED_CHAT:
            if obj.get(name):
                raise InvalidRequestError(
                    f"Invalid '{name}': tool and function calling are not supported.",
                    param=name,
                    code="unsupported_parameter",
                )
        fmt = obj.get("response_format")
        if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
            raise InvalidRequestError(
                "Invalid 'response_format': only {'type': 'text'} is supported.",
                param="response_format",
                code="unsupported_value",
            )
    return _parse(obj, ChatCompletionRequest)


def parse_completion_request(obj: object) -> CompletionRequest:
    """Return the ``CompletionRequest`` in a decoded JSON body; unknown fields are ignored.

    Raises ``InvalidRequestError`` (``param`` names the first bad field) for a wrong JSON type,
    a missing ``model``/``prompt``, token-id prompts, ``echo``, a non-empty ``suffix``, or a
    ``best_of`` other than ``n``.
    """
    if isinstance(obj, dict):
        if obj.get("suffix"):
            raise InvalidRequestError(
                "Invalid 'suffix': suffix is not supported.",
                param="suffix",
                code="unsupported_parameter",
            )
        best_of = obj.get("best_of")
        n = obj.get("n")
        if best_of is not None and (
            isinstance(best_of, bool) or best_of not in (1, 1 if n is None else n)
        ):
            raise InvalidRequestError(
                "Invalid 'best_of': only best_of equal to n is supported.",
                param="best_of",
                code="unsupported_value",
            )
    return _parse(obj, CompletionRequest)


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def request_to_dict(request: ChatCompletionRequest | CompletionRequest) -> dict[str, Any]:
    """Return the JSON form of a request (unset fields left out); the parsers read it back."""
    out: dict[str, Any] = _drop_none(_CONVERTER.unstructure(request))
    return out


class SamplingFields(TypedDict):
    """Engine-neutral sampling settings, every default resolved.

    ``max_tokens`` None means "up to the context"; ``top_k`` 0 means off; ``logprobs`` is the
    number of top alternatives per token, None for no logprobs at all.
    """

    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    presence_penalty: float
    frequency_penalty: float
    logit_bias: dict[int, float]
    seed: int | None
    stop: list[str]
    logprobs: int | None
    n: int


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def sampling_fields(request: ChatCompletionRequest | CompletionRequest) -> SamplingFields:
    """Return the request's sampling settings with OpenAI's defaults filled in."""
    if isinstance(request, ChatCompletionRequest):
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
    else:
        logprobs = request.logprobs
    top_k = request.top_k if request.top_k is not None and request.top_k > 0 else 0
    return SamplingFields(
        max_tokens=request.effective_max_tokens,
        temperature=_or(request.temperature, 1.0),
        top_p=_or(request.top_p, 1.0),
        top_k=top_k,
        min_p=_or(request.min_p, 0.0),
        presence_penalty=_or(request.presence_penalty, 0.0),
        frequency_penalty=_or(request.frequency_penalty, 0.0),
        logit_bias={int(k): v for k, v in (request.logit_bias or {}).items()},
        seed=request.seed,
        stop=list(request.stop),
        logprobs=logprobs,
        n=request.n,
    )
