"""Redaction of personal data and secrets before prompt-log storage.

Emails, API-key-like strings (``sk-...``, provider token formats, JWTs, ``Bearer`` tokens,
long hex and base64 runs), card numbers (13-19 digits, kept unless Luhn-valid) and phone
numbers are found by cheap candidate scans (a character test, a literal, one character
class) and the full patterns run only on the candidates; each becomes
``[REDACTED:EMAIL]``, ``[REDACTED:API_KEY]``, ``[REDACTED:CARD]`` or ``[REDACTED:PHONE]``.
Configured regexes then replace their matches with ``[REDACTED:CUSTOM]``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    from retort.db.record import LogRecord

__all__ = ["Redactor", "luhn_valid"]

_EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"
)
_KEY_PREFIXES = ("sk-", "sk_", "pk_", "rk_", "ghp_", "gho_", "ghu_", "ghs_", "ghr_",
                 "github_pat_", "hf_", "xox", "AKIA", "ASIA", "AIza", "eyJ", "Bearer ")  # fmt: skip
"""A prefixed key can only be present when one of these is (plain ``in`` checks are cheap)."""
_PREFIXED_KEY = re.compile(
    "|".join(
        (
            r"\bsk-[A-Za-z0-9_-]{16,}",  # OpenAI-style (and retort's own sk-retort-...)
            r"\b(?:sk|pk|rk)_(?:live|test)_[A-Za-z0-9]{10,}",  # Stripe
            r"\bgh[pousr]_[A-Za-z0-9]{20,}",  # GitHub
            r"\bgithub_pat_[A-Za-z0-9_]{20,}",
            r"\bhf_[A-Za-z0-9]{20,}",  # Hugging Face
            r"\bxox[abprs]-[A-Za-z0-9-]{10,}",  # Slack
            r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",  # AWS access key id
            r"\bAIza[0-9A-Za-z_-]{35}",  # Google
            r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",  # JWT
            r"(?<=Bearer )[A-Za-z0-9._~+/=-]{16,}",
        )
    )
)
_RUN_CHARS = "A-Za-z0-9+/_=-"
_LONG_TOKEN = re.compile(f"(?<![{_RUN_CHARS}])[{_RUN_CHARS}]{{32,}}")
"""Runs of 32+ token characters: candidates for long hex or base64 secrets."""
_HEX = re.compile(r"\b[0-9a-fA-F]{32,}\b")
_NUMBER = re.compile(r"(?<![\w+])[+(]?\d[\d ().-]{5,}\d(?!\w)")
"""Digit runs (with separators) of 7+ characters: candidates for cards and phones."""
_CARD = r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])"
_PHONE = (
    r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?|\d{2,4}[ .-])\d{2,4}[ .-]?\d{3,4}(?!\w)"
    r"|(?<![\w+])\+\d{8,15}(?!\w)"
)
_CARD_OR_PHONE = re.compile(f"(?P<CARD>{_CARD})|(?P<PHONE>{_PHONE})")
_PHONE_ONLY = re.compile(_PHONE)


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum of a digit string (card numbers)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _card_or_phone(m: re.Match[str]) -> str:
    if m.lastgroup == "CARD":
        digits = re.sub(r"\D", "", m.group())
        if not (13 <= len(digits) <= 19 and luhn_valid(digits)):
            # Not a card; it may still be a phone number ("555 123 4567 8901" is not).
            return "[REDACTED:PHONE]" if _PHONE_ONLY.fullmatch(m.group()) else m.group()
        return "[REDACTED:CARD]"
    return "[REDACTED:PHONE]"


def _number(m: re.Match[str]) -> str:
    return _CARD_OR_PHONE.sub(_card_or_phone, m.group())


def _long_token(m: re.Match[str]) -> str:
    token = m.group()
    if len(token) >= 40 and _mixed(token):
        return "[REDACTED:API_KEY]"
    return _HEX.sub("[REDACTED:API_KEY]", token)


def _mixed(token: str) -> bool:
    """A digit, a lower- and an upper-case letter: random tokens have them; snake_case
    identifiers and paths rarely do."""
    return (
        any(c.isdigit() for c in token)
        and any(c.islower() for c in token)
        and any(c.isupper() for c in token)
    )


class Redactor:
    """Redacts text, chat messages and whole :class:`LogRecord` s."""

    def __init__(self, patterns: list[str] | None = None) -> None:
        self.custom: list[re.Pattern[str]] = []
        for p in patterns or []:
            try:
                self.custom.append(re.compile(p))
            except re.error as exc:
                raise ValueError(f"invalid redaction pattern {p!r}: {exc}") from exc

    def redact(self, text: str) -> str:
        if "@" in text:
            text = _EMAIL.sub("[REDACTED:EMAIL]", text)
        if any(p in text for p in _KEY_PREFIXES):
            text = _PREFIXED_KEY.sub("[REDACTED:API_KEY]", text)
        if len(text) >= 32:
            text = _LONG_TOKEN.sub(_long_token, text)
        text = _NUMBER.sub(_number, text)
        for pattern in self.custom:
            text = pattern.sub("[REDACTED:CUSTOM]", text)
        return text

    def _content(self, content: Any) -> Any:
        if isinstance(content, str):
            return self.redact(content)
        if isinstance(content, list):
            out: list[Any] = []
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    part = {**part, "text": self.redact(part["text"])}
                out.append(part)
            return out
        return content

    def redact_messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Messages with their content (strings or text parts) redacted."""
        return [
            {**m, "content": self._content(m["content"])} if "content" in m else m for m in messages
        ]

    def redact_record(self, record: LogRecord) -> LogRecord:
        """A copy of ``record`` with messages, prompt, completion and error redacted."""
        return msgspec.structs.replace(
            record,
            messages=(
                self.redact_messages(record.messages) if record.messages is not None else None
            ),
            prompt=self.redact(record.prompt) if record.prompt is not None else None,
            completion=self.redact(record.completion),
            error=self.redact(record.error) if record.error is not None else None,
        )
