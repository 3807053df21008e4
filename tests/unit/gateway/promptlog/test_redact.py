from __future__ import annotations

import pytest

from gateway.promptlog.redact import Redactor, luhn_valid
from tests.unit.gateway.promptlog.conftest import make_record


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mail john.doe+x@mail.example.co.uk now", "mail [REDACTED:EMAIL] now"),
        ("call +1 (555) 123-4567", "call [REDACTED:PHONE]"),
        ("call 555-123-4567.", "call [REDACTED:PHONE]."),
        ("uk +44 20 7946 0958", "uk [REDACTED:PHONE]"),
        ("intl +4915112345678", "intl [REDACTED:PHONE]"),
        ("card 4111 1111 1111 1111 ok", "card [REDACTED:CARD] ok"),
        ("card 4111-1111-1111-1111", "card [REDACTED:CARD]"),
        ("amex 378282246310005", "amex [REDACTED:CARD]"),
        ("key sk-proj-AbCdEf0123456789xyz", "key [REDACTED:API_KEY]"),
        ("key sk-retort-QWERTYuiop1234567890", "key [REDACTED:API_KEY]"),
        ("gh ghp_abcdefghijklmnopqrstuvwxyz0123", "gh [REDACTED:API_KEY]"),
        ("aws AKIAIOSFODNN7EXAMPLE", "aws [REDACTED:API_KEY]"),
        ("hf hf_abcdefghijklmnopqrstuvwxyz", "hf [REDACTED:API_KEY]"),
        ("stripe sk_live_abcdefghij0123456789", "stripe [REDACTED:API_KEY]"),
        (
            "Authorization: Bearer abc.def-ghi_jkl~mno123",
            "Authorization: Bearer [REDACTED:API_KEY]",
        ),
        (
            "sha 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
            "sha [REDACTED:API_KEY]",
        ),
        ("b64 QWxhZGRpbjpvcGVuIHNlc2FtZQ0123456789AbCdEfGh==", "b64 [REDACTED:API_KEY]"),
        (
            "jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9",
            "jwt [REDACTED:API_KEY]",
        ),
    ],
)
def test_redacts(text: str, expected: str) -> None:
    assert Redactor().redact(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "plain prose, nothing to hide",
        "on 2024-01-15 at 12:30 in 1999 we paid 1,000,000 for v1.2.3",
        "ip 192.168.1.100 and port 8080",
        "not a card: 4111 1111 1111 1112",
        "order number 1234567890123",
        "def some_function_name_with_a_long_descriptive_name_v2(): pass",
        "/usr/lib/python3.11/site-packages/gateway/promptlog/redact.py",
        "the word sk-short is fine",
    ],
)
def test_leaves_ordinary_text_alone(text: str) -> None:
    assert Redactor().redact(text) == text


def test_luhn() -> None:
    assert luhn_valid("4111111111111111")
    assert luhn_valid("79927398713")
    assert not luhn_valid("4111111111111112")


def test_custom_patterns() -> None:
    r = Redactor([r"ACME-\d+", r"(?i)project\s+falcon"])
    assert r.redact("ticket ACME-1234 for Project  Falcon") == (
        "ticket [REDACTED:CUSTOM] for [REDACTED:CUSTOM]"
    )
    with pytest.raises(ValueError, match="invalid redaction pattern"):
        Redactor(["(unclosed"])


def test_redacts_records_and_message_parts() -> None:
    rec = make_record(
        1,
        messages=[
            {"role": "system", "content": "You are helpful."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "I am a@b.io"}, {"type": "image_url"}],
            },
            {"role": "assistant", "content": None, "tool_calls": []},
        ],
        completion="Write to a@b.io",
        error="bad key sk-abcdefghijklmnop1234",
    )
    out = Redactor().redact_record(rec)
    assert out.messages is not None
    assert out.messages[0]["content"] == "You are helpful."
    assert out.messages[1]["content"][0]["text"] == "I am [REDACTED:EMAIL]"
    assert out.messages[1]["content"][1] == {"type": "image_url"}
    assert out.messages[2] == {"role": "assistant", "content": None, "tool_calls": []}
    assert out.completion == "Write to [REDACTED:EMAIL]"
    assert out.error == "bad key [REDACTED:API_KEY]"
    assert rec.completion == "Write to a@b.io"  # the original is untouched
    prompt = Redactor().redact_record(make_record(2, messages=None, prompt="call 555-123-4567"))
    assert prompt.prompt == "call [REDACTED:PHONE]"
