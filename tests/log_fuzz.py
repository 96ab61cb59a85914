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
# An entry's first line after the prefix: `LEVEL:  message`. With verbose errors the message of
# a report (not of its DETAIL, STATEMENT, … lines) starts with the SQLSTATE.
HEAD = re.compile(r"^(?P<level>[A-Z0-9]+):  (?P<message>.*)", re.S)
SQLSTATE = re.compile(r"[0-9A-Z]{5}: ")
SEVERITIES = {"DEBUG1", "DEBUG2", "DEBUG3", "DEBUG4", "DEBUG5", "LOG", "INFO", "NOTICE", "WARNING", "ERROR",
              "FATAL", "PANIC"}


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
        if not m:
            out.append(Entry("?", body, whole))
            continue
        message = m["message"]
        if m["level"] in SEVERITIES and SQLSTATE.match(message):
            message = message[7:]
        out.append(Entry(m["level"], message, whole))
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



# ---------------------------------------------------------------------------------------------
# The generator (tests/integration/test_log_fuzz.py runs it).
#
# A case is a few steps on one session. Each step is checked by what it is:
#   setup    unchecked (a temp table, SET search_path, BEGIN);
#   ours     it holds a call of ours with marker literals, or runs one: no marker may reach any
#            log line or client text;
#   wrapper  an application's own function (or trigger) is called with the marker and passes it
#            to ours: the same, except for the lines Postgres writes before the statement runs
#            (see pre_execution_entries);
#   mirror   no call of ours, nothing of ours runs: the statement is logged byte for byte.

EOLS = ("\n", "\r", "\r\n")
HOUR = "now() + interval '1 hour'"
PAST = "now() - interval '1 hour'"
NOBODY = "'00000000-0000-4000-8000-00000000f1d0'"  # a well-formed uuid of no user


@dataclass(frozen=True)
class Arg:
    """An argument: fixed SQL (`sql`; `{uid}` is the session's veteran), or a literal carrying a
    marker (`value`: `{m}` is the marker) of type `type`; `number`: the marker is a numeric
    literal."""
    sql: str = None
    value: str = None
    type: str = "text"
    number: bool = False


@dataclass(frozen=True)
class Call:
    name: str
    args: tuple
    # "": succeeds; "inside": fails inside our function; before it runs, Postgres fails on
    # "input" (a value its type cannot read) or does not "resolve" the call (number or types of
    # arguments: a statement with the call cannot even be prepared).
    fails: str = ""

    @property
    def label(self):
        return self.name + (f"/{self.fails}" if self.fails else "")


def _m(value="{m}", type="text"):
    return Arg(value=value, type=type)


_UID, _CTX, _EMAIL = Arg(sql="{uid}"), Arg(sql="'ctx'"), Arg(sql="'email'")
CALLS = (
    Call("store_va_tokens", (_UID, _m(), _m("rt-{m}"), Arg(sql=HOUR))),
    Call("store_va_tokens", (Arg(sql=NOBODY), _m(), _m("rt-{m}"), Arg(sql=HOUR)), "inside"),  # no such user
    Call("store_va_tokens", (_UID, _m(), Arg(sql="NULL"), Arg(sql=PAST)), "inside"),           # expired
    Call("store_va_tokens", (_m(type="uuid"), _m(), Arg(sql="NULL"), Arg(sql=HOUR)), "input"),  # bad uuid
    Call("store_va_tokens", (_UID, _m()), "resolve"),                                            # too few
    Call("encrypt_text", (_m(), _CTX)),
    Call("encrypt_text", (_m(), Arg(sql="42")), "resolve"),                                      # wrong type
    Call("field_hash", (_m("{m}@example.org"), _EMAIL)),
    Call("field_hash", (Arg(value="{m}", number=True), _EMAIL)),
    Call("mfa_verify", (_m("jti-{m}"), Arg(sql="'654321'")), "inside"),                         # no session
    Call("create_session", (_UID, _m("jti-{m}"), Arg(sql=HOUR))),
    Call("audit_event", (Arg(sql="'app'"), _m("ev-{m}"), Arg(sql="'success'"), _m('{{"note": "{m}"}}', "jsonb"))),
    Call("audit_event", (Arg(sql="'app'"), Arg(sql="'ev'"), Arg(sql="'success'"), _m('{{"note": {m}, }}', "jsonb")),
         "input"),                                                                               # bad JSON
    Call("touch_session", (_m("jti-{m}"),), "inside"),
    Call("set_actor", (Arg(sql="NULL"), _m()), "inside"),                                       # not an address
    Call("find_user_by_icn", (_m(),), "inside"),                                                # not an ICN
)


