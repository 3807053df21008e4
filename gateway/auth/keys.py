"""API keys and admin keys: settings, hashing, and the :class:`Authenticator`.

Keys are configured as sha256 hex digests (``retort keys hash`` makes one, see
:func:`hash_key`) and sent as ``Authorization: Bearer <key>``. The gateway only ever
handles the key's *id*: logs and metrics carry the id, never the key.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from pathlib import Path

import msgspec
import yaml

from gateway.auth.limits import KeyLimits
from gateway.errors import APIError

__all__ = [
    "APIKey",
    "AuthSettings",
    "AuthenticationError",
    "Authenticator",
    "KeyInfo",
    "PermissionDeniedError",
    "generate_key",
    "hash_key",
    "is_loopback",
]

KEY_PREFIX = "sk-retort-"
_HEX = frozenset("0123456789abcdef")


class AuthenticationError(APIError):
    """401: no key, or a key that matches none configured."""

    status_code = 401
    type = "authentication_error"
    code = "invalid_api_key"

    def __init__(self, message: str = "Incorrect or missing API key.") -> None:
        super().__init__(message)
        self.headers: dict[str, str] = {"WWW-Authenticate": "Bearer"}


class PermissionDeniedError(APIError):
    """403: a valid key without the right (admin) permission."""

    status_code = 403
    type = "permission_error"
    code = "permission_denied"

    def __init__(self, message: str = "This API key may not call this endpoint.") -> None:
        super().__init__(message)
        self.headers: dict[str, str] = {}


class APIKey(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    id: str
    """The key's name in logs and metrics (never the key itself)."""
    sha256: str
    """Hex sha256 of the key (``retort keys hash``)."""
    rpm: int | None = None
    """Requests per minute; ``limits.default_rpm`` when unset, unlimited when both are."""
    tpm: int | None = None
    """Tokens (prompt + max completion, estimated at admission) per minute."""
    max_concurrent: int | None = None
    """Requests in flight at once."""
    admin: bool = False
    """May call ``/admin`` and adapter load/unload."""


class AuthSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    api_keys: list[APIKey] = msgspec.field(default_factory=list)
    """Accepted keys. When there are none (and no ``api_keys_file``), auth is off."""
    api_keys_file: str | None = None
    """A YAML/JSON file holding more keys in the same shape (a mounted Kubernetes secret)."""


def hash_key(key: str) -> str:
    """The hex sha256 of an API key, as ``auth.api_keys[].sha256`` wants it."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def generate_key() -> tuple[str, str]:
    """A new random key (``sk-retort-...``) and its hash."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return key, hash_key(key)


class KeyInfo(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    admin: bool = False


def is_loopback(host: str | None) -> bool:
    """Whether a client address is loopback (``127.0.0.0/8``, ``::1``, v4-mapped)."""
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback


def _load_keys(settings: AuthSettings) -> list[APIKey]:
    keys = list(settings.api_keys)
    if settings.api_keys_file:
        path = Path(settings.api_keys_file).expanduser()
        try:
            data = yaml.safe_load(path.read_text()) or []
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"cannot read auth.api_keys_file {path}: {exc}") from exc
        if isinstance(data, dict):
            data = data.get("api_keys", [])
        try:
            keys += msgspec.convert(data, list[APIKey], strict=False)
        except msgspec.ValidationError as exc:
            raise ValueError(f"invalid auth.api_keys_file {path}: {exc}") from exc
    seen: set[str] = set()
    for k in keys:
        digest = k.sha256.lower()
        if len(digest) != 64 or not set(digest) <= _HEX:
            raise ValueError(f"auth key {k.id!r}: sha256 must be 64 hex digits")
        if k.id in seen:
            raise ValueError(f"auth key id {k.id!r} is configured twice")
        seen.add(k.id)
    return keys


class Authenticator:
    """Checks ``Authorization`` headers against the configured key hashes.

    Every configured hash is compared (``hmac.compare_digest``, no early exit), so the time
    taken does not depend on which key, if any, matched.
    """

    def __init__(self, settings: AuthSettings | None = None) -> None:
        keys = _load_keys(settings or AuthSettings())
        self._keys: list[tuple[bytes, KeyInfo]] = [
            (bytes.fromhex(k.sha256), KeyInfo(id=k.id, admin=k.admin)) for k in keys
        ]
        self.limits: dict[str, KeyLimits] = {
            k.id: KeyLimits(rpm=k.rpm, tpm=k.tpm, max_concurrent=k.max_concurrent) for k in keys
        }
        """Each key's own limits (unset ones fall back to ``limits.default_*``)."""

    @property
    def enabled(self) -> bool:
        """Whether any key is configured (requests then need one)."""
        return bool(self._keys)

    @property
    def has_admin(self) -> bool:
        return any(info.admin for _, info in self._keys)

    def check(self, authorization: str | None) -> KeyInfo | None:
        """The key an ``Authorization: Bearer <key>`` header holds, or ``None``."""
        if not authorization:
            return None
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        found: KeyInfo | None = None
        for stored, info in self._keys:
            if hmac.compare_digest(stored, digest):
                found = info
        return found

    def authenticate(self, authorization: str | None) -> KeyInfo | None:
        """For API routes: ``None`` when auth is off, the key when valid, else 401."""
        if not self._keys:
            return None
        key = self.check(authorization)
        if key is None:
            raise AuthenticationError()
        return key

    def authorize_admin(self, authorization: str | None, client_host: str | None) -> KeyInfo | None:
        """For ``/admin`` and adapter load/unload.

        With an admin key configured: an admin key passes; no/invalid key is 401; any other
        valid key is 403. Without one: only loopback clients pass (403 otherwise).
        """
        if self.has_admin:
            key = self.check(authorization)
            if key is None:
                raise AuthenticationError()
            if not key.admin:
                raise PermissionDeniedError("This endpoint needs an admin API key.")
            return key
        if not is_loopback(client_host):
            raise PermissionDeniedError(
                "Admin endpoints are only served to loopback clients while no admin key "
                "is configured."
            )
        return self.check(authorization)
