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
    """55000: no usable master key, a data key at its limit, or a node that writes nothing (a
    logical replication subscriber before promote(), a hot standby)."""

    sqlstate = "55000"


class CiphertextInvalid(VetAssistError):
    """XX001: a ciphertext or wrapped key fails authentication."""

    sqlstate = "XX001"


class InvalidArgument(VetAssistError):
    """22023: a well-formed argument the function does not accept (the message names it)."""

    sqlstate = "22023"


class MalformedInput(InvalidArgument):
    """22P02: a uuid, inet, timestamptz or enum literal the server cannot read."""

    sqlstate = "22P02"


class MalformedTime(MalformedInput):
    """22007: a timestamptz or interval literal the server cannot read (malformed date/time
    input); a MalformedInput, so ``except MalformedInput`` catches both."""

    sqlstate = "22007"


class NotText(VetAssistError):
    """22021: decrypt_text of a value holding a NUL byte; use decrypt."""

    sqlstate = "22021"


class AuthenticationRefused(VetAssistError):
    """28000: the account is deactivated, the session has ended, or MFA is locked out."""

    sqlstate = "28000"


class NotFound(VetAssistError):
    """P0002: no such user or session; unretire_key/destroy_key of a key not retired."""

    sqlstate = "P0002"


class TokenExpired(VetAssistError):
    """VA001: the VA access token has expired; refresh it and call store_va_tokens."""

    sqlstate = "VA001"


class DuplicateSession(VetAssistError):
    """23505: a session with this jwt_id already exists."""

    sqlstate = "23505"


class PermissionDenied(VetAssistError):
    """42501: the database role lacks a privilege (the hint names the role to grant)."""

    sqlstate = "42501"


class ConcurrentChange(VetAssistError):
    """40001: the account changed concurrently during upsert_va_user; retry the request."""

    sqlstate = "40001"


class RecorderUnavailable(VetAssistError):
    """53000: the audit recorder cannot record a disclosure now; nothing was disclosed."""

    sqlstate = "53000"


class TransactionAborted(VetAssistError):
    """Client-side (no sqlstate): a block ended normally, but a call inside it had failed (an
    error the code caught), so the transaction was aborted; it was rolled back, nothing in it
    was committed. Catch VetAssistError outside the block, never inside."""


class RequestClosed(VetAssistError):
    """Client-side (no sqlstate): a call through a request (or admin/auditor scope) after its
    transaction ended, committed or rolled back; its pooled connection may serve another
    request by then. Use the object only inside its block."""


ERROR_CLASSES: tuple[type[VetAssistError], ...] = (
    KeyNotConfigured, CiphertextInvalid, InvalidArgument, MalformedInput, MalformedTime, AuthenticationRefused,
    RecorderUnavailable, NotText, NotFound, DuplicateSession, PermissionDenied, ConcurrentChange,
    TokenExpired,
)
_BY_SQLSTATE: dict[str, type[VetAssistError]] = {cls.sqlstate: cls for cls in ERROR_CLASSES if cls.sqlstate}


def error_class(sqlstate: str | None) -> type[VetAssistError]:
    """The class a SQLSTATE maps to; VetAssistError for one the API does not document."""
    return _BY_SQLSTATE.get(sqlstate or "", VetAssistError)

_QUOTED_VALUE = re.compile(r':\s*".*"\Z', re.DOTALL)


def translate(exc: psycopg.Error) -> VetAssistError:
    """The VetAssistError for a psycopg error, chosen by SQLSTATE (the caller sets ``__cause__``)."""
    message = exc.diag.message_primary
    message = _QUOTED_VALUE.sub("", message) if message else type(exc).__name__
    return error_class(exc.sqlstate)(message, exc.sqlstate)


@contextmanager
def translated_errors() -> Iterator[None]:
    """Re-raises psycopg errors as VetAssistError; usable as ``with`` block or as decorator."""
    try:
        yield
    except psycopg.Error as exc:
        raise translate(exc) from exc
