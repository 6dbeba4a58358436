"""The HTTP/1.1 response parser of the asyncio transport (sans-IO): framing, bounds, errors.

Every body case is fed whole and split at every byte, so no decoding depends on where
the network cut the bytes.
"""

from __future__ import annotations

import gzip
import zlib

import pytest

from llmstream._http11 import (
    DECODE_STEP,
    MAX_HEAD,
    HTTPProtocolError,
    ResponseParser,
    request_bytes,
)


def _parse(wire: bytes, splits: list[int]) -> tuple[ResponseParser, bytes]:
    """Feed ``wire`` cut at ``splits``; the parser and the body it decoded."""
    parser = ResponseParser()
    body = b""
    at = 0
    for end in [*splits, len(wire)]:
        piece = wire[at:end]
        at = end
        if parser.head is None:
            if parser.feed_head(piece) is None:
                continue
            piece = b""
        body += b"".join(parser.feed_body(piece))
    return parser, body


def _every_split(wire: bytes) -> list[tuple[ResponseParser, bytes]]:
    outcomes = [_parse(wire, [])]
    outcomes += [_parse(wire, [cut]) for cut in range(1, len(wire))]
    outcomes.append(_parse(wire, list(range(1, len(wire)))))  # a byte at a time
    return outcomes


CHUNKED_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)


@pytest.mark.parametrize(
    ("name", "wire", "body"),
    [
        (
            "content-length",
            b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world",
            b"hello world",
        ),
        (
            "chunked, one chunk per event as vLLM sends",
            CHUNKED_HEAD + b"6\r\ndata: \r\n3\r\nabc\r\n2\r\n\n\n\r\n0\r\n\r\n",
            b"data: abc\n\n",
        ),
        (
            "chunk extensions, upper-case hex and trailers",
            CHUNKED_HEAD + b"A;name=value\r\n0123456789\r\n0\r\nX-Trailer: 1\r\n\r\n",
            b"0123456789",
        ),
        ("an empty chunked body", CHUNKED_HEAD + b"0\r\n\r\n", b""),
        ("an empty body by length", b"HTTP/1.1 204 No Content\r\n\r\n", b""),
    ],
)
def test_a_body_decodes_the_same_wherever_the_network_cuts_it(
    name: str, wire: bytes, body: bytes
) -> None:
    for parser, decoded in _every_split(wire):
        assert decoded == body, name
        assert parser.ended and parser.reusable


def test_the_head_is_parsed_with_lowercase_names_in_order_and_interim_responses_skipped() -> None:
    parser = ResponseParser()
    head = parser.feed_head(
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 3\r\nX-A: 1\r\nx-a: 2\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    assert head is not None
    assert (head.status, head.reason) == (429, "Too Many Requests")
    assert head.headers[:3] == [(b"retry-after", b"3"), (b"x-a", b"1"), (b"x-a", b"2")]
    assert parser.ended


def test_a_body_framed_by_the_connections_end_ends_only_at_eof_and_is_not_reusable() -> None:
    parser = ResponseParser()
    assert parser.feed_head(b"HTTP/1.1 200 OK\r\n\r\npart one, ") is not None
    assert parser.feed_body(b"") == [b"part one, "]
    assert parser.feed_body(b"part two") == [b"part two"]
    assert not parser.ended
    assert parser.feed_eof() == []
    assert parser.ended and not parser.reusable


@pytest.mark.parametrize(
    ("wire", "reusable"),
    [
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", False),
        (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n", True),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", True),
    ],
)
def test_a_connection_is_reused_only_when_the_server_keeps_it(wire: bytes, reusable: bool) -> None:
    parser = ResponseParser()
    assert parser.feed_head(wire) is not None
    assert parser.reusable is reusable


@pytest.mark.parametrize(
    ("coding", "compress"),
    [(b"gzip", gzip.compress), (b"deflate", zlib.compress)],
)
def test_a_compressed_body_is_decompressed(coding: bytes, compress: object) -> None:
    assert callable(compress)
    packed = compress(b"data: hello\n\n" * 20)
    wire = b"HTTP/1.1 200 OK\r\nContent-Encoding: " + coding
    wire += b"\r\nContent-Length: " + str(len(packed)).encode() + b"\r\n\r\n" + packed
    for _, decoded in _every_split(wire):
        assert decoded == b"data: hello\n\n" * 20


@pytest.mark.parametrize(
    ("wire", "says"),
    [
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "malformed header line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n", "invalid Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\n\r\n", "cannot read"),
        (CHUNKED_HEAD + b"zz\r\n", "malformed chunk header"),
        (CHUNKED_HEAD + b"3\r\nabcX\r\n", "malformed chunk footer"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * MAX_HEAD, "larger than"),
        (CHUNKED_HEAD + b"1" * 5000, "too long"),
    ],
)
def test_what_is_not_http_is_an_error_not_a_hang_or_an_unbounded_buffer(
    wire: bytes, says: str
) -> None:
    parser = ResponseParser()
    with pytest.raises(HTTPProtocolError, match=says):
        if parser.feed_head(wire) is not None:
            parser.feed_body(b"")


