"""API keys: who may use a gateway, under which name, with which quotas.

Clients send `authorization: Bearer <key>` metadata. Keys look like `ssk_<id>_<secret>` (made by
`sinkserve api-key`); the service keeps only a line per key, the key's id and an scrypt hash of it:

    scrypt$<id>$<salt hex>$<hash hex> [name=<name>] [max_sessions=<n>] [tokens_per_s=<x>] [admin]

one per line in a file (`api_keys`, e.g. a mounted Kubernetes Secret) or in the environment
variable SINKSERVE_API_KEYS (the file's content); `#` starts a comment. A key's name (default
`key-<id>`) is who owns the sessions it opens: keys with the same name are the same owner (rotate a
key by adding the new line under the old name, then removing the old line), and share its quotas.
`admin` keys may call Stats. The file is read again when it changes.

A presented key is hashed once (scrypt, ~0.1 s, off the event loop, one at a time) and the
answer kept, so each stream pays a dictionary lookup; an unknown id is refused without hashing.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import re
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from deployments.quotas import Quota
from deployments.settings import ENV_API_KEYS
from sinkwire.status import StreamError

log = logging.getLogger(__name__)

KEY_PREFIX = "ssk_"
_KEY = re.compile(r"ssk_([0-9a-f]{12})_([0-9a-f]{64})")
_NAME = re.compile(r"[A-Za-z0-9_.@:-]{1,64}")
# scrypt cost: 16 MiB and ~0.1 s per hash on one core (keys are random, so this guards the file,
# not the keys; a presented key is hashed once and remembered).
_SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}
_REMEMBERED = 4096  # presented keys whose answer is kept (each side)
_RELOAD_CHECK_S = 2.0


@dataclass(frozen=True)
class Principal:
    """Who a stream speaks for."""

    name: str  # owner of the sessions it opens; "" when the service has no keys
    admin: bool = False
    quota: Quota = field(default_factory=Quota)


ANONYMOUS = Principal("", admin=True)  # everyone, on a service without keys


@dataclass(frozen=True)
class KeyEntry:
    key_id: str
    salt: bytes
    digest: bytes
    principal: Principal


def new_key() -> tuple[str, str]:
    """A fresh key and its id."""
    key_id = secrets.token_hex(6)
    return f"{KEY_PREFIX}{key_id}_{secrets.token_hex(32)}", key_id


def hash_line(
    key: str,
    name: str | None = None,
    max_sessions: int | None = None,
    tokens_per_s: float | None = None,
    admin: bool = False,
) -> str:
    """The keys-file line for `key`."""
    match = _KEY.fullmatch(key)
    if match is None:
        raise ValueError("not a sinkserve API key (ssk_<12 hex>_<64 hex>)")
    salt = os.urandom(16)
    digest = hashlib.scrypt(key.encode(), salt=salt, **_SCRYPT)
    fields = [f"scrypt${match.group(1)}${salt.hex()}${digest.hex()}"]
    if name is not None:
        fields.append(f"name={name}")
    if max_sessions is not None:
        fields.append(f"max_sessions={max_sessions}")
    if tokens_per_s is not None:
        fields.append(f"tokens_per_s={tokens_per_s:g}")
    if admin:
        fields.append("admin")
    line = " ".join(fields)
    parse_keys(line, "the new line")  # the line must read back
    return line


def parse_keys(text: str, source: str) -> dict[str, KeyEntry]:
    """Key entries by id; ValueError naming the first bad line."""
    entries: dict[str, KeyEntry] = {}
    owners: dict[str, Principal] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            entry = _parse_line(line)
        except ValueError as error:
            raise ValueError(f"{source} line {number}: {error}") from None
        if entry.key_id in entries:
            raise ValueError(f"{source} line {number}: key id {entry.key_id} appears twice")
        same = owners.setdefault(entry.principal.name, entry.principal)
        if same != entry.principal:
            raise ValueError(
                f"{source} line {number}: keys named {entry.principal.name!r} must share their "
                "quotas and admin flag"
            )
        entries[entry.key_id] = entry
    return entries


def _parse_line(line: str) -> KeyEntry:
    stored, *options = line.split()
    parts = stored.split("$")
    if len(parts) != 4 or parts[0] != "scrypt":
        raise ValueError("expected scrypt$<id>$<salt>$<hash> first (made by `sinkserve api-key`)")
    _, key_id, salt, digest = parts
    if not re.fullmatch(r"[0-9a-f]{12}", key_id):
        raise ValueError(f"bad key id {key_id[:20]!r}")
    try:
        salt_bytes, digest_bytes = bytes.fromhex(salt), bytes.fromhex(digest)
    except ValueError:
        raise ValueError("salt and hash must be hex") from None
    name, admin, quota = f"key-{key_id}", False, {}
    for option in options:
        key, _, value = option.partition("=")
        if option == "admin":
            admin = True
        elif key == "name" and _NAME.fullmatch(value):
            name = value
        elif key == "max_sessions" and value.isdigit() and int(value) > 0:
            quota["max_sessions"] = int(value)
        elif key == "tokens_per_s" and _positive_float(value):
            quota["tokens_per_s"] = float(value)
        else:
            raise ValueError(
                f"cannot read {option[:40]!r} (name=<letters, digits, _.@:->, max_sessions=<n>, "
                "tokens_per_s=<x>, admin)"
            )
    return KeyEntry(key_id, salt_bytes, digest_bytes, Principal(name, admin, Quota(**quota)))


def _positive_float(value: str) -> bool:
    try:
        number = float(value)
    except ValueError:
        return False
    return 0 < number < float("inf")


class KeyRing:
    """The keys a gateway accepts, from a file (re-read when it changes) or a fixed text."""

    def __init__(self, path: str | None = None, text: str | None = None) -> None:
        if (path is None) == (text is None):
            raise ValueError("a key ring reads a file or a text")
        self._path = Path(path) if path else None
        self._stamp: tuple[float, int] | None = None
        self._checked = 0.0
        self._entries = parse_keys(text, ENV_API_KEYS) if text is not None else self._load()
        self._known: OrderedDict[bytes, Principal] = OrderedDict()  # sha256(key) -> principal
        self._refused: OrderedDict[bytes, None] = OrderedDict()
        self._hashing = asyncio.Lock()

    @classmethod
    def from_settings(cls, api_keys: str | None) -> KeyRing | None:
        """The ring the settings name (a file, else SINKSERVE_API_KEYS), or None: no keys."""
        if api_keys:
            return cls(path=api_keys)
        text = os.environ.get(ENV_API_KEYS, "")
        return cls(text=text) if text.strip() else None

    def __len__(self) -> int:
        return len(self._entries)

    def _load(self) -> dict[str, KeyEntry]:
        assert self._path is not None
        try:
            stat = self._path.stat()
            text = self._path.read_text()
        except OSError as error:
            raise ValueError(f"cannot read the API keys file {self._path}: {error}") from None
        entries = parse_keys(text, str(self._path))
        if not entries:
            raise ValueError(f"the API keys file {self._path} holds no keys")
        self._stamp = (stat.st_mtime, stat.st_size)
        return entries

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if self._path is None or now - self._checked < _RELOAD_CHECK_S:
            return
        self._checked = now
        try:
            stat = self._path.stat()
            if (stat.st_mtime, stat.st_size) == self._stamp:
                return
            self._entries = self._load()
        except ValueError as error:
            log.error("keeping the API keys as they were: %s", error)
            return
        self._known.clear()
        self._refused.clear()
        log.info("API keys re-read from %s: %d keys", self._path, len(self._entries))

    async def principal(self, key: str) -> Principal | None:
        """Who `key` is, or None if it is not one of ours."""
        self._maybe_reload()
        fingerprint = hashlib.sha256(key.encode()).digest()
        if (known := self._known.get(fingerprint)) is not None:
            self._known.move_to_end(fingerprint)
            return known
        if fingerprint in self._refused:
            return None
        match = _KEY.fullmatch(key)
        entry = self._entries.get(match.group(1)) if match else None
        principal = None
        if entry is not None:
            async with self._hashing:  # one scrypt at a time: wrong keys cannot pile up memory
                digest = await asyncio.to_thread(
                    hashlib.scrypt, key.encode(), salt=entry.salt, **_SCRYPT
                )
            if hmac.compare_digest(digest, entry.digest):
                principal = entry.principal
        memory = self._known if principal is not None else self._refused
        memory[fingerprint] = principal
        if len(memory) > _REMEMBERED:
            memory.popitem(last=False)
        return principal


def bearer_key(metadata) -> str | None:
    """The key of `authorization: Bearer <key>` in call metadata."""
    for name, value in metadata or ():
        if name == "authorization":
            if isinstance(value, bytes):
                value = value.decode(errors="replace")
            scheme, _, key = value.strip().partition(" ")
            return key.strip() if scheme.lower() == "bearer" else None
    return None


async def authenticate(ring: KeyRing | None, context) -> Principal:
    """The caller's principal, or StreamError(UNAUTHENTICATED)."""
    if ring is None:
        return ANONYMOUS
    key = bearer_key(context.invocation_metadata())
    if not key:
        raise StreamError(
            grpc.StatusCode.UNAUTHENTICATED,
            "this service needs an API key: send the metadata authorization: Bearer <key>",
        )
    principal = await ring.principal(key)
    if principal is None:
        raise StreamError(grpc.StatusCode.UNAUTHENTICATED, "unknown API key")
    return principal