@dataclass(frozen=True)
class Ctx:
    """Where SQL is written: the dollar-quote tags of the bodies around it, whether it will sit
    in a single-quoted string (EXECUTE '…'), whether standard_conforming_strings is off."""
    taken: frozenset = frozenset()
    in_string: bool = False
    scs_off: bool = False

    def inside(self, tag):
        return Ctx(self.taken | {tag}, self.in_string, self.scs_off)

    def quoted(self):
        return Ctx(self.taken, True, self.scs_off)


def quote(sql):
    """`sql` as a single-quoted string literal (EXECUTE '…', format('…'))."""
    return "'" + sql.replace("'", "''") + "'"


# The forms of a string literal of value `v` holding marker `m`. Each keeps the marker in one
# piece in the text: a leak of the text is a leak of the marker.
def _plain(v, m, ctx, rng):
    return quote(v)


def _escape(v, m, ctx, rng):  # E'…', a quote escaped right after the marker
    return "E'" + v.replace("\\", "\\\\").replace("'", "\\'").replace(m, m + "\\'", 1) + "'"


def _unicode(v, m, ctx, rng):  # U&'…' with an escape after the marker, with or without UESCAPE
    esc = rng.choice("\\!")
    body = v.replace("'", "''").replace(esc, esc + esc).replace(m, m + esc + "0041", 1)
    return "U&'" + body + "'" + (" UESCAPE '!'" if esc == "!" else "")


def _dollar(v, m, ctx, rng):
    tag = rng.choice([t for t in ("", "q", "fz", "x_1") if t not in ctx.taken])
    return f"${tag}${v}${tag}$"


def _continued(v, m, ctx, rng):  # '…' '…' across a line break, which Postgres joins
    k = v.index(m) + len(m)
    return quote(v[:k]) + rng.choice(EOLS) + quote(v[k:])


def _backslash(v, m, ctx, rng):  # standard_conforming_strings off: \' inside '…'
    return "'" + v.replace("\\", "\\\\").replace("'", "\\'").replace(m, m + "\\'", 1) + "'"


def literal_forms(ctx):
    forms = [_plain, _dollar, _continued]
    if not (ctx.in_string and ctx.scs_off):  # the string around would read the backslash
        forms.append(_escape)
    if not ctx.scs_off:  # U&'…' is refused while standard_conforming_strings is off
        forms.append(_unicode)
    if ctx.scs_off and not ctx.in_string:
        forms.append(_backslash)
    return forms


@dataclass(frozen=True)
class Param:
    """A marker argument passed as a parameter ($1, %s, %L, p1, NEW.c1) instead of a literal."""
    value: str
    marker: str
    arg: Arg


def cast(placeholder):
    """A placeholder writer (`{k}` is the parameter's number), cast to the argument's type
    where that is not text."""
    def write(k, arg):
        p = placeholder.format(k=k)
        return p if arg.type == "text" else f"{p}::{arg.type}"
    return write


