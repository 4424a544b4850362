"""Field checks of the frame messages: each returns a checker that raises FrameError naming
the field it refuses."""

from __future__ import annotations

from collections.abc import Callable

from ._errors import FrameError, JobSpecError
from ._jobspec import check_sampling

__all__ = [
    "RUNTIME_FINISH_REASONS",
    "Check",
    "check_bool",
    "check_finish",
    "check_int",
    "check_ints",
    "check_obj",
    "check_objs",
    "check_sampling_field",
    "check_str",
    "check_usage",
    "fail",
    "optional",
]

RUNTIME_FINISH_REASONS = ("stop", "length", "abort")
_MAX_ID = 256

Check = Callable[[object, str], None]


def fail(field: str, reason: str) -> FrameError:
    return FrameError(field, reason)


def check_str(max_len: int = _MAX_ID, *, empty: bool = False) -> Check:
    def check(value: object, field: str) -> None:
        if not isinstance(value, str) or (not value and not empty) or len(value) > max_len:
            raise fail(field, f"must be a {'' if empty else 'non-empty '}string of at most "
                               f"{max_len} characters")
    return check


def check_int(lo: int = 0, hi: int = 2**63 - 1) -> Check:
    def check(value: object, field: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise fail(field, f"must be an integer in [{lo}, {hi}]")
    return check


def check_bool(value: object, field: str) -> None:
    if not isinstance(value, bool):
        raise fail(field, "must be a boolean")


def check_obj(value: object, field: str) -> None:
    if not isinstance(value, dict):
        raise fail(field, "must be a JSON object")


def optional(check: Check) -> Check:
    def opt(value: object, field: str) -> None:
        if value is not None:
            check(value, field)
    return opt


def check_ints(value: object, field: str) -> None:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise fail(field, "must be a list of non-negative integers")


def check_objs(value: object, field: str) -> None:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise fail(field, "must be a list of JSON objects")


def check_finish(value: object, field: str) -> None:
    if value not in RUNTIME_FINISH_REASONS:
        raise fail(field, f"must be one of {', '.join(RUNTIME_FINISH_REASONS)}")


def check_usage(value: object, field: str) -> None:
    if not isinstance(value, dict) or set(value) != {"prompt_tokens", "completion_tokens"}:
        raise fail(field, "must be {prompt_tokens, completion_tokens}")
    for key in ("prompt_tokens", "completion_tokens"):
        check_int()(value[key], f"{field}.{key}")


def check_sampling_field(value: object, field: str) -> None:
    try:
        check_sampling(value, field)
    except JobSpecError as exc:
        raise fail(exc.field, exc.reason) from None
