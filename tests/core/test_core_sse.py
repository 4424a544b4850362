"""SSE encoder and incremental decoder (resultity_core._sse)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from resultity_core import (
    DONE,
    SSEDecoder,
    SSEEncodingError,
    SSEEvent,
    encode_comment,
    encode_event,
)


def decode_all(chunks: list[bytes], *, dispatch_incomplete: bool = False) -> list[SSEEvent]:
    decoder = SSEDecoder()
    events: list[SSEEvent] = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    events.extend(decoder.close(dispatch_incomplete=dispatch_incomplete))
    return events


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for p in [*points, len(data)]:
        out.append(data[prev:p])
        prev = p
    return out


# --- encoder --------------------------------------------------------------------------------


def test_encode_dict_is_compact_json_and_keeps_utf8() -> None:
    assert encode_event({"a": 1, "b": "é"}) == 'data: {"a":1,"b":"é"}\n\n'.encode()


def test_encode_fields_and_multiline_data() -> None:
    raw = encode_event("one\ntwo\r\nthree\rfour", event="update", id="7", retry=1500)
    assert raw == (
        b"event: update\nid: 7\nretry: 1500\ndata: one\ndata: two\ndata: three\ndata: four\n\n"
    )
    assert decode_all([raw]) == [
        SSEEvent(data="one\ntwo\nthree\nfour", event="update", id="7", retry=1500)
    ]


def test_done_and_comment() -> None:
    assert DONE == b"data: [DONE]\n\n"
    assert decode_all([DONE]) == [SSEEvent(data="[DONE]")]
    assert encode_comment("ping") == b": ping\n\n"
    assert decode_all([encode_comment("ping"), encode_comment()]) == []


@pytest.mark.parametrize(
    "kwargs",
    [{"event": "a\nb"}, {"id": "1\r"}, {"id": "x\0y"}, {"retry": -1}, {"retry": True}],
)
def test_encode_refuses_unencodable_fields(kwargs: dict[str, object]) -> None:
    with pytest.raises(SSEEncodingError):
        encode_event("x", **kwargs)  # type: ignore[arg-type]


def test_encode_refuses_nan() -> None:
    with pytest.raises(ValueError, match="JSON"):
        encode_event({"x": float("nan")})


# --- decoder: the spec's rules --------------------------------------------------------------


def test_line_endings_cr_lf_crlf_are_equivalent() -> None:
    lf = b"event: e\ndata: a\ndata: b\n\n"
    assert decode_all([lf]) == decode_all([lf.replace(b"\n", b"\r\n")])
    assert decode_all([lf]) == decode_all([lf.replace(b"\n", b"\r")])
    assert decode_all([lf]) == [SSEEvent(data="a\nb", event="e")]


def test_crlf_split_between_reads_is_one_line_break() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: x\r") == []
    # the LF completes the CRLF; only the next blank line dispatches
    assert decoder.feed(b"\n") == []
    assert decoder.feed(b"\r") == [SSEEvent(data="x")]
    assert decoder.feed(b"\n") == []  # second half of that CRLF, not another blank line


def test_cr_then_cr_is_a_blank_line() -> None:
    assert decode_all([b"data: x\r", b"\r"]) == [SSEEvent(data="x")]


def test_comments_unknown_fields_and_space_stripping() -> None:
    raw = b": comment\nfoo: bar\ndata:no-space\ndata:  two-spaces\ndata\n\n"
    assert decode_all([raw]) == [SSEEvent(data="no-space\n two-spaces\n")]


def test_event_without_data_is_not_dispatched_and_event_type_resets() -> None:
    raw = b"event: lonely\n\ndata: x\n\n"
    assert decode_all([raw]) == [SSEEvent(data="x", event="message")]


def test_empty_data_line_dispatches_an_empty_event() -> None:
    assert decode_all([b"data:\n\n"]) == [SSEEvent(data="")]
    assert decode_all([encode_event("")]) == [SSEEvent(data="")]


def test_id_persists_and_nul_id_is_ignored() -> None:
    raw = b"id: 1\ndata: a\n\ndata: b\n\nid: x\0y\ndata: c\n\nid\ndata: d\n\n"
    events = decode_all([raw])
    assert [e.id for e in events] == ["1", "1", "1", ""]


def test_retry_digits_only() -> None:
    decoder = SSEDecoder()
    events = decoder.feed(
        b"retry: 3000\ndata: a\n\nretry: 12x\ndata: b\n\nretry: \xc2\xb2\n\n"
    )  # superscript two: not an ASCII digit
    assert [e.retry for e in events] == [3000, None]
    assert decoder.retry == 3000


def test_bom_is_dropped_only_at_the_start() -> None:
    bom = "\ufeff".encode()
    assert decode_all([bom[:1], bom[1:] + b"data: x\n\n"]) == [SSEEvent(data="x")]
    # later a BOM is an ordinary character: "\ufeffdata" is an unknown field name
    assert decode_all([b"data: x\n\n" + bom + b"data: y\n\n"]) == [SSEEvent(data="x")]
    assert decode_all([b"data: \xef\xbb\xbfz\n\n"]) == [SSEEvent(data="\ufeffz")]


def test_utf8_character_split_across_reads() -> None:
    raw = encode_event("snow ☃ and 𝄞")
    chunks = [raw[i : i + 1] for i in range(len(raw))]
    assert decode_all(chunks) == [SSEEvent(data="snow ☃ and 𝄞")]


def test_long_line_in_small_reads() -> None:
    raw = encode_event("é" * 300_000)
    decoder = SSEDecoder()
    events = [e for i in range(0, len(raw), 7) for e in decoder.feed(raw[i : i + 7])]
    assert events == [SSEEvent(data="é" * 300_000)]


def test_invalid_utf8_is_replaced_not_raised() -> None:
    assert decode_all([b"data: \xff\xfe\n\n"]) == [SSEEvent(data="\ufffd\ufffd")]


def test_incomplete_event_is_discarded_at_close_unless_asked() -> None:
    assert decode_all([b"data: a\n\ndata: b\n"]) == [SSEEvent(data="a")]
    assert decode_all([b"data: a\n\ndata: b"]) == [SSEEvent(data="a")]
    lenient = decode_all([b"data: a\n\ndata: b"], dispatch_incomplete=True)
    assert lenient == [SSEEvent(data="a"), SSEEvent(data="b")]


def test_feed_after_close_raises() -> None:
    decoder = SSEDecoder()
    decoder.close()
    with pytest.raises(SSEEncodingError):
        decoder.feed(b"data: x\n\n")


def test_json_helper() -> None:
    (event,) = decode_all([encode_event({"k": [1, 2]})])
    assert event.json() == {"k": [1, 2]}


# --- properties -----------------------------------------------------------------------------

_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
_field = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\r\n\0"), max_size=12)
Spec = tuple[object, str | None, str | None, int | None]

_events = st.lists(
    st.tuples(
        _text | st.dictionaries(_field, st.integers() | _text, max_size=3),
        st.none() | _field,
        st.none() | _field,
        st.none() | st.integers(0, 10**6),
    ),
    max_size=6,
)


def expected_events(specs: list[Spec]) -> list[SSEEvent]:
    out, last_id = [], ""
    for data, event, id_, retry in specs:
        if id_ is not None:
            last_id = id_
        text = (
            data
            if isinstance(data, str)
            else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
        )
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        out.append(SSEEvent(data=text, event=event or "message", id=last_id, retry=retry))
    return out


def encode_all(specs: list[Spec]) -> bytes:
    return b"".join(encode_event(d, event=e, id=i, retry=r) for d, e, i, r in specs)  # type: ignore[arg-type]


@given(specs=_events, cuts=st.lists(st.integers(0, 10**6), max_size=12), crlf=st.booleans())
def test_decoder_gives_the_same_events_whatever_the_chunking(
    specs: list[Spec], cuts: list[int], crlf: bool
) -> None:
    raw = encode_all(specs)
    if crlf:
        raw = raw.replace(b"\n", b"\r\n")
    whole = decode_all([raw])
    assert whole == expected_events(specs)
    assert decode_all(split_at(raw, cuts)) == whole


@given(specs=_events)
def test_decoder_byte_by_byte(specs: list[Spec]) -> None:
    raw = encode_all(specs)
    assert decode_all([raw[i : i + 1] for i in range(len(raw))]) == expected_events(specs)


@given(raw=st.binary(max_size=200), cuts=st.lists(st.integers(0, 10**6), max_size=8))
def test_arbitrary_bytes_never_raise_and_chunking_does_not_matter(
    raw: bytes, cuts: list[int]
) -> None:
    assert decode_all(split_at(raw, cuts)) == decode_all([raw])
