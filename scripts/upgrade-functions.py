#!/usr/bin/env python3
"""Prints the function, view, trigger and comment statements of the new install script that the
old release's script lacks or defines differently, as CREATE OR REPLACE: the generated middle of
an upgrade script (tables and privileges are written by hand around it).

    scripts/upgrade-functions.py sql/releases/vetassist_auth--0.1.1.sql \
        "$(pg_config --sharedir)/extension/vetassist_auth--0.1.2.sql"
"""
import re
import sys

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
    """The statement without the comments before it (a function body keeps its own)."""
    statement = re.sub(r"^\s*/\*.*?\*/", "", statement.strip(), flags=re.S)
    while (stripped := re.sub(r"^\s*(--[^\n]*\n|/\*.*?\*/)", "", statement, flags=re.S)) != statement:
        statement = stripped
    return statement.strip()


def name(statement):
    m = re.match(r"CREATE\s+(?:OR\s+REPLACE\s+)?(FUNCTION|VIEW|TRIGGER)\s+(\S+?)\s*(\(|\s)", statement, re.I)
    return (m.group(1).upper(), m.group(2).replace('"', "").split(".")[-1]) if m else None


def main(old_path, new_path):
    old = {bare(s) for s in statements(open(old_path).read())}
    old_names = {name(s) for s in old if name(s)}
    for statement in statements(open(new_path).read()):
        text = bare(statement)
        if not KINDS.match(text) or text in old:
            continue
        key = name(text)
        if key and key in old_names and key[0] in ("FUNCTION", "VIEW"):
            text = re.sub(r"^CREATE\s+(OR\s+REPLACE\s+)?", "CREATE OR REPLACE ", text, flags=re.I)
        print(text + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
