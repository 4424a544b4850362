"""Tests of resultity_runtime._stop: stop strings matched across streamed deltas."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from resultity_runtime._stop import StopMatcher


def reference(text: str, stops: list[str], include: bool) -> tuple[str, bool]:
    """Cut ``text`` at the first position where a stop string ends (the longest one there)."""
    for end in range(1, len(text) + 1):
        ending = [s for s in stops if s and text[:end].endswith(s)]
        if ending:
            longest = max(ending, key=len)
            return text[: end if include else end - len(longest)], True
    return text, False


alphabet = st.sampled_from([*list("aab\n"), "é", "😀"])
small_text = st.lists(alphabet, max_size=30).map("".join)
stop_lists = st.lists(st.lists(alphabet, min_size=1, max_size=4).map("".join), max_size=3)


@st.composite
def split_text(draw: st.DrawFn) -> list[str]:
    text = draw(small_text)
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=8)))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


@given(deltas=split_text(), stops=stop_lists, include=st.booleans())
def test_emitted_text_matches_reference_for_any_split(
    deltas: list[str], stops: list[str], include: bool
) -> None:
    text = "".join(deltas)
    want, want_stopped = reference(text, stops, include)
    matcher = StopMatcher(stops, include_stop_str=include)
    emitted = ""
    fed = ""
    stopped = False
    for delta in deltas:
        out, stopped = matcher.feed(delta)
        emitted += out
        fed += delta
        assert want.startswith(emitted)
        if stopped:
            break
        # nothing emitted so far can be undone by any continuation that completes a stop string
        for stop in stops:
            for k in range(len(stop)):
                assert reference(fed + stop[k:], stops, include)[0].startswith(emitted)
        # and only a possible stop-string start is held back
        held = fed[len(emitted) :]
        assert emitted + held == fed
        assert held == matcher.held
        assert held == "" or any(s.startswith(held) and len(held) < len(s) for s in stops)
    if not stopped:
        emitted += matcher.flush()
    assert emitted == want
    assert stopped == want_stopped
    assert matcher.stopped == want_stopped
    if stopped:
        assert matcher.feed("more") == ("", True)
        assert matcher.flush() == ""


def test_stop_split_over_deltas_is_held_then_cut() -> None:
    m = StopMatcher(["</end>"])
    assert m.feed("Hello </") == ("Hello ", False)
    assert m.held == "</"
    assert m.feed("en") == ("", False)
    assert m.feed("d> trailing") == ("", True)
    assert m.matched == "</end>"


def test_false_start_is_released() -> None:
    m = StopMatcher(["STOP"])
    assert m.feed("ST") == ("", False)
    assert m.feed("ART") == ("START", False)
    assert m.flush() == ""
    m = StopMatcher(["STOP"])
    assert m.feed("go ST") == ("go ", False)
    assert m.flush() == "ST"


def test_earliest_ending_stop_wins_and_include_keeps_it() -> None:
    m = StopMatcher(["abcd", "bc"], include_stop_str=True)
    assert m.feed("xabcd") == ("xabc", True)
    assert m.matched == "bc"
    m = StopMatcher(["bc", "abc"])
    assert m.feed("xabc") == ("x", True)
    assert m.matched == "abc"


def test_no_stops_passes_text_through() -> None:
    m = StopMatcher(["", ""])
    assert m.feed("anything") == ("anything", False)
    assert m.flush() == ""
