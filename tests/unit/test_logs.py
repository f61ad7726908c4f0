"""Log lines never carry a key, however the client spelled its name."""

from __future__ import annotations

import pytest

from tokenwire.logs import redact


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('"GET /ws?api_key=s3cret&x=1 HTTP/1.1"', '"GET /ws?api_key=[redacted]&x=1 HTTP/1.1"'),
        ('"WebSocket /ws?api%5Fkey=s3cret" [accepted]', '"WebSocket /ws?api%5Fkey=[redacted]" [accepted]'),
        ("/ws?affinity=tab1&API_KEY=s3cret", "/ws?affinity=tab1&API_KEY=[redacted]"),
        ("/ws?access%5Ftoken=s3cret;lang=en", "/ws?access%5Ftoken=[redacted];lang=en"),
        ("/ws?affinity=tab1", "/ws?affinity=tab1"),
        ("model loaded in 3.2 s", "model loaded in 3.2 s"),
    ],
)
def test_every_query_value_whose_decoded_name_is_a_key_is_redacted(line: str, expected: str) -> None:
    assert redact(line) == expected