class Builder:
    """Writes the SQL of one case. Markers are unique tokens: `qzvS<seed>C<counter>z` (none is
    part of another, none is hex, none occurs by chance) or, as a numeric literal,
    97<seed><counter> (18 digits). Literals take random forms, names random spellings, and
    comments fall between the tokens of a call."""

    def __init__(self, rng, seed, counter, uid, unqualified=False):
        self.rng, self.seed, self.counter, self.uid, self.unqualified = rng, seed, counter, uid, unqualified
        self.markers, self._taken = [], 0
        self.features = set()  # what a case holds that is worth naming in a report

    def marker(self, number=False):
        n = next(self.counter)
        m = f"97{self.seed % 10**8:08d}{n:08d}" if number else f"qzvS{self.seed:06d}C{n:05d}z"
        self.markers.append(m)
        return m

    def take(self):
        """The markers made since the last take (a mirror step's own)."""
        new, self._taken = self.markers[self._taken:], len(self.markers)
        return new

    def name(self, prefix):
        """A name of the case's own (a prepared statement, a temp function or table)."""
        return f"{prefix}_{next(self.counter)}"

    def tag(self, ctx):
        """A dollar-quote tag for a body, unlike those around it."""
        return self.rng.choice([t for t in ("", "b", "do_1") if t not in ctx.taken])

    def eol(self):
        return self.rng.choice(EOLS)

    def comment(self):
        """A comment of either kind (a line comment ends with LF, CR or CRLF); some hold a quote,
        a dollar tag or a decoy call, none a marker."""
        if self.rng.random() < 0.5:
            return self.rng.choice(["/* note */", "/* it's /* nested */ $x$ */"])
        eol = self.eol()
        if eol == "\r":
            self.features.add("a -- comment ended by a bare CR")
        return self.rng.choice([f"-- note{eol}", f"-- it's $x$ vetassist_auth.encrypt_text('decoy'{eol}"])

    def gap(self):
        """Nothing, a space or a comment: what may separate two tokens."""
        r = self.rng.random()
        return "" if r < 0.5 else " " if r < 0.7 else self.comment() + self.rng.choice(["", " "])

    def literal(self, ctx, value=None, marker=None):
        """A string literal of `value` holding `marker` (by default a fresh marker alone)."""
        marker = marker or self.marker()
        return self.rng.choice(literal_forms(ctx))(value or marker, marker, ctx, self.rng)

    def function_name(self, fn, ctx):
        if self.unqualified:
            return fn
        forms = [f"vetassist_auth.{fn}", f'"vetassist_auth"."{fn}"', f"VetAssist_Auth.{fn.upper()}",
                 f"vetassist_auth{self.gap()}.{self.gap()}{fn}"]
        if not ctx.scs_off:
            forms.append(f'U&"vetassist\\005fauth".{fn}')
        return self.rng.choice(forms)

    def call(self, call, ctx, placeholder=None):
        """The call: its marker arguments as literals, or as parameters written by
        `placeholder(k, arg)`. Returns the text and the parameters."""
        params, args = [], []
        for arg in call.args:
            if arg.sql is not None:
                args.append(arg.sql.format(uid=f"'{self.uid}'"))
                continue
            m = self.marker(arg.number)
            if placeholder is not None:
                params.append(Param(arg.value.format(m=m), m, arg))
                args.append(placeholder(len(params), arg))
            else:
                args.append(f"{m}::text" if arg.number else self.literal(ctx, arg.value.format(m=m), m))
        inner = f",{self.gap()}".join(args)
        return f"{self.function_name(call.name, ctx)}{self.gap()}({self.gap()}{inner}{self.gap()})", params

    def lit(self, call, ctx):
        """The call with literal arguments, after a space or a comment."""
        return self.rng.choice([" ", " ", self.comment()]) + self.call(call, ctx)[0]

    def literals(self, params, ctx):
        """Literals of the parameters' values (EXECUTE st(…), USING …, format(…, …), f(…))."""
        return ", ".join(f"{p.marker}::text" if p.arg.number else self.literal(ctx, p.value, p.marker) for p in params)

    def do(self, ctx, code):
        """A DO block around `code(the context inside its body)`."""
        tag = self.tag(ctx)
        return f"DO ${tag}${self.gap()}{code(ctx.inside(tag))}${tag}$"

    def function(self, ctx, returns, language, body, params="", kind="FUNCTION"):
        """A temp function (or procedure) whose body is `body(the context inside it)`: its
        name and CREATE statement."""
        fn, tag = self.name("fz"), self.tag(ctx)
        ret = f" RETURNS {returns}" if returns else ""
        return fn, f"CREATE {kind} pg_temp.{fn}({params}){ret} LANGUAGE {language} AS ${tag}${body(ctx.inside(tag))}${tag}$"


@dataclass
class Step:
    check: str              # setup, ours, wrapper, mirror
    sql: str
    params: list = None     # bound parameters (extended protocol)
    prepare: bool = None    # psycopg's prepare=True: Parse/Bind/Execute of a named statement
    copy: bool = False      # COPY … TO STDOUT
    markers: list = field(default_factory=list)  # a mirror step's own markers

    def sent_text(self):
        """The text Postgres receives (psycopg turns each %s into $1, $2, …)."""
        if self.params is None:
            return self.sql
        k = iter(range(1, len(self.params) + 1))
        return re.sub("%s", lambda _: f"${next(k)}", self.sql)

    def simple(self):
        return self.params is None and not self.prepare and not self.copy


def setup(sql):
    return Step("setup", sql)


def ours(sql, **kw):
    return Step("ours", sql, **kw)


# ---- Calls of ours, wrapped: (builder, call, context) -> steps.

def _prepared(b, call, ctx, one_message):
    st = b.name("st")
    text, params = b.call(call, ctx, cast("${k}"))
    steps = [f"PREPARE {st} AS SELECT {text}", f"EXECUTE {st}({b.literals(params, ctx)})"]
    if one_message:
        # Its statement line is written before the PREPARE runs: then nothing says yet that st
        # calls ours, and the EXECUTE's literals are like those of an application's wrapper.
        return [Step("wrapper", "; ".join(steps))]
    return [ours(s) for s in steps]


