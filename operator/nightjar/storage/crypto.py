"""Client-side envelope encryption of stored objects, on ``cryptography``'s AES-256-GCM.

Keys:

* **Key-encryption keys (KEKs)** come from a Kubernetes Secret (``BackupStorage.spec.encryption
  .keySecretRef``): data keys ``key-<id>`` each hold 32 random bytes in base64, and ``current``
  names the id new objects use (with one key, it is current). Old keys stay in the Secret while
  snapshots still need them (``nightjar keys status``); nothing stored is ever rewritten.
* Every stored object (a pack of blobs, a manifest) gets its own random 256-bit **data key
  (DEK)**, stored only wrapped by a KEK (AES-256-GCM, random nonce) in the snapshot's manifest
  next to the id of that KEK.
* Chunk ids are HMAC-SHA256 of the plaintext under a per-source **id key** that the manifests of
  a source pass on from snapshot to snapshot (wrapped like a DEK), so ids reveal nothing without
  the key and rotating the KEK keeps deduplication.

Blobs are sealed as a streaming AEAD (the construction of Tink's AES-GCM segmented streams):
fixed 64 KiB plaintext segments, each sealed with AES-256-GCM under the object's DEK with the
nonce ``blob ordinal (4 bytes) || segment number (7 bytes) || last-segment flag (1 byte)``. A
flipped bit fails a tag, reordered segments or blobs fail their nonce, and a blob cut at a
segment boundary fails because its new last segment was not sealed as the last. Nonces never
repeat under a key: the DEK is the object's own and (ordinal, segment) is unique within it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from nightjar.storage.errors import IntegrityError, KeyProblem

__all__ = ["KeyProblem", "KeyRing", "Sealer", "chunk_id", "new_key_text", "sealed_size", "unwrap_key"]

SEGMENT = 64 * 1024
TAG = 16
KEY_BYTES = 32
_WRAP_AAD = b"nightjar/v2 data key"
_KEY_ID = re.compile(r"^[A-Za-z0-9._-]{1,40}$")
CURRENT = "current"
KEY_PREFIX = "key-"


@dataclass(frozen=True)
class KeyRing:
    """The KEKs of one BackupStorage: ``keys`` by id, ``current`` used for new objects."""

    secret: str
    keys: Mapping[str, bytes] = field(repr=False)
    current: str

    def __repr__(self) -> str:
        return f"KeyRing(secret={self.secret!r}, ids={sorted(self.keys)}, current={self.current!r})"

    @classmethod
    def from_data(cls, secret: str, data: Mapping[str, str | bytes]) -> KeyRing:
        """From a Secret's data (``key-<id>``: base64 of 32 bytes; ``current``: an id)."""
        keys: dict[str, bytes] = {}
        current = ""
        for name, raw in data.items():
            value = raw.decode() if isinstance(raw, bytes) else raw
            if name == CURRENT:
                current = value.strip()
                continue
            if not name.startswith(KEY_PREFIX):
                continue
            kid = name[len(KEY_PREFIX) :]
            if not _KEY_ID.match(kid):
                raise KeyProblem(f"encryption key Secret {secret}: {name!r} is not a valid key name")
            try:
                key = base64.b64decode(value.strip(), validate=True)
            except (binascii.Error, ValueError) as e:
                raise KeyProblem(f"encryption key Secret {secret}: key id {kid} is not base64") from e
            if len(key) != KEY_BYTES:
                raise KeyProblem(
                    f"encryption key Secret {secret}: key id {kid} must be {KEY_BYTES} random bytes "
                    f"(base64), it has {len(key)}"
                )
            keys[kid] = key
        if not keys:
            raise KeyProblem(
                f"encryption key Secret {secret} holds no key: add key-<id> with 32 random bytes in "
                "base64 (e.g. `head -c32 /dev/urandom | base64`)"
            )
        if not current:
            if len(keys) > 1:
                raise KeyProblem(
                    f"encryption key Secret {secret} holds {len(keys)} keys but no 'current' naming "
                    "the one for new backups"
                )
            current = next(iter(keys))
        if current not in keys:
            raise KeyProblem(f"encryption key Secret {secret}: current key id {current} is not in it")
        return cls(secret, keys, current)

    @classmethod
    def from_dir(cls, path: Path, secret: str = "") -> KeyRing:
        """From a Secret mounted as a volume (one file per key)."""
        if not path.is_dir():
            raise KeyProblem(f"encryption key Secret {secret or path}: not mounted at {path}")
        data = {
            p.name: p.read_text()
            for p in sorted(path.iterdir())
            if p.is_file() and (p.name == CURRENT or p.name.startswith(KEY_PREFIX))
        }
        return cls.from_data(secret or path.name, data)

    def kek(self, kid: str) -> bytes:
        try:
            return self.keys[kid]
        except KeyError:
            raise KeyProblem(
                f"encryption key Secret {self.secret} has no key id {kid}, which this snapshot needs "
                f"(it holds {', '.join(sorted(self.keys))}); put key-{kid} back into the Secret"
            ) from None

    # --- data keys ---------------------------------------------------------------------------

    def new_data_key(self) -> tuple[bytes, str, str]:
        """A fresh DEK: (key, current key id, the DEK wrapped by it in base64)."""
        dek = os.urandom(KEY_BYTES)
        return dek, self.current, self.wrap(dek, self.current)

    def wrap(self, dek: bytes, kid: str) -> str:
        nonce = os.urandom(12)
        return base64.b64encode(nonce + AESGCM(self.kek(kid)).encrypt(nonce, dek, _WRAP_AAD)).decode()

    def unwrap(self, wrapped: str, kid: str) -> bytes:
        kek = self.kek(kid)
        try:
            raw = base64.b64decode(wrapped)
            return AESGCM(kek).decrypt(raw[:12], raw[12:], _WRAP_AAD)
        except (InvalidTag, ValueError, binascii.Error) as e:
            raise KeyProblem(
                f"key id {kid} in encryption key Secret {self.secret} does not open this snapshot's "
                "data keys: the key was changed, or the snapshot's manifest is damaged"
            ) from e


