"""An HTTP/1.1 client's side of one exchange (sans-IO): the request's bytes, the response's.

What :class:`~llmstream.AsyncioTransport` needs and no more: a request written in one
piece (``Content-Length``, no ``Expect``), and a response head followed by a body framed
by ``Content-Length``, by chunked transfer coding (extensions and trailers included), or
by the end of the connection. Bytes go in as they arrive; body bytes come out decoded,
and the parser says when the message has ended and whether the connection may carry
another one.

Example::

    parser = ResponseParser()
    head = parser.feed_head(b"HTTP/1.1 200 OK\\r\\nContent-Length: 5\\r\\n\\r\\nhel")
    # head.status == 200
    parts = parser.feed_body(b"lo")  # [b"hello"]: what followed the head, then these; ended
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

from ._chunked import ChunkedDecoder, ChunkedFramingError

__all__ = [
    "DECODE_STEP",
    "MAX_HEAD",
    "ContentDecodingError",
    "HTTPProtocolError",
    "ResponseHead",
    "ResponseParser",
    "request_bytes",
]

# A response head larger than this is not one a chat server sends: refuse it rather than
# buffer without bound. (h11's default is 16 KiB; aiohttp's 8 KiB a line.)
MAX_HEAD = 64 * 1024
# A chunk header line (size, extensions) or trailer line longer than this is malformed.
_MAX_LINE = 4 * 1024
# The most a compressed body yields per step: a few kilobytes of gzip can decode to
# gigabytes, so output comes in steps, and the reader pulls the next one once it has
# taken what it holds (the transport's high-water mark then holds the server back).
DECODE_STEP = 64 * 1024

_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: ([^\r\n]*))?")
_HEADER_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CHUNK_SIZE = re.compile(rb"[ \t]*([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?")


class HTTPProtocolError(Exception):
    """The server sent bytes that are not an HTTP/1.1 response."""


class ContentDecodingError(HTTPProtocolError):
    """A compressed body (``Content-Encoding``) that would not decompress."""


def request_bytes(
    method: str, target: str, host: str, headers: dict[str, str], body: bytes | None
) -> bytes:
    """A request's head and body, ready to write.

    The headers were checked when the request was made (:class:`~llmstream._transport.
    HTTPRequest`), the target and host are ASCII: all of it is ASCII.

    Example::

        request_bytes("POST", "/v1/chat/completions", "localhost:8000", {}, b"{}")
    """
    lines = [f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n"]
    for name, value in headers.items():
        lines.append(f"{name}: {value}\r\n")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}\r\n")
    lines.append("\r\n")
    head = "".join(lines).encode("ascii")
    return head + body if body else head


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """A response's status line and headers (names lowercased, in order)."""

    status: int
    reason: str
    headers: list[tuple[bytes, bytes]]
    http10: bool


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    found = [value for key, value in headers if key == name]
    return b", ".join(found) if found else None


def _parse_head(block: bytes) -> ResponseHead:
    lines = block.split(b"\r\n")
    status = _STATUS_LINE.fullmatch(lines[0])
    if status is None:
        raise HTTPProtocolError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    headers: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or _HEADER_NAME.fullmatch(name) is None:
            raise HTTPProtocolError(f"malformed header line: {line[:80]!r}")
        headers.append((name.lower(), value.strip(b" \t")))
    reason = (status.group(3) or b"").decode("latin-1")
    return ResponseHead(int(status.group(2)), reason, headers, status.group(1) == b"0")


# Body framing states.
_LENGTH, _CHUNKED, _TRAILERS, _UNTIL_CLOSE, _DONE = range(5)