def _prepared_literals(b, call, ctx):
    st = b.name("st")
    return [ours(f"PREPARE {st} AS SELECT {b.lit(call, ctx)}"), ours(f"EXECUTE {st}")]


def _in_do(code):
    """A wrapper: a DO block whose body is `code(builder, call, context inside)`."""
    return lambda b, c, x: [ours(b.do(x, lambda i: code(b, c, i)))]


def _execute_format(b, c, i):
    text, params = b.call(c, i.quoted(), cast("%L"))
    return f"BEGIN EXECUTE format({quote('SELECT ' + text)}, {b.literals(params, i)}); END"


def _execute_using(b, c, i):
    text, params = b.call(c, i.quoted(), cast("${k}"))
    return f"BEGIN EXECUTE {quote('SELECT ' + text)} USING {b.literals(params, i)}; END"


def _defined_then_called(returns, language, body, call_sql="SELECT pg_temp.{fn}()", kind="FUNCTION"):
    """A wrapper: a temp function (procedure) whose body holds the call, then a call of it."""
    def steps(b, c, x):
        fn, create = b.function(x, returns, language, lambda i: body(b, c, i), kind=kind)
        return [ours(create), ours(call_sql.format(fn=fn))]
    return steps


def _atomic(b, c, x):
    fn = b.name("fz")
    return [ours(f"CREATE FUNCTION pg_temp.{fn}() RETURNS text LANGUAGE sql BEGIN ATOMIC SELECT ({b.lit(c, x)})::text; END"),
            ours(f"SELECT pg_temp.{fn}()")]


def _with_trigger(b, x, columns, body):
    """A temp table with a BEFORE INSERT trigger whose function has `body(context)`: the table's
    name and the steps that make them."""
    t = b.name("fzt")
    fn, create = b.function(x, "trigger", "plpgsql", body)
    return t, [setup(f"CREATE TEMP TABLE {t} ({columns})"), ours(create),
               setup(f"CREATE TRIGGER {t}_trg BEFORE INSERT ON {t} FOR EACH ROW EXECUTE FUNCTION pg_temp.{fn}()")]


def _trigger(b, c, x):
    t, steps = _with_trigger(b, x, "v text", lambda i: f"BEGIN PERFORM {b.lit(c, i)}; RETURN NEW; END")
    return steps + [ours(f"INSERT INTO {t} VALUES ('x')")]


def _cursor(b, c, x):
    cur = b.name("fzc")
    return [setup("BEGIN"), ours(f"DECLARE {cur} CURSOR FOR SELECT {b.lit(c, x)}"), ours(f"FETCH ALL FROM {cur}"),
            setup("COMMIT")]


def _table_then(sql):
    """A wrapper: a temp table, then `sql` (with {t}, {call}) on it."""
    def steps(b, c, x):
        t = b.name("fzt")
        return [setup(f"CREATE TEMP TABLE {t} (v text)"), ours(sql.format(t=t, call=b.lit(c, x)))]
    return steps


def _bound(b, c, x, prepare=None):
    text, params = b.call(c, x, cast("%s"))
    return ours(f"SELECT {text}", params=[p.value for p in params], prepare=prepare)


def _select(sql):
    """A wrapper: one simple-protocol statement, `sql` with {call} and {eol}."""
    return lambda b, c, x: [ours(sql.format(call=b.lit(c, x), eol=b.eol()))]


