"""HTTP/1.1 chunked framing for the body reader's fast lane (sans-IO).

h11 decodes a chunked body one chunk per event, at ~3 us a chunk in Python: more than
validating the chunk's JSON costs. vLLM sends one HTTP chunk per token, so the body
reader decodes the plain framing here (hex size, CRLF, data, CRLF) and hands the rest
of the body back to h11 at a chunk boundary whenever a chunk header is anything else:
chunk extensions or whitespace, a malformed size (h11 raises its own error), and the
last chunk with its trailers, after which h11 ends the message itself. The connection
then ends in exactly the state h11 alone would have left it in.

Example::

    lane = ChunkedDecoder()
    parts, rest = lane.feed(b"5\\r\\nhello\\r\\n0\\r\\n\\r\\n")
    # parts == [b"hello"]; rest == b"0\\r\\n\\r\\n", for h11 to end the message with
"""

from __future__ import annotations

import re

__all__ = ["ChunkedDecoder", "ChunkedFramingError"]

# h11's chunk size rule, without the extensions and whitespace it also accepts: a header
# with those goes to h11, which knows them.
_PLAIN_SIZE = re.compile(rb"[0-9A-Fa-f]{1,20}")
# A header line longer than this is not plain; h11 decides what it is.
MAX_HEADER_LINE = 64


class ChunkedFramingError(ValueError):
    """The bytes after a chunk's data were not the CRLF that must end it."""


class ChunkedDecoder:
    """Decodes the plain part of a chunked body; hands the rest back at a chunk header.

    ``left`` and ``discard`` take over mid-chunk: the chunk data still to come and the
    part of its closing CRLF not yet seen.

    Example::

        lane = ChunkedDecoder(left=3)  # 3 bytes of the current chunk still to come
        lane.feed(b"abc\\r\\n")  # ([b"abc"], None)
    """

    __slots__ = ("_discard", "_left", "_partial")

    def __init__(self, left: int = 0, discard: bytes = b"") -> None:
        self._left = left
        self._discard = discard
        self._partial = b""  # the start of a chunk header line that a read cut

    @property
    def partial(self) -> bytes:
        """Bytes of a chunk header line still waiting for its end.

        Example::

            ChunkedDecoder().partial  # b""
        """
        return self._partial

    def feed(self, data: bytes) -> tuple[list[bytes], bytes | None]:
        """The chunk data in ``data``, and the bytes to hand back to h11 (None: none yet).

        Raises :class:`ChunkedFramingError` when a chunk's data is not followed by CRLF.

        Example::

            ChunkedDecoder().feed(b"2\\r\\nhi\\r\\n")  # ([b"hi"], None)
        """
        parts: list[bytes] = []
        if self._partial:
            data = self._partial + data
            self._partial = b""
        pos = 0
        size = len(data)
        while pos < size:
            if self._discard:
                take = min(len(self._discard), size - pos)
                if data[pos : pos + take] != self._discard[:take]:
                    raise ChunkedFramingError(
                        f"malformed chunk footer: {data[pos : pos + take]!r} "
                        f"(expected {self._discard!r})"
                    )
                self._discard = self._discard[take:]
                pos += take
                continue
            left = self._left
            if left:
                end = pos + left
                if end > size:
                    parts.append(data[pos:])
                    self._left = end - size
                    return parts, None
                parts.append(data[pos:end])
                self._left = 0
                if data[end : end + 2] == b"\r\n":
                    pos = end + 2  # the usual case: the footer is in the same read
                else:
                    self._discard = b"\r\n"
                    pos = end
                continue
            eol = data.find(b"\r\n", pos, pos + MAX_HEADER_LINE + 2)
            if eol < 0:
                if size - pos > MAX_HEADER_LINE:
                    return parts, data[pos:]
                self._partial = data[pos:]
                return parts, None
            header = data[pos:eol]
            if _PLAIN_SIZE.fullmatch(header) is None:
                return parts, data[pos:]
            chunk = int(header, 16)
            if chunk == 0:
                return parts, data[pos:]  # the last chunk: h11 reads the trailers and ends
            self._left = chunk
            pos = eol + 2
        return parts, None
