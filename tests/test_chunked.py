"""The chunked fast lane gives what h11 alone gives: same bytes, same errors, same end state.

Sans-IO: a real h11 client connection that has read a response's headers, and a fake
socket that hands out the body in the pieces a hypothesis strategy chose.
"""

from __future__ import annotations

from collections.abc import Iterator

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmstream import _fastpath
from llmstream._body import _SyncBody
from llmstream._chunked import ChunkedDecoder

HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


class FakeSocket:
    """Hands out the given pieces, then the end of the connection (b"")."""

    def __init__(self, pieces: list[bytes]) -> None:
        self._pieces: Iterator[bytes] = iter(pieces)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return next(self._pieces, b"")


def _read_body(pieces: list[bytes], *, lane: bool) -> tuple[bytes, str, bool]:
    """What the reader yields for a body arriving in ``pieces``; with the lane or h11 alone.

    The bytes, the kind of error (messages may show bytes where h11 shows a bytearray),
    and whether h11 ended the message (the connection can then be reused).
    """
    connection = h11.Connection(h11.CLIENT)
    connection.send(h11.Request(method="POST", target="/", headers=[("Host", "x")]))
    connection.send(h11.EndOfMessage())
    connection.receive_data(HEAD + (pieces[0] if pieces else b""))
    assert type(connection.next_event()) is h11.Response
    reader = _SyncBody(connection, FakeSocket(pieces[1:]), {}, lane=lane)
    received = b""
    outcome = "end"
    try:
        for data in reader:
            assert type(data) is bytes
            received += data
    except Exception as exc:
        outcome = type(exc).__name__
    return received, outcome, connection.their_state is h11.DONE


def _encode(chunks: list[bytes], styles: list[int], trailers: bool) -> bytes:
    out = b""
    for chunk, style in zip(chunks, styles, strict=True):
        size = f"{len(chunk):x}".encode()
        header = {0: size, 1: size.upper(), 2: b"00" + size, 3: size + b";ext=1", 4: size + b" "}[
            style
        ]
        out += header + b"\r\n" + chunk + b"\r\n"
    out += b"0\r\n"
    out += b"x-trailer: yes\r\n\r\n" if trailers else b"\r\n"
    return out


@st.composite
def bodies(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    chunks = draw(st.lists(st.binary(min_size=1, max_size=40), max_size=8))
    n = len(chunks)
    styles = draw(st.lists(st.sampled_from([0, 0, 0, 1, 2, 3, 4]), min_size=n, max_size=n))
    body = _encode(chunks, styles, draw(st.booleans()))
    damage = draw(st.sampled_from(["none", "none", "truncate", "flip"]))
    if damage == "truncate" and body:
        body = body[: draw(st.integers(0, len(body) - 1))]
    elif damage == "flip" and body:
        at = draw(st.integers(0, len(body) - 1))
        body = body[:at] + bytes([body[at] ^ 0x5A]) + body[at + 1 :]
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=8)))
    return body, cuts


@settings(max_examples=400, deadline=None)
@given(bodies())
def test_the_lane_reads_any_chunked_body_as_h11_does(case: tuple[bytes, list[int]]) -> None:
    body, cuts = case
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    assert _read_body(pieces, lane=True) == _read_body(pieces, lane=False)


def test_vllm_shaped_body_ends_the_message_for_reuse() -> None:
    events = [b'data: {"x": %d}\n\n' % i for i in range(50)]
    body = _encode(events, [0] * len(events), trailers=False)
    pieces = [body[i : i + 700] for i in range(0, len(body), 700)]
    received, outcome, state = _read_body(pieces, lane=True)
    assert received == b"".join(events) and outcome == "end" and state


def test_the_lane_takes_a_vllm_shaped_body_over_from_h11(monkeypatch: pytest.MonkeyPatch) -> None:
    real = _fastpath.take_over_chunked
    taken: list[tuple[int, bytes] | None] = []

    def spy(state: h11.Connection) -> tuple[int, bytes] | None:
        taken.append(real(state))
        return taken[-1]

    monkeypatch.setattr(_fastpath, "take_over_chunked", spy)
    events = [b'data: {"x": %d}\n\n' % i for i in range(200)]
    body = _encode(events, [0] * len(events), trailers=False)
    pieces = [body[i : i + 700] for i in range(0, len(body), 700)]
    assert _read_body(pieces, lane=True)[0] == b"".join(events)
    assert any(taken), "h11 decoded every chunk: the lane never took over"


def test_a_broken_footer_is_a_protocol_error() -> None:
    with pytest.raises(ValueError, match="malformed chunk footer"):
        ChunkedDecoder().feed(b"2\r\nhiXX")