OURS = {
    "simple": _select("SELECT{call}"),
    "simple-multi": _select("SELECT 1;{eol}SELECT{call} AS v;{eol}SELECT 2"),
    "extended-bound": lambda b, c, x: [_bound(b, c, x)],
    "extended-bound-prepared": lambda b, c, x: [_bound(b, c, x, prepare=True)],
    "extended-literal-prepared": lambda b, c, x: [ours(f"SELECT{b.lit(c, x)}", prepare=True)],
    "prepare-execute": lambda b, c, x: _prepared(b, c, x, one_message=False),
    "prepare-execute-one-message": lambda b, c, x: _prepared(b, c, x, one_message=True),
    "prepare-literals-execute": _prepared_literals,
    "do-perform": _in_do(lambda b, c, i: f"BEGIN PERFORM{b.lit(c, i)}; END"),
    "do-assign": _in_do(lambda b, c, i: f"DECLARE g text; BEGIN g := (SELECT{b.lit(c, i)}); END"),
    "do-assign-direct": _in_do(lambda b, c, i: f"DECLARE g text; BEGIN g :={b.lit(c, i)}; END"),
    "do-if": _in_do(lambda b, c, i: f"BEGIN IF (SELECT{b.lit(c, i)}) IS NULL THEN RAISE NOTICE 'null'; END IF; END"),
    "do-dead-branch": _in_do(lambda b, c, i: f"BEGIN IF false THEN PERFORM{b.lit(c, i)}; END IF; END"),
    "do-execute": _in_do(lambda b, c, i: f"BEGIN EXECUTE {quote('SELECT' + b.lit(c, i.quoted()))}; END"),
    "do-execute-format": _in_do(_execute_format),
    "do-execute-using": _in_do(_execute_using),
    "do-execute-do": _in_do(lambda b, c, i: "BEGIN EXECUTE " + quote(
        b.do(i.quoted(), lambda j: f"BEGIN PERFORM{b.lit(c, j)}; END")) + "; END"),
    "dead-case": _select("SELECT CASE WHEN false THEN ({call})::text END AS v"),
    "plpgsql-return-query": _defined_then_called(
        "SETOF text", "plpgsql", lambda b, c, i: f"BEGIN RETURN QUERY SELECT ({b.lit(c, i)})::text; END",
        "SELECT * FROM pg_temp.{fn}()"),
    "sql-function": _defined_then_called("text", "sql", lambda b, c, i: f" SELECT ({b.lit(c, i)})::text "),
    "sql-function-atomic": _atomic,
    "procedure": _defined_then_called(None, "plpgsql", lambda b, c, i: f"BEGIN PERFORM{b.lit(c, i)}; END",
                                      "CALL pg_temp.{fn}()", kind="PROCEDURE"),
    "trigger": _trigger,
    "cte": _select("WITH t AS (SELECT{call} AS v) SELECT v FROM t"),
    "cte-materialized": _select("WITH t AS MATERIALIZED (SELECT{call} AS v) SELECT count(*) FROM t"),
    "subselect": _select("SELECT (SELECT{call}) AS v"),
    "from-subselect": _select("SELECT * FROM (SELECT{call} AS v) AS s"),
    "lateral": _select("SELECT l.r FROM (VALUES (1)) AS v(x) CROSS JOIN LATERAL (SELECT{call} AS r) AS l"),
    "cursor": _cursor,
    "copy": lambda b, c, x: [ours(f"COPY (SELECT{b.lit(c, x)}) TO STDOUT", copy=True)],
    "explain-analyze": _select("EXPLAIN ANALYZE SELECT{call}"),
    "create-table-as": lambda b, c, x: [ours(f"CREATE TEMP TABLE {b.name('fzt')} AS SELECT{b.lit(c, x)} AS v")],
    "insert-select": _table_then("INSERT INTO {t} SELECT ({call})::text"),
}


# ---- The application's own function (or trigger) passes the marker to ours: (builder, call,
# context) -> steps. Only calls that reach our function (succeeding or failing inside it).

def _passed(b, c, placeholder, got):
    """Writes the call with its marker arguments as `placeholder`s (p1, NEW.c1), keeping the
    parameters in `got`: what the application's code passes on."""
    def text(ctx):
        sql, params = b.call(c, ctx, cast(placeholder))
        got.extend(params)
        return sql
    return text


# What the application's own routine is: (returns, language, body with {call}).
APP_ROUTINES = {"sql": ("text", "sql", " SELECT ({call})::text "),
                "plpgsql": ("text", "plpgsql", "BEGIN RETURN ({call})::text; END"),
                "procedure": (None, "plpgsql", "BEGIN PERFORM {call}; END")}


def _app(routine, bound=False):
    def steps(b, c, x):
        returns, language, body = APP_ROUTINES[routine]
        params = ", ".join(f"p{k} {a.type}" for k, a in enumerate([a for a in c.args if a.sql is None], 1))
        got = []
        call = _passed(b, c, "p{k}", got)
        fn, create = b.function(x, returns, language, lambda i: body.format(call=call(i)), params,
                                "FUNCTION" if returns else "PROCEDURE")
        invoke = f"{'SELECT' if returns else 'CALL'} pg_temp.{fn}"
        if bound:
            holders = ", ".join(cast("%s")(k, p.arg) for k, p in enumerate(got, 1))
            return [ours(create), Step("wrapper", f"{invoke}({holders})", params=[p.value for p in got])]
        return [ours(create), Step("wrapper", f"{invoke}({b.literals(got, x)})")]
    return steps


