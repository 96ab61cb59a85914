"""Typed psycopg 3 client for the vetassist_auth PostgreSQL extension.

The accounting-of-disclosures report is in ``vetassist_client.report`` (not imported here, so that
``python -m vetassist_client.report`` runs it as a fresh module).
"""

from __future__ import annotations

from .client import CrisisNotice, Disclosure, Profile, Request, SessionStatus, VetAssistClient
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
    "Disclosure",
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