def unwrap_key(wrapped: str, kek: bytes) -> bytes:
    """Unwrap with a bare KEK (raises IntegrityError on a wrong key or damage)."""
    try:
        raw = base64.b64decode(wrapped)
        return AESGCM(kek).decrypt(raw[:12], raw[12:], _WRAP_AAD)
    except (InvalidTag, ValueError, binascii.Error) as e:
        raise IntegrityError("a wrapped data key does not open") from e


def _nonce(ordinal: int, segment: int, last: bool) -> bytes:
    return ordinal.to_bytes(4, "big") + segment.to_bytes(7, "big") + (b"\x01" if last else b"\x00")


def sealed_size(plain: int) -> int:
    segments = max(1, -(-plain // SEGMENT))
    return plain + TAG * segments


class Sealer:
    """Seals and opens the blobs of one object under its DEK."""

    def __init__(self, dek: bytes) -> None:
        if len(dek) != KEY_BYTES:
            raise ValueError("a data key has 32 bytes")
        self._aead = AESGCM(dek)

    def seal(self, ordinal: int, plaintext: bytes | memoryview) -> bytes:
        view = memoryview(plaintext)
        n = len(view)
        if n <= SEGMENT:
            return self._aead.encrypt(_nonce(ordinal, 0, True), bytes(view), None)
        out = bytearray()
        last_index = (n - 1) // SEGMENT
        for i in range(last_index + 1):
            seg = view[i * SEGMENT : (i + 1) * SEGMENT]
            out += self._aead.encrypt(_nonce(ordinal, i, i == last_index), bytes(seg), None)
        return bytes(out)

    def open(self, ordinal: int, stored: bytes | memoryview, what: str) -> bytes:
        view = memoryview(stored)
        n = len(view)
        full = SEGMENT + TAG
        if n < TAG:
            raise IntegrityError(f"{what} is truncated")
        try:
            if n <= full:
                return self._aead.decrypt(_nonce(ordinal, 0, True), bytes(view), None)
            out = bytearray()
            count = -(-n // full)
            for i in range(count):
                seg = view[i * full : (i + 1) * full]
                if len(seg) < TAG:
                    raise IntegrityError(f"{what} is truncated")
                out += self._aead.decrypt(_nonce(ordinal, i, i == count - 1), bytes(seg), None)
            return bytes(out)
        except InvalidTag:
            raise IntegrityError(
                f"{what} does not decrypt: it was changed, truncated or moved (or the key is wrong)"
            ) from None


def chunk_id(data: bytes | memoryview, id_key: bytes | None) -> str:
    """The content id of a chunk: HMAC-SHA256 under the id key (encrypted storage), else sha256."""
    if id_key is None:
        return hashlib.sha256(data).hexdigest()
    return hmac.new(id_key, data, hashlib.sha256).hexdigest()


def new_key_text() -> str:
    """32 random bytes in base64: what goes into a ``key-<id>`` of the key Secret."""
    return base64.b64encode(os.urandom(KEY_BYTES)).decode()