def _app_trigger(b, c, x):
    columns = ", ".join(f"c{k} {a.type}" for k, a in enumerate([a for a in c.args if a.sql is None], 1))
    got = []
    call = _passed(b, c, "NEW.c{k}", got)
    t, steps = _with_trigger(b, x, columns, lambda i: f"BEGIN PERFORM {call(i)}; RETURN NEW; END")
    return steps + [Step("wrapper", f"INSERT INTO {t} VALUES ({b.literals(got, x)})")]


APP = {
    "app-sql-function": _app("sql"),
    "app-plpgsql-function": _app("plpgsql"),
    "app-function-bound": _app("plpgsql", bound=True),
    "app-procedure": _app("procedure"),
    "app-trigger": _app_trigger,
}


# ---- Statements of others that mention our names: (builder, context) -> steps. Each carries
# a marker literal of its own; Postgres must log it as sent.

def mirror(sql, b, **kw):
    return Step("mirror", sql, markers=b.take(), **kw)


def _mirror(sql):
    """A mirror: one simple-protocol statement, `sql` with {lit} (a marker literal), {gap}, {eol}."""
    return lambda b, x: [mirror(sql.format(lit=b.literal(x), gap=b.gap(), eol=b.eol()), b)]


def _mirror_table(create, sql):
    def steps(b, x):
        t = b.name("fzt")
        return [setup(create.format(t=t)), mirror(sql.format(t=t, lit=b.literal(x)), b)]
    return steps


def _mirror_do(code):
    return lambda b, x: [mirror(b.do(x, lambda i: code(b, i)), b)]


def _mirror_prepared(b, x):
    st = b.name("st")
    return [mirror(f"PREPARE {st} AS SELECT $1::text AS encrypt_text", b), mirror(f"EXECUTE {st}({b.literal(x)})", b)]


def _mirror_cursor(b, x):
    cur = b.name("fzc")
    return [setup("BEGIN"), mirror(f"DECLARE {cur} CURSOR FOR SELECT {b.literal(x)} AS field_hash", b),
            mirror(f"FETCH ALL FROM {cur}", b), setup("COMMIT")]


def _mirror_function(body):
    def steps(b, x):
        fn, create = b.function(x, "text", "plpgsql", lambda i: body(b, i), "x text")
        return [mirror(create, b), mirror(f"SELECT pg_temp.{fn}('a')", b)]
    return steps


def _same_name_elsewhere(b, x):
    """A function of the application's own schema named like one of ours, called qualified."""
    return [setup("CREATE FUNCTION pg_temp.field_hash(t text) RETURNS text LANGUAGE sql AS 'SELECT t'"),
            mirror(f"SELECT pg_temp.field_hash({b.literal(x)})", b)]


