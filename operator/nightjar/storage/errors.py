"""Errors of stored snapshots (storage-access errors are in :mod:`nightjar.storage.objects`)."""

from __future__ import annotations


class IntegrityError(Exception):
    """The stored snapshot is missing, damaged or not what its manifest says."""


class KeyProblem(IntegrityError):
    """An encryption key is missing, malformed or wrong. The message names the Secret and the key
    id, never key material. (A snapshot that cannot be opened cannot be restored, hence an
    IntegrityError.)"""
