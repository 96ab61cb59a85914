"""Typed psycopg 3 client for the vetassist_auth PostgreSQL extension."""

from __future__ import annotations

from .client import CrisisNotice, Profile, Request, SessionStatus, VetAssistClient
from .errors import (
    AuthenticationRefused,
    CiphertextInvalid,
    DuplicateSession,
    InvalidArgument,
    KeyNotConfigured,
    NotFound,
    PermissionDenied,
    TokenExpired,
    VetAssistError,
    translate,
    translated_errors,
)

__all__ = [
    "AuthenticationRefused",
    "CiphertextInvalid",
    "CrisisNotice",
    "DuplicateSession",
    "InvalidArgument",
    "KeyNotConfigured",
    "NotFound",
    "PermissionDenied",
    "Profile",
    "Request",
    "SessionStatus",
    "TokenExpired",
    "VetAssistClient",
    "VetAssistError",
    "translate",
    "translated_errors",
]