MIRRORS = {
    "alias-column-list": _mirror("SELECT x FROM (VALUES ({lit})) AS touch_session(x)"),
    "alias-quoted": _mirror('SELECT x FROM (VALUES ({lit})) AS "touch_session"{gap}(x)'),
    "alias-unicode": _mirror('SELECT x FROM (VALUES ({lit})) AS U&"touch\\005fsession"(x)'),
    "alias-update": _mirror_table("CREATE TEMP TABLE {t} (id int, v text); INSERT INTO {t} VALUES (1, 'a')",
                                  "UPDATE {t} SET v = {lit} FROM (VALUES (1)) AS store_va_tokens(x) "
                                  "WHERE {t}.id = store_va_tokens.x"),
    "string": _mirror("SELECT {lit} AS v, 'vetassist_auth.encrypt_text(''x'', ''c'')' AS w"),
    "dollar-string": _mirror("SELECT $s$ vetassist_auth.field_hash('x', 'email') $s$ AS w, {lit} AS v"),
    "block-comment": _mirror("SELECT {lit} /* vetassist_auth.encrypt_text('x', 'c') */ AS v"),
    "line-comment": _mirror("SELECT {lit} -- vetassist_auth.encrypt_text('x', 'c'){eol}AS v"),
    "quoted-identifier": _mirror('SELECT {lit} AS "vetassist_auth.encrypt_text("'),
    "column-names": _mirror("SELECT touch_session, field_hash FROM (VALUES ({lit}, 1)) AS t(touch_session, field_hash)"),
    "qualified-column": _mirror("SELECT vetassist_auth.touch_session FROM (SELECT {lit} AS touch_session) AS vetassist_auth"),
    "table-named-like-ours": _mirror_table("CREATE TEMP TABLE touch_session (v text)",
                                           "INSERT INTO touch_session (v) VALUES ({lit})"),
    "window-named-like-ours": _mirror("SELECT count(*) OVER touch_session AS n, {lit} AS v FROM (VALUES (1)) AS v(x) "
                                      "WINDOW touch_session AS (ORDER BY x)"),
    "dead-branch-no-literal": _mirror("SELECT CASE WHEN false THEN vetassist_auth.node_role() END AS r,{gap}{lit} AS v"),
    "dead-branch-column-argument": _mirror("SELECT CASE WHEN false THEN vetassist_auth.touch_session(x) END AS r, x "
                                           "FROM (VALUES ({lit})) AS v(x)"),
    "same-name-other-schema": _same_name_elsewhere,
    "failing": _mirror("SELECT (x)::int AS touch_session FROM (VALUES ({lit})) AS v(x)"),
    "do-dead-branch": _mirror_do(lambda b, i: "BEGIN IF false THEN PERFORM touch_session(NULL); END IF; "
                                              f"PERFORM {b.literal(i)}::text; END"),
    "do-execute-other": _mirror_do(lambda b, i: f"BEGIN EXECUTE {quote('SELECT ' + b.literal(i.quoted()) + ' AS encrypt_text')}; END"),
    "do-execute-alias": _mirror_do(lambda b, i: "BEGIN EXECUTE " + quote(
        f"SELECT x FROM (VALUES ({b.literal(i.quoted())})) AS field_hash(x)") + "; END"),
    "function-dead-branch": _mirror_function(lambda b, i: "BEGIN IF false THEN RETURN vetassist_auth.touch_session(x); "
                                                          f"END IF; RETURN {b.literal(i)}; END"),
    "extended-bound": lambda b, x: [mirror("SELECT %s::text AS touch_session", b, params=[b.marker()])],
    "extended-prepared": lambda b, x: [mirror(f"SELECT {b.literal(x)} AS field_hash", b, prepare=True)],
    "prepare-execute": _mirror_prepared,
    "cursor": _mirror_cursor,
    "copy": lambda b, x: [mirror(f"COPY (SELECT {b.literal(x)} AS field_hash) TO STDOUT", b, copy=True)],
    "explain-analyze": _mirror("EXPLAIN ANALYZE SELECT {lit} AS touch_session"),
}


# ---- Who runs a case, with which log settings.

@dataclass(frozen=True)
class Profile:
    name: str
    dbname: str
    user: str
    session: tuple = ()  # run after connecting (and after each case's DISCARD ALL)


# Every profile logs durations (log_min_duration_statement = 0) and errors with their statement
# (log_min_error_statement = error), verbosely: postgresql.conf (LOGGING). log_statement comes
# from postgresql.conf, ALTER ROLE, ALTER DATABASE or a superuser's SET.
PROFILES = (
    Profile("conf-all", "vetassist", "fuzz_app"),
    Profile("role-mod", "vetassist", "fuzz_mod"),
    Profile("database-none", "fuzzdb", "fuzz_app"),
    Profile("superuser-set-mod", "vetassist", "postgres", ("SET log_statement = 'mod'",)),
)
# What the cluster needs for them (after vetassist_testing.install of both databases).
PROFILE_SETUP = ("CREATE ROLE fuzz_app LOGIN IN ROLE vetassist_app",
                 "CREATE ROLE fuzz_mod LOGIN IN ROLE vetassist_app",
                 "ALTER ROLE fuzz_mod SET log_statement = 'mod'",
                 "ALTER DATABASE fuzzdb SET log_statement = 'none'")


@dataclass
class Case:
    index: int
    family: str   # ours, app, mirror
    kind: str     # the wrapper's name
    call: Call    # None for a mirror
    profile: Profile
    steps: list
    markers: list
    variant: list  # standard_conforming_strings off (before / in the same message), unqualified names, …

    def describe(self):
        call = f" {self.call.label}" if self.call else ""
        return f"case {self.index} [{', '.join([f'{self.family} {self.kind}{call}', self.profile.name, *self.variant])}]"


# Calls a kind of ours cannot take: the EXECUTE of a statement that could not be prepared (the
# call does not resolve) is nobody's. (An application's function is only tried with calls that
# reach ours: a value that fails its type fails before anything of ours runs.)
REFUSES = {"prepare-execute": {"resolve"}, "prepare-execute-one-message": {"resolve"}}


def full_set():
    """Every (family, kind, call, profile) the fuzzer knows; a case adds random forms to one."""
    specs = [("ours", kind, call, p) for kind in OURS for call in CALLS if call.fails not in REFUSES.get(kind, ())
             for p in PROFILES]
    specs += [("app", kind, call, p) for kind in APP for call in CALLS if call.fails in ("", "inside") for p in PROFILES]
    specs += [("mirror", kind, None, p) for kind in MIRRORS for p in PROFILES for _ in range(4)]
    return specs


