from __future__ import annotations

import pytest

from loadtest.sse import DONE, SSEDecoder

STREAM = (
    b": keep-alive comment\n\n"
    b'data: {"a": 1}\n\n'
    b'event: message\r\ndata:{"b": "caf\xc3\xa9"}\r\n\r\n'
    b"data: line one\ndata: line two\n\n"
    b"data: [DONE]\n\n"
)
EXPECTED = ['{"a": 1}', '{"b": "café"}', "line one\nline two", DONE]


def test_whole_stream() -> None:
    dec = SSEDecoder()
    assert dec.feed(STREAM) + dec.flush() == EXPECTED


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64])
def test_any_chunking_gives_the_same_events(size: int) -> None:
    dec = SSEDecoder()
    events: list[str] = []
    for i in range(0, len(STREAM), size):
        events += dec.feed(STREAM[i : i + size])
    assert events + dec.flush() == EXPECTED


def test_event_is_emitted_only_at_its_blank_line() -> None:
    dec = SSEDecoder()
    assert dec.feed(b'data: {"x": 1}\n') == []
    assert dec.feed(b"\n") == ['{"x": 1}']


def test_flush_emits_an_unterminated_last_event() -> None:
    dec = SSEDecoder()
    assert dec.feed(b"data: [DONE]") == []
    assert dec.flush() == [DONE]
    assert dec.flush() == []
