"""docs/api.md is the one list of what each role may call and of the error codes: every function
granted to a role is a method of that role's sync and async scope, no scope offers a function
its role may not execute, and every documented SQLSTATE has an exception class. A function or
error code added to the docs without a client method or class fails here. No database."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from vetassist_client import (
    ERROR_CLASSES,
    Admin,
    AsyncAdmin,
    AsyncAuditor,
    AsyncRequest,
    Auditor,
    InvalidArgument,
    MalformedInput,
    MalformedTime,
    Request,
    VetAssistError,
    error_class,
)
from vetassist_client.calls import AsyncScope, SyncScope, sql_call

API_MD = Path(__file__).resolve().parents[3] / "docs" / "api.md"
SCOPES: dict[str, tuple[type[SyncScope], type[AsyncScope]]] = {
    "vetassist_app": (Request, AsyncRequest),
    "vetassist_admin": (Admin, AsyncAdmin),
    "vetassist_auditor": (Auditor, AsyncAuditor),
}
CALLED = re.compile(r"vetassist_auth\.(\w+)\(")


# Rows the client already maps, for docs/api.md versions that do not list them yet: each is used
# only while the docs lack a row for its code, and the docs' own row wins once it is there.
def api_md() -> str:
    return API_MD.read_text(encoding="utf-8")


def table(section: str, text: str | None = None) -> list[list[str]]:
    """The cells of the first table under ``## section`` (header row included, no separator)."""
    text = (text or api_md()).split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip().strip("`") for cell in row.strip("|").split("|")] for row in rows
            if not set(row) <= set("|-: ")]


def granted() -> dict[str, set[str]]:
    """role -> the SQL function names it may execute, from "Who may call what"."""
    header, *rows = table("Who may call what")
    roles = header[1:]
    assert set(roles) == set(SCOPES), header
    grants: dict[str, set[str]] = {role: set() for role in roles}
    for function, *marks in rows:
        for role, mark in zip(roles, marks, strict=True):
            if mark:
                grants[role].add(function.split("(")[0])
    return grants


def methods_by_function(scope: type) -> dict[str, list[str]]:
    """SQL function -> the scope's methods whose query calls it (read from the call's source)."""
    found: dict[str, list[str]] = {}
    for name, member in inspect.getmembers(scope):
        if isinstance(member, sql_call):
            for function in sorted(set(CALLED.findall(inspect.getsource(member.build)))):
                found.setdefault(function, []).append(name)
    return found


def test_the_tables_parse() -> None:
    grants = granted()
    assert "authenticate" in grants["vetassist_app"] and "verify_installation" in grants["vetassist_auditor"]
    assert len(set().union(*grants.values())) > 60
    assert ["VA001", "the VA access token has expired (refresh it)"] in table("Error codes")


@pytest.mark.parametrize("role", sorted(SCOPES))
def test_every_granted_function_has_a_sync_and_an_async_method(role: str) -> None:
    wanted = granted()[role]
    sync_scope, async_scope = SCOPES[role]
    for scope in (sync_scope, async_scope):
        offered = methods_by_function(scope)
        assert sorted(wanted - offered.keys()) == [], f"{scope.__name__} lacks a method for these"
        # A method its role may not execute would only ever raise PermissionDenied.
        assert sorted(offered.keys() - wanted) == [], f"{scope.__name__} calls functions {role} lacks"
    # The same calls, blocking on the sync scope and coroutines on the async one.
    for name in {m for ms in methods_by_function(sync_scope).values() for m in ms}:
        assert not inspect.iscoroutinefunction(getattr(sync_scope(None), name))  # type: ignore[arg-type]
        assert inspect.iscoroutinefunction(getattr(async_scope(None), name))  # type: ignore[arg-type]


def test_print_the_mapping_of_functions_to_methods() -> None:
    """Run with -s for the table (function -> method, per role)."""
    grants = granted()
    lines = ["| function | vetassist_app | vetassist_admin | vetassist_auditor |", "|---|---|---|---|"]
    mapped = {role: methods_by_function(SCOPES[role][0]) for role in SCOPES}
    for function in sorted(set().union(*grants.values())):
        cells = []
        for role in ("vetassist_app", "vetassist_admin", "vetassist_auditor"):
            sync_scope, async_scope = SCOPES[role]
            methods = mapped[role].get(function, [])
            cells.append(", ".join(f"{sync_scope.__name__}/{async_scope.__name__}.{m}" for m in methods))
        lines.append(f"| `{function}` | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    assert len(lines) == 2 + len(set().union(*grants.values()))


def test_malformed_time_is_22007() -> None:
    """22007, a timestamptz or interval literal the server cannot read: a MalformedInput (and so an
    InvalidArgument), as 22P02."""
    assert error_class("22007") is MalformedTime and MalformedTime.sqlstate == "22007"
    assert issubclass(MalformedTime, MalformedInput) and issubclass(MalformedTime, InvalidArgument)


def test_every_documented_sqlstate_has_a_class() -> None:
    documented = {code for code, _meaning in table("Error codes")[1:]}
    assert {"22P02", "40001", "VA001", "23505", "53000", "22021"} <= documented
    for code in documented:
        cls = error_class(code)
        assert cls is not VetAssistError and cls.sqlstate == code, code
    # And no class for an error code the docs do not know.
    assert {cls.sqlstate for cls in ERROR_CLASSES} == documented
