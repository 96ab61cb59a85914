"""SQLSTATE -> exception mapping for the vetassist_auth SQL API.

Messages are the server's primary message only. The extension's own messages never contain
argument values; core PostgreSQL input-syntax errors quote the rejected value at the end
(``invalid input syntax for type inet: "..."``), so that quoted value is cut off. DETAIL,
CONTEXT and the original psycopg error (kept as ``__cause__``) are left out of the message.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg


class VetAssistError(Exception):
    """A failed vetassist_auth call; ``sqlstate`` is the server's error code (None if client-side)."""

    sqlstate: str | None = None

    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        if sqlstate is not None:
            self.sqlstate = sqlstate


class KeyNotConfigured(VetAssistError):
    """55000: no usable master key, or a data key at its encryption limit."""

    sqlstate = "55000"


class CiphertextInvalid(VetAssistError):
    """XX001: a ciphertext or wrapped key fails authentication."""

    sqlstate = "XX001"


class InvalidArgument(VetAssistError):
    """22023 (or 22P02, malformed input such as a bad IP address): a bad argument."""

    sqlstate = "22023"


class AuthenticationRefused(VetAssistError):
    """28000: the account is deactivated, or the session has ended."""

    sqlstate = "28000"


class NotFound(VetAssistError):
    """P0002: no such user or session."""

    sqlstate = "P0002"


class TokenExpired(VetAssistError):
    """VA001: the VA access token has expired; refresh it and call store_va_tokens."""

    sqlstate = "VA001"


class DuplicateSession(VetAssistError):
    """23505: a session with this jwt_id already exists."""

    sqlstate = "23505"


class PermissionDenied(VetAssistError):
    """42501: the database role lacks a privilege."""

    sqlstate = "42501"


_BY_SQLSTATE: dict[str, type[VetAssistError]] = {
    "55000": KeyNotConfigured,
    "XX001": CiphertextInvalid,
    "22023": InvalidArgument,
    "22P02": InvalidArgument,
    "28000": AuthenticationRefused,
    "P0002": NotFound,
    "VA001": TokenExpired,
    "23505": DuplicateSession,
    "42501": PermissionDenied,
}

_QUOTED_VALUE = re.compile(r':\s*".*"\Z', re.DOTALL)


def translate(exc: psycopg.Error) -> VetAssistError:
    """The VetAssistError for a psycopg error, chosen by SQLSTATE (the caller sets ``__cause__``)."""
    message = exc.diag.message_primary
    message = _QUOTED_VALUE.sub("", message) if message else type(exc).__name__
    return _BY_SQLSTATE.get(exc.sqlstate or "", VetAssistError)(message, exc.sqlstate)


@contextmanager
def translated_errors() -> Iterator[None]:
    """Re-raises psycopg errors as VetAssistError; usable as ``with`` block or as decorator."""
    try:
        yield
    except psycopg.Error as exc:
        raise translate(exc) from exc
