"""Incremental decoder for a Server-Sent Events byte stream.

Bytes arrive in arbitrary pieces (a read may end mid-line or mid-UTF-8 character), so the decoder
keeps the unfinished tail and only decodes whole lines: a line ends at `\\n` and cannot split a
multi-byte character. Lines end with `\\n` or `\\r\\n`; a lone `\\r` terminator (allowed by the
spec, never sent by HTTP servers in practice) is not supported.
"""
from __future__ import annotations


class SSEDecoder:
    """Feed raw bytes, get back the `data` payload of every event completed by them."""

    def __init__(self) -> None:
        self._tail = b""
        self._data_lines: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        self._tail += chunk
        *lines, self._tail = self._tail.split(b"\n")
        events: list[str] = []
        for raw in lines:
            event = self._line(raw.rstrip(b"\r").decode("utf-8", errors="replace"))
            if event is not None:
                events.append(event)
        return events

    def close(self) -> list[str]:
        """End of stream: a server may omit the blank line after its last event; still deliver it."""
        events = self.feed(b"\n") if self._tail else []
        last = self._line("")
        if last is not None:
            events.append(last)
        return events

    def _line(self, line: str) -> str | None:
        if not line:
            # A blank line dispatches the event; several `data:` lines form one payload.
            if not self._data_lines:
                return None
            payload = "\n".join(self._data_lines)
            self._data_lines = []
            return payload
        if line.startswith(":"):
            return None  # comment, used by servers as a keep-alive
        name, _, value = line.partition(":")
        if name == "data":
            self._data_lines.append(value[1:] if value.startswith(" ") else value)
        # `event:`, `id:` and `retry:` carry nothing this client needs.
        return None