def choose(specs, count, rng):
    """`count` specs: all of them when count covers them (and random ones beyond), otherwise a
    draw that goes round the kinds so that each kind is tried about as often."""
    if count >= len(specs):
        return specs + [rng.choice(specs) for _ in range(count - len(specs))]
    by_kind = {}
    for spec in specs:
        by_kind.setdefault((spec[0], spec[1]), []).append(spec)
    for group in by_kind.values():
        rng.shuffle(group)
    rounds = [spec for k in range(max(map(len, by_kind.values()))) for group in by_kind.values() if k < len(group)
              for spec in [group[k]]]
    return rounds[:count]


def generate(seed, count, uids):
    """`count` cases, deterministic given `seed` (and the veterans' ids `uids`, by database)."""
    rng, counter = random.Random(seed), iter(range(1, 10**9))
    cases = []
    for index, (family, kind, call, profile) in enumerate(choose(full_set(), count, rng)):
        scs = rng.choices(["", "previous", "same-message"], [6, 1, 1 if family != "mirror" else 0])[0]
        unqualified = family != "mirror" and rng.random() < 0.2
        ctx = Ctx(scs_off=bool(scs))
        b = Builder(rng, seed, counter, uids[profile.dbname], unqualified)
        steps = MIRRORS[kind](b, ctx) if family == "mirror" else {**OURS, **APP}[kind](b, call, ctx)
        first = next(s for s in steps if s.check != "setup")
        if scs == "same-message" and first.simple():
            # Postgres parses the whole message before the SET runs: a backslash form is then
            # a syntax error (a statement that does not parse: no marker either).
            first.sql = "SET standard_conforming_strings = off; " + first.sql
        elif scs:
            scs = "previous"
            steps.insert(0, setup("SET standard_conforming_strings = off"))
        if unqualified:
            steps.insert(0, setup("SET search_path = vetassist_auth, public"))
        variant = [v for v in (scs and f"standard_conforming_strings off ({scs})", unqualified and "unqualified") if v]
        variant += sorted(b.features)
        cases.append(Case(index, family, kind, call, profile, steps, b.markers, variant))
    return cases


# ---- What a step may and may not leave in the log.

STATEMENT_TEXT = re.compile(r"(?:duration: [0-9.]+ ms  )?(?:statement|(?:execute|parse|bind) [^:]*): ")
PRE_EXECUTION = re.compile(r"(?:statement: |execute [^:]*: |duration: [0-9.]+ ms  (?:parse|bind) )")


def pre_execution_entries(log_entries):
    """The entries Postgres writes before a statement runs: log_statement's `statement: …` (or
    `execute NAME: …` and its `parameters:` DETAIL) and the extended protocol's parse and bind
    duration lines. When an application's own function is called with the marker and passes it
    to ours, nothing tells these lines apart from any other statement of the application's (the
    function of ours has not run yet): docs/operations.md names them the one exception."""
    exempt, inside = set(), False
    for k, e in enumerate(log_entries):
        if e.level == "LOG":
            inside = PRE_EXECUTION.match(e.message) is not None
        elif e.level not in ("DETAIL", "LOCATION"):
            inside = False
        if inside:
            exempt.add(k)
    return exempt


def problems(case, step, log, told, error):
    """What is wrong with what one step left in the log and told the client: offending lines."""
    found = entries(log)
    if step.check in ("ours", "wrapper"):
        skip = pre_execution_entries(found) if step.check == "wrapper" else set()
        bad = [e.text for k, e in enumerate(found) if k not in skip and any(m in e.text for m in case.markers)]
        bad += [f"(told the client) {t}" for t in told if any(m in t for m in case.markers)]
        if not found:
            bad.append("(nothing was logged for this statement)")
        return bad
    if step.check == "mirror":
        # Every line that shows the statement (log_statement's, a duration line's, an error's
        # STATEMENT) shows it as sent, and one does at least.
        expected = logged_form(step.sent_text())
        shown = [e.message[m.end():] for e in found if e.level == "LOG" for m in [STATEMENT_TEXT.match(e.message)] if m]
        shown += [e.message for e in found if e.level == "STATEMENT"]
        bad = []
        if not shown or any(text != expected for text in shown):
            bad = [f"(not every line shows the statement as sent: {expected!r})"] + [e.text for e in found]
        return bad + [f"(marker {m} is in no line)" for m in step.markers if m not in log]
    return []
