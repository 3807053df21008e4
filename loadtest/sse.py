"""A minimal incremental server-sent-events decoder for OpenAI-style streams.

Only ``data:`` fields matter here; an event's data lines are joined with ``\\n`` and the
event is emitted at the blank line that ends it. ``[DONE]`` is returned like any other
payload; the caller decides what it means.
"""

from __future__ import annotations

__all__ = ["DONE", "SSEDecoder"]

DONE = "[DONE]"


class SSEDecoder:
    """Feed raw bytes as they arrive; get back the data of every event they complete."""

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        self._buffer += chunk
        events: list[str] = []
        while True:
            nl = self._buffer.find(b"\n")
            if nl < 0:
                return events
            raw, self._buffer = self._buffer[:nl], self._buffer[nl + 1 :]
            event = self._line(raw.rstrip(b"\r").decode("utf-8"))
            if event is not None:
                events.append(event)

    def flush(self) -> list[str]:
        """End of stream: emit a last event that lacked its blank line."""
        events = self.feed(b"\n") if self._buffer else []
        if self._data:
            events.append("\n".join(self._data))
            self._data = []
        return events

    def _line(self, line: str) -> str | None:
        if not line:
            if not self._data:
                return None
            event, self._data = "\n".join(self._data), []
            return event
        if line.startswith("data:"):
            value = line[5:]
            self._data.append(value[1:] if value.startswith(" ") else value)
        # Comments (":...") and other fields (event:, id:, retry:) are ignored.
        return None
