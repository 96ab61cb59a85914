#!/usr/bin/env python3
"""Prints the function, view, trigger and comment statements of the new install script that the
old release lacks or defines differently, as CREATE OR REPLACE: the generated middle of an
upgrade script (tables and privileges are written by hand around it). The old release is read
as Postgres builds it: the base install script and the upgrade chain of sql/RELEASED.

    scripts/upgrade-functions.py 0.1.5 "$(pg_config --sharedir)/extension/vetassist_auth--0.2.0.sql"
"""
import re
import sys
from pathlib import Path

SQL = Path(__file__).resolve().parent.parent / "sql"

KINDS = re.compile(r"^(CREATE(\s+OR\s+REPLACE)?\s+(FUNCTION|VIEW|TRIGGER|EVENT\s+TRIGGER)|COMMENT\s+ON\s+(FUNCTION|VIEW))\b",
                   re.I)


def statements(text):
    """Top-level statements, split on semicolons outside quotes, dollar quotes and comments."""
    out, start, i, n = [], 0, 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("--", i):
            i = text.find("\n", i) % (n + 1) + 1 if text.find("\n", i) >= 0 else n
        elif text.startswith("/*", i):
            i = text.index("*/", i) + 2
        elif c == "'":
            i += 1
            while i < n and not (text[i] == "'" and not text.startswith("''", i)):
                i += 2 if text.startswith("''", i) else 1
            i += 1
        elif c == "$" and (m := re.match(r"\$[A-Za-z_0-9]*\$", text[i:])):
            i = text.index(m.group(0), i + len(m.group(0))) + len(m.group(0))
        elif c == ";":
            out.append(text[start:i + 1])
            start = i = i + 1
        else:
            i += 1
    return out


def bare(statement):
    """The statement without the comments (and psql's \\echo … \\quit) before it (a function body
    keeps its own)."""
    statement = re.sub(r"^\s*/\*.*?\*/", "", statement.strip(), flags=re.S)
    while (stripped := re.sub(r"^\s*(--[^\n]*\n|\\[^\n]*\n|/\*.*?\*/)", "", statement, flags=re.S)) != statement:
        statement = stripped
    return statement.strip()


def same_as(statement):
    """A statement as compared: an upgrade script's CREATE OR REPLACE is the install script's
    CREATE, and trailing blanks do not count."""
    text = re.sub(r"^CREATE\s+(OR\s+REPLACE\s+)?", "CREATE ", statement, flags=re.I)
    return "\n".join(line.rstrip() for line in text.splitlines())


def name(statement):
    m = re.match(r"CREATE\s+(?:OR\s+REPLACE\s+)?(FUNCTION|VIEW|TRIGGER)\s+(\S+?)\s*(\(|\s)", statement, re.I)
    return (m.group(1).upper(), m.group(2).replace('"', "").split(".")[-1]) if m else None


def release_scripts(release):
    """The base install script and the upgrade scripts up to `release`, in order."""
    shipped = [line.split() for line in (SQL / "RELEASED").read_text().splitlines()]
    scripts = []
    for fields in (f for f in shipped if f and not f[0].startswith("#")):
        scripts.append(SQL / fields[1])
        if fields[0] == release:
            return scripts
    sys.exit(f"{release} is not in sql/RELEASED")


def main(release, new_path):
    # Every statement the chain ever ran: a new one identical to any of them needs no repeating.
    old = {same_as(bare(s)) for script in release_scripts(release) for s in statements(script.read_text())}
    old_names = {name(s) for s in old if name(s)}
    for statement in statements(open(new_path).read()):
        text = bare(statement)
        if not KINDS.match(text) or same_as(text) in old:
            continue
        key = name(text)
        if key and key in old_names and key[0] in ("FUNCTION", "VIEW"):
            text = re.sub(r"^CREATE\s+(OR\s+REPLACE\s+)?", "CREATE OR REPLACE ", text, flags=re.I)
        print(text + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