def test_a_body_cut_short_by_the_server_is_an_error() -> None:
    parser = ResponseParser()
    assert parser.feed_head(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf") is not None
    assert parser.feed_body(b"") == [b"half"]
    with pytest.raises(HTTPProtocolError, match="before the body ended"):
        parser.feed_eof()


def test_a_request_is_written_in_one_piece_with_its_length() -> None:
    wire = request_bytes("POST", "/v1/chat/completions", "127.0.0.1:8000", {"Accept": "*/*"}, b"{}")
    assert wire == (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nAccept: */*\r\n"
        b"Content-Length: 2\r\n\r\n{}"
    )


def test_a_complete_head_larger_than_the_bound_is_refused_even_in_one_read() -> None:
    wire = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (1024 * 1024) + b"\r\nContent-Length: 0\r\n\r\n"
    with pytest.raises(HTTPProtocolError, match="larger than"):
        ResponseParser().feed_head(wire)


def test_interim_responses_count_towards_the_head_bound() -> None:
    parser = ResponseParser()
    interim = b"HTTP/1.1 100 Continue\r\n\r\n"
    with pytest.raises(HTTPProtocolError, match="larger than"):
        for _ in range(MAX_HEAD // len(interim) + 1):
            assert parser.feed_head(interim) is None


def test_a_head_just_under_the_bound_is_read() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX: "
    wire = head + b"a" * (MAX_HEAD - len(head)) + b"\r\n\r\n"
    assert ResponseParser().feed_head(wire) is not None


@pytest.mark.parametrize("coding", [b"gzip, chunked", b"chunked, chunked", b"identity", b"br"])
def test_a_transfer_coding_other_than_chunked_is_refused_by_name(coding: bytes) -> None:
    wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + coding + b"\r\n\r\n"
    with pytest.raises(HTTPProtocolError, match="transfer coding") as info:
        ResponseParser().feed_head(wire)
    assert repr(coding) in str(info.value)


@pytest.mark.parametrize(
    ("coding", "compress"),
    [(b"gzip", gzip.compress), (b"deflate", zlib.compress)],
)
@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
def test_a_compressed_body_comes_out_in_bounded_steps_and_whole(
    coding: bytes, compress: object, framing: str
) -> None:
    assert callable(compress)
    body = b"data: " + b"x" * (50 * 1024 * 1024) + b"\n\n"
    packed: bytes = compress(body)
    assert len(packed) < 100 * 1024  # 50 MB from less than 100 KB
    wire = b"HTTP/1.1 200 OK\r\nContent-Encoding: " + coding + b"\r\n"
    if framing == "length":
        wire += b"Content-Length: %d\r\n\r\n" % len(packed) + packed
    elif framing == "chunked":
        wire += b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % len(packed) + packed
        wire += b"\r\n0\r\n\r\n"
    else:
        wire += b"\r\n" + packed
    parser = ResponseParser()
    assert parser.feed_head(wire) is not None
    decoded = bytearray()
    steps = [parser.feed_body(b"")]
    if framing == "close":
        steps.append(parser.feed_eof())
    while parser.pending:
        steps.append(parser.feed_body(b""))
    for parts in steps:
        assert sum(map(len, parts)) <= DECODE_STEP
        decoded += b"".join(parts)
    assert decoded == body
    assert parser.ended and not parser.pending
    assert len(steps) > 50 * 1024 * 1024 // DECODE_STEP


def test_a_compressed_body_has_not_ended_while_its_output_waits() -> None:
    packed = zlib.compress(b"y" * (DECODE_STEP * 3))
    parser = ResponseParser()
    wire = b"HTTP/1.1 200 OK\r\nContent-Encoding: deflate\r\nContent-Length: %d\r\n\r\n"
    assert parser.feed_head(wire % len(packed) + packed) is not None
    assert parser.feed_body(b"") == [b"y" * DECODE_STEP]
    assert parser.complete and parser.pending and not parser.ended
