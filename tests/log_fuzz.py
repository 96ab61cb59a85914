"""Reading the server log of a test cluster statement by statement, and the generator of the log
fuzzer (tests/integration/test_log_fuzz.py): calls of the extension carrying marker literals,
wrapped the ways a client or an attacker would, and the mirror set of statements that only
mention the extension's names. docs/operations.md, "Logs: what is and is not redacted", says
what must hold; issue 29."""
import random
import re
from dataclasses import dataclass, field

import psycopg

# What test_secrets.py logs with: everything Postgres can be told to write about a statement.
LOGGING = ("log_statement = 'all'", "log_min_duration_statement = 0", "log_min_error_statement = 'error'",
           "log_parameter_max_length = -1", "log_parameter_max_length_on_error = -1",
           "log_error_verbosity = 'verbose'")

# log_line_prefix '%m [%p] ' (the default): every entry starts with it; Postgres puts a tab after
# each line break inside an entry, so no continuation line can look like a new entry.
ENTRY_START = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} \S+ \[\d+\] ", re.M)
# The message part of an entry's first line: `LOG:  00000: statement: …` (verbose errors carry the
# SQLSTATE, terse or default ones do not).
HEAD = re.compile(r"^(?P<level>[A-Z]+):  (?:[0-9A-Z]{5}: )?(?P<message>.*)", re.S)


def logged_form(sql):
    """`sql` as the stderr log writes it: a tab after each line feed (a bare CR is kept as is)."""
    return sql.replace("\n", "\n\t")


@dataclass
class Entry:
    level: str    # LOG, ERROR, DETAIL, STATEMENT, CONTEXT, QUERY, LOCATION, HINT, …
    message: str  # after the level and SQLSTATE, continuation lines included
    text: str     # the whole entry as written

    def is_statement_line(self):
        """The line log_statement writes before a statement runs: `statement: …` (simple
        protocol) or `execute NAME: …` (extended protocol) — not a `duration:` line."""
        return self.level == "LOG" and (self.message.startswith("statement: ") or
                                         re.match(r"execute [^:]*: ", self.message) is not None)


class ServerLog:
    """The server log of a cluster, read from byte offsets: what one step wrote is what lies
    between the offsets before and after it (a backend writes its lines before it answers)."""

    def __init__(self, cluster):
        self.path = cluster.dir / "server.log"

    def offset(self):
        return self.path.stat().st_size

    def since(self, offset):
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", errors="replace")


def entries(text):
    """The log entries in `text`. The first line of an entry and its continuation lines (a
    multi-line statement) form one entry; so do DETAIL/STATEMENT/… lines, each one its own."""
    starts = [m.start() for m in ENTRY_START.finditer(text)]
    out = []
    for start, end in zip(starts, starts[1:] + [len(text)]):
        whole = text[start:end].rstrip("\n")
        body = ENTRY_START.sub("", whole, count=1)
        m = HEAD.match(body)
        out.append(Entry(m["level"], m["message"], whole) if m else Entry("?", body, whole))
    return out


def client_texts(error=None, notices=()):
    """What the client was told (server-sent texts only): an error's message, detail, hint,
    context and internal query, and every notice's. libpq's `LINE n: …` excerpt of str(e) is cut
    from the text the client sent itself, so it is left out unless it shows an internal query."""
    texts = []
    for diag in ([error.diag] if error is not None else []) + [n for n in notices]:
        texts += [getattr(diag, f, None) for f in ("message_primary", "message_detail", "message_hint", "context",
                                                    "internal_query")]
    if error is not None:
        whole = str(error)
        if error.diag.statement_position and not error.diag.internal_position:
            whole = re.sub(r"^LINE \d+: .*\n[ \t]*\^\n?", "", whole, flags=re.M)
        texts.append(whole)
    return [t for t in texts if t]


def run_collecting(conn, action):
    """Runs `action(conn)`; returns (error or None, notices). Notices are collected as diag
    objects (psycopg passes a Diagnostic to the handler)."""
    notices = []
    handler = notices.append
    conn.add_notice_handler(handler)
    try:
        action(conn)
        return None, notices
    except psycopg.Error as e:
        return e, notices
    finally:
        conn.remove_notice_handler(handler)
