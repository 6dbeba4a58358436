"""The SSE decoder against the WHATWG conformance cases and hostile input."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmstream import ProtocolError, ServerSentEvent, SSEDecoder

from .conftest import DATA

CASES: list[dict[str, Any]] = json.loads((DATA / "sse" / "cases.json").read_text("utf-8"))


def _chunks(case: dict[str, Any]) -> list[bytes]:
    if "chunks_hex" in case:
        return [bytes.fromhex(h) for h in case["chunks_hex"]]
    return [c.encode("utf-8") for c in case["chunks"]]


def _decode(chunks: list[bytes], **limits: int) -> list[dict[str, Any]]:
    decoder = SSEDecoder(**limits)
    events = [e for chunk in chunks for e in decoder.feed(chunk)]
    decoder.close()
    return [{"event": e.event, "data": e.data, "id": e.id, "retry": e.retry} for e in events]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_conformance_case(case: dict[str, Any]) -> None:
    assert _decode(_chunks(case)) == case["events"]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_conformance_case_byte_by_byte(case: dict[str, Any]) -> None:
    whole = b"".join(_chunks(case))
    assert _decode([whole[i : i + 1] for i in range(len(whole))]) == case["events"]


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_split_of_the_cases_gives_the_same_events(data: st.DataObject) -> None:
    case = data.draw(st.sampled_from(CASES))
    whole = b"".join(_chunks(case))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(whole)), max_size=8)))
    pieces = [whole[a:b] for a, b in zip([0, *cuts], [*cuts, len(whole)], strict=True)]
    assert _decode(pieces) == case["events"]


def test_empty_read_between_cr_and_lf_keeps_them_one_line_ending() -> None:
    assert _decode([b"data: a\r", b"", b"\ndata: b\r\n\r\n"]) == [
        {"event": "message", "data": "a\nb", "id": "", "retry": None}
    ]


def test_u2028_inside_data_is_not_a_line_break() -> None:
    body = 'data: {"content":"a\u2028b\u2029c"}\n\n'.encode()
    assert _decode([body])[0]["data"] == '{"content":"a\u2028b\u2029c"}'


def test_line_over_limit_is_a_protocol_error_not_a_growing_buffer() -> None:
    decoder = SSEDecoder(max_line_bytes=1024)
    with pytest.raises(ProtocolError, match="longer than 1024 bytes"):
        for _ in range(100):
            decoder.feed(b"x" * 100)


def test_event_over_limit_is_a_protocol_error() -> None:
    decoder = SSEDecoder(max_event_bytes=1000)
    with pytest.raises(ProtocolError, match="larger than 1000 bytes"):
        for _ in range(100):
            decoder.feed(b"data: " + b"y" * 50 + b"\n")


def test_invalid_utf8_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="invalid UTF-8"):
        SSEDecoder().feed(b"data: \xff\xfe\n\n")


def test_bad_bytes_after_good_events_in_one_read_are_raised_by_the_next_call_and_close() -> None:
    decoder = SSEDecoder()
    events = decoder.feed(b"data: good\n\ndata: \xff\n\n")
    assert [e.data for e in events] == ["good"]  # delivered first
    with pytest.raises(ProtocolError, match="invalid UTF-8"):
        decoder.close()  # the body ended on them: not a clean end
    with pytest.raises(ProtocolError, match="invalid UTF-8"):
        decoder.feed(b"data: more\n\n")


def test_endless_comments_keep_no_memory() -> None:
    decoder = SSEDecoder(max_line_bytes=64)
    for _ in range(10_000):
        assert decoder.feed(b": keep-alive\n\n") == []
    assert not decoder.pending


def test_close_reports_an_unterminated_event() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"data: half")
    assert decoder.close() is True
    assert SSEDecoder().close() is False


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=20))
def test_garbage_never_crashes_or_hangs(chunks: list[bytes]) -> None:
    decoder = SSEDecoder(max_line_bytes=256, max_event_bytes=512)
    try:
        for chunk in chunks:
            for event in decoder.feed(chunk):
                assert isinstance(event.data, str)
    except ProtocolError:
        pass


_EVENT_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=12
)
_EVENT = st.one_of(
    _EVENT_TEXT.map(lambda t: f"data: {t}\n\n"),  # vLLM's shape: the fast path's
    _EVENT_TEXT.map(lambda t: f"data: {t}\ndata: {t}\n\n"),
    _EVENT_TEXT.map(lambda t: f": {t}\n\n"),
    _EVENT_TEXT.map(lambda t: f"id: {t}\ndata: x\n\n"),
    _EVENT_TEXT.map(lambda t: f"event: e\ndata: {t}\r\n\r\n"),
    st.just("data:no-space\n\n"),
    st.just("\n"),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_EVENT, max_size=12), st.data())
def test_reads_of_many_events_decode_as_byte_by_byte(
    events: list[str], data: st.DataObject
) -> None:
    """The whole-events fast path gives what the full decoder gives, for any split."""
    whole = "".join(events).encode()
    cuts = sorted(data.draw(st.lists(st.integers(0, len(whole)), max_size=6)))
    pieces = [whole[a:b] for a, b in zip([0, *cuts], [*cuts, len(whole)], strict=True)]
    assert _decode(pieces) == _decode([whole[i : i + 1] for i in range(len(whole))])


def test_whole_events_come_before_an_over_long_remainder_fails() -> None:
    decoder = SSEDecoder(max_line_bytes=64)
    events = decoder.feed(b"data: a\n\ndata: b\n\ndata: " + b"z" * 100)
    assert [e.data for e in events] == ["a", "b"]
    with pytest.raises(ProtocolError, match="longer than 64 bytes"):
        decoder.feed(b"\n\n")


def test_an_error_sticks_whatever_is_fed_next() -> None:
    decoder = SSEDecoder(max_event_bytes=8)
    with pytest.raises(ProtocolError, match="larger than 8 bytes"):
        decoder.feed(b"data: 123456789\n\n")
    for after in (b"data: a\n\n", b"data: a\r\n\r\n"):
        with pytest.raises(ProtocolError, match="larger than 8 bytes"):
            decoder.feed(after)


def test_feed_returns_events_with_httpx_sse_fields_and_json() -> None:
    decoder = SSEDecoder()
    event = decoder.feed(b'event: note\nid: 7\nretry: 30\ndata: {"a": [1]}\n\n')[0]
    assert isinstance(event, ServerSentEvent)
    assert (event.event, event.data, event.id, event.retry) == ("note", '{"a": [1]}', "7", 30)
    assert event.json() == {"a": [1]}
    assert ServerSentEvent() == ServerSentEvent("message", "", "", None)


def test_importing_llmstream_does_not_import_httpx_sse() -> None:
    # httpx-sse is the benchmarks' comparison, not a dependency: the decoder is ours.
    code = "import sys, llmstream; llmstream.SSEDecoder().feed(b'data: x\\n\\n'); "
    code += "print('httpx_sse' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