class ResponseParser:
    """Parses one response: :meth:`feed_head` until it returns the head, then :meth:`feed_body`.

    ``ended`` once the body's last byte was read and handed out (a compressed body comes
    out in steps of :data:`DECODE_STEP`: while ``pending``, ``feed_body(b"")`` gives the
    next); ``reusable`` then says whether the connection may carry another request.
    Bytes after the end of the message are ignored (a well-behaved server sends none
    before the next request).

    Example::

        parser = ResponseParser()
        head = parser.feed_head(data)  # None until the head is whole
    """

    __slots__ = (
        "_buffer",
        "_decompress",
        "_head_bytes",
        "_lane",
        "_left",
        "_more",
        "_state",
        "_tail",
        "ended",
        "head",
        "keep_alive",
    )

    def __init__(self, *, head_request: bool = False) -> None:
        self._buffer = b""
        self._state = _DONE if head_request else _LENGTH
        self._left = 0
        self._decompress: zlib._Decompress | None = None
        self._tail = b""  # compressed bytes not yet decoded (zlib's unconsumed_tail)
        self._more = False  # the last step was full: zlib may hold more output
        self._head_bytes = 0  # interim responses' heads read so far
        self._lane = ChunkedDecoder()
        self.head: ResponseHead | None = None
        self.ended = False
        self.keep_alive = False

    @property
    def reusable(self) -> bool:
        """The message ended and the server did not ask to close the connection."""
        return self.ended and self.keep_alive

    def feed_head(self, data: bytes) -> ResponseHead | None:
        """The response head once it is whole (the bytes after it are body; read them with
        ``feed_body(b"")``); None while more bytes are needed. 1xx responses are skipped.

        A head larger than :data:`MAX_HEAD` (interim responses before it included) is an
        error, whether it arrives in pieces or in one read."""
        buffer = self._buffer + data if self._buffer else data
        while True:
            end = buffer.find(b"\r\n\r\n", 0, MAX_HEAD + 4 - self._head_bytes)
            if end < 0:
                if self._head_bytes + len(buffer) > MAX_HEAD:
                    raise HTTPProtocolError(f"response head larger than {MAX_HEAD} bytes")
                self._buffer = buffer
                return None
            head = _parse_head(buffer[:end])
            buffer = buffer[end + 4 :]
            if 100 <= head.status < 200 and head.status != 101:
                # An interim response (100 Continue, 103 Early Hints): it counts towards
                # the bound, or a server could send them without end.
                self._head_bytes += end + 4
                continue
            break
        self._buffer = buffer
        self._frame(head)
        self.head = head
        return head

    def _frame(self, head: ResponseHead) -> None:
        connection = (_header(head.headers, b"connection") or b"").lower()
        self.keep_alive = b"keep-alive" in connection if head.http10 else b"close" not in connection
        coding = (_header(head.headers, b"content-encoding") or b"").strip().lower()
        if coding in (b"gzip", b"x-gzip"):
            self._decompress = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif coding == b"deflate":
            self._decompress = zlib.decompressobj()
        elif coding not in (b"", b"identity"):
            raise HTTPProtocolError(f"a body in a coding llmstream cannot read: {coding!r}")
        if self._state == _DONE or head.status in (204, 304) or head.status == 101:
            self._decompress = None  # no body: nothing to decode
            self._end()
            return
        transfer = _header(head.headers, b"transfer-encoding")
        if transfer is not None:
            codings = [c.strip().lower() for c in transfer.split(b",") if c.strip()]
            if codings != [b"chunked"]:
                # gzip, compress, deflate as a transfer coding: no server llmstream talks
                # to sends one, and de-chunking alone would hand compressed bytes on as
                # the event stream.
                raise HTTPProtocolError(
                    f"a body in a transfer coding llmstream cannot read: {transfer[:80]!r} "
                    "(only chunked is supported)"
                )
            self._state = _CHUNKED
            return
        length = _header(head.headers, b"content-length")
        if length is None:
            self._state = _UNTIL_CLOSE
            self.keep_alive = False
            return
        values = {v.strip() for v in length.split(b",")}
        if len(values) != 1 or not next(iter(values)).isdigit():
            raise HTTPProtocolError(f"invalid Content-Length: {length[:40]!r}")
        self._left = int(next(iter(values)))
        self._state = _LENGTH
        if self._left == 0:
            self._decompress = None
            self._end()

    def _end(self) -> None:
        self._state = _DONE
        # A compressed body has ended once its last decoded step is out (_decoded).
        self.ended = self._decompress is None
        self._buffer = b""

    @property
    def complete(self) -> bool:
        """The message's last byte arrived (its decoded body may still be ``pending``)."""
        return self._state == _DONE

    @property
    def pending(self) -> bool:
        """Decoded bytes wait to come out: ``feed_body(b"")`` gives the next step of them."""
        return bool(self._tail) or self._more

    @property
    def backlog(self) -> int:
        """Compressed bytes received and not yet decoded."""
        return len(self._tail)

    def feed_body(self, data: bytes) -> list[bytes]:
        """The body bytes ``data`` completes (decoded), in order; sets ``ended`` at the end."""
        if self._buffer:
            data = self._buffer + data
            self._buffer = b""
        state = self._state
        if state in (_CHUNKED, _TRAILERS):
            parts = self._chunked(data)
        elif state == _LENGTH:
            if len(data) >= self._left:
                parts = [data[: self._left]] if self._left else []
                self._end()
            else:
                self._left -= len(data)
                parts = [data] if data else []
        elif state == _UNTIL_CLOSE:
            parts = [data] if data else []
        else:
            parts = []
        if self._decompress is not None and (parts or self.pending or state != self._state):
            parts = self._decoded(parts)
        return parts

    def feed_eof(self) -> list[bytes]:
        """The server closed the connection: the rest of the body, or an error if it was cut.

        Example::

            tail = parser.feed_eof()  # raises HTTPProtocolError for a body cut short
        """
        if self._state == _UNTIL_CLOSE:
            self._end()
            self.keep_alive = False
            if self._decompress is not None:
                return self._decoded([])
            return []
        if self._state != _DONE:
            raise HTTPProtocolError("the server closed the connection before the body ended")
        return []

    def _decoded(self, parts: list[bytes]) -> list[bytes]:
        """One step of decoded output: at most ``DECODE_STEP`` bytes, the rest kept."""
        decompress = self._decompress
        assert decompress is not None
        data = b"".join(parts)
        if self._tail:
            data = self._tail + data
        try:
            out = decompress.decompress(data, DECODE_STEP)
            self._tail = decompress.unconsumed_tail
            # A full step may leave output inside zlib even with all input taken.
            self._more = len(out) == DECODE_STEP
            if self._state == _DONE and not self.pending:
                out += decompress.flush()
                self.ended = True
        except zlib.error as exc:
            raise ContentDecodingError(f"the compressed body would not decompress: {exc}") from exc
        return [out] if out else []

    def _chunked(self, data: bytes) -> list[bytes]:
        # The plain framing vLLM sends (one chunk per token) is decoded by the fast lane;
        # a chunk header it hands back (extensions, the last chunk) is read here.
        parts: list[bytes] = []
        while self._state == _CHUNKED:
            try:
                decoded, rest = self._lane.feed(data)
            except ChunkedFramingError as exc:
                raise HTTPProtocolError(str(exc)) from None
            parts += decoded
            if rest is None:
                return parts
            end = rest.find(b"\r\n", 0, _MAX_LINE)
            if end < 0:
                if len(rest) > _MAX_LINE:
                    raise HTTPProtocolError("a chunk header line too long")
                self._buffer = rest
                return parts
            found = _CHUNK_SIZE.fullmatch(rest, 0, end)
            if found is None:
                raise HTTPProtocolError(f"malformed chunk header: {rest[:end][:40]!r}")
            size = int(found.group(1), 16)
            data = rest[end + 2 :]
            if size:
                self._lane = ChunkedDecoder(left=size)
            else:
                self._state = _TRAILERS
        self._trailers(data)
        return parts

    def _trailers(self, data: bytes) -> None:
        at = 0
        while True:
            end = data.find(b"\r\n", at, at + _MAX_LINE)
            if end < 0:
                if len(data) - at > _MAX_LINE:
                    raise HTTPProtocolError("a trailer line too long")
                self._buffer = data[at:]
                return
            if end == at:  # the empty line that ends the message
                self._end()
                return
            at = end + 2
