"""The accounting of disclosures (45 CFR 164.528) of one veteran, as CSV or a printable HTML page.

``accounting_rows`` reads ``vetassist_auth.accounting_of_disclosures`` on a connection of a
``vetassist_auditor`` member (the extension audits the read itself); ``render_csv`` and
``render_html`` are pure. The command line does both:

    python -m vetassist_client.report accounting --user UUID [--since ISO-TIMESTAMP]
        [--format csv|html] [--output FILE] [--conninfo DSN]

Recipient and description are free text the application recorded, possibly from an attacker:
every value is escaped (HTML) or quoted (CSV), never trusted.
"""

from __future__ import annotations

import argparse
import csv
import html
import io
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from uuid import UUID

import psycopg
from psycopg.rows import TupleRow

from .errors import VetAssistError, translated_errors
from .rows import AccountingEntry
from .scopes import Auditor

TITLE = "Accounting of disclosures"
EMPTY_PERIOD = "No disclosures requiring an accounting were made in this period."
CSV_HEADER = ("date", "recipient", "description", "purpose")
# What a spreadsheet would run as a formula when a cell starts with it (CWE-1236).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def accounting_rows(conn: psycopg.Connection[TupleRow], user_id: UUID,
                    since: datetime | None = None) -> list[AccountingEntry]:
    """The accountable disclosures about ``user_id``, oldest first, from ``since`` on (None: the
    function's default, six years back). ``conn`` is an auditor's; the caller ends its transaction.

    InvalidArgument for a bad period, PermissionDenied for a role that is not an auditor.
    """
    return Auditor(conn).accounting_of_disclosures(user_id, since)


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError("a timezone-aware datetime is required")
    return moment.astimezone(UTC)


def _date(moment: datetime) -> str:
    """The UTC date, YYYY-MM-DD."""
    return _utc(moment).date().isoformat()


def six_years_before(moment: datetime) -> datetime:
    """``moment`` less six calendar years (29 February gives 28 February), as the SQL default."""
    try:
        return moment.replace(year=moment.year - 6)
    except ValueError:
        return moment.replace(year=moment.year - 6, day=28)


def _spreadsheet_safe(value: str) -> str:
    """A leading ' before text a spreadsheet would take for a formula; anything else unchanged."""
    return "'" + value if value.startswith(_FORMULA_START) else value


def render_csv(user_id: UUID, rows: Sequence[AccountingEntry]) -> str:
    """The entries as CSV (RFC 4180, CRLF line ends): header ``date,recipient,description,purpose``,
    then one row per entry with the UTC date of the disclosure.

    Commas, quotes and line breaks in values are quoted by the csv module. A value starting with
    = + - @ or a tab/CR gets a leading ' so a spreadsheet shows it as text instead of running it.
    ``user_id`` is not written (the file holds one veteran's entries; name it after them).
    """
    out = io.StringIO(newline="")
    writer = csv.writer(out)
    writer.writerow(CSV_HEADER)
    for row in rows:
        writer.writerow((_date(row.disclosed_at), _spreadsheet_safe(row.recipient),
                         _spreadsheet_safe(row.description), _spreadsheet_safe(row.purpose)))
    return out.getvalue()


_STYLE = """
  body { font-family: "DejaVu Sans", Arial, Helvetica, sans-serif; font-size: 11pt; color: #000;
         background: #fff; margin: 2em auto; max-width: 60em; padding: 0 1em; line-height: 1.35; }
  h1 { font-size: 18pt; margin: 0 0 .5em; }
  dl.meta { display: grid; grid-template-columns: max-content auto; gap: .2em 1em; margin: 0 0 1.5em; }
  dl.meta dt { font-weight: bold; }
  dl.meta dd { margin: 0; font-family: "DejaVu Sans Mono", monospace; }
  table { border-collapse: collapse; width: 100%; }
  th, td { border: 1px solid #444; padding: .3em .5em; text-align: left; vertical-align: top;
           white-space: pre-wrap; overflow-wrap: anywhere; }
  th { background: #e6e6e6; }
  td.date { white-space: nowrap; }
  p.empty { font-style: italic; }
  p.note { font-size: 9pt; margin-top: 2em; border-top: 1px solid #999; padding-top: .5em; }
  @media print {
    @page { size: auto; margin: 15mm; }
    body { margin: 0; max-width: none; padding: 0; font-size: 10pt; }
    th { background: none; }
    thead { display: table-header-group; }
    tr { break-inside: avoid; page-break-inside: avoid; }
  }
"""


def render_html(user_id: UUID, rows: Sequence[AccountingEntry], generated_at: datetime, *,
                since: datetime | None = None) -> str:
    """A self-contained printable HTML5 page: no script, no external resource (its CSP forbids
    both), every value escaped. The period runs from ``since`` (None: six years before
    ``generated_at``, the SQL default) to ``generated_at``; both must be timezone-aware.
    """
    e = html.escape
    generated = _utc(generated_at)
    start = _utc(since) if since is not None else six_years_before(generated)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(TITLE)}</title>",
        f"<style>{_STYLE}</style>",
        "</head>",
        "<body>",
        f"<h1>{e(TITLE)}</h1>",
        '<dl class="meta">',
        f"<dt>Individual (veteran id)</dt><dd>{e(str(user_id))}</dd>",
        f"<dt>Period</dt><dd>{e(_date(start))} to {e(_date(generated))} (UTC)</dd>",
        f"<dt>Generated</dt><dd>{e(generated.strftime('%Y-%m-%d %H:%M:%S'))} UTC</dd>",
        "</dl>",
    ]
    if rows:
        parts += [
            "<table>",
            "<thead><tr><th>Date</th><th>Recipient</th><th>Description of the information disclosed</th>"
            "<th>Purpose</th></tr></thead>",
            "<tbody>",
        ]
        parts += [f'<tr><td class="date">{e(_date(r.disclosed_at))}</td><td>{e(r.recipient)}</td>'
                  f"<td>{e(r.description)}</td><td>{e(r.purpose)}</td></tr>" for r in rows]
        parts += ["</tbody>", "</table>"]
    else:
        parts.append(f'<p class="empty">{e(EMPTY_PERIOD)}</p>')
    parts += [
        '<p class="note">This accounting is provided under 45 CFR 164.528 (HIPAA Privacy Rule): it lists '
        "each disclosure of the individual's protected health information in the period that requires "
        "an accounting, with its date, recipient, a brief description of the information disclosed and "
        "a brief statement of its purpose (164.528(b)(2)). Disclosures for treatment, payment and health "
        "care operations, to the individual, incidental to a permitted use, under the individual's "
        "authorization, and the other disclosures listed in 164.528(a)(1) are not included. Dates are "
        "in UTC.</p>",
        "</body>",
        "</html>",
        "",
    ]
    return "\n".join(parts)


def _timestamp(text: str) -> datetime:
    """An ISO 8601 date or timestamp; without an offset it is taken as UTC."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 timestamp: {text!r}") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vetassist_client.report",
                                     description="Reports of the vetassist_auth extension, for auditors.")
    commands = parser.add_subparsers(dest="command", required=True)
    accounting = commands.add_parser(
        "accounting", help="a veteran's accounting of disclosures (45 CFR 164.528)",
        description="Reads vetassist_auth.accounting_of_disclosures as a vetassist_auditor member (the "
                    "read is audited) and writes it as CSV or as a printable HTML page.")
    accounting.add_argument("--user", required=True, type=UUID, help="the veteran's user id")
    accounting.add_argument("--since", type=_timestamp,
                            help="start of the period, ISO 8601 (UTC when no offset is given); "
                                 "default: six years ago")
    accounting.add_argument("--format", choices=("csv", "html"), default="html", help="default: html")
    accounting.add_argument("--output", help="file to write (default: standard output)")
    accounting.add_argument("--conninfo", default=os.environ.get("VETASSIST_PG_CONNINFO"),
                            help="libpq connection string of an auditor role "
                                 "(default: $VETASSIST_PG_CONNINFO)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.conninfo:
        parser.error("no connection: pass --conninfo or set VETASSIST_PG_CONNINFO")
    try:
        with translated_errors(), psycopg.connect(args.conninfo) as conn:
            rows = accounting_rows(conn, args.user, args.since)
            # The transaction's now(): the instant the default period (six years back) ran to.
            now = conn.execute("SELECT now()").fetchone()
            generated_at = now[0] if now else datetime.now(UTC)
        # The connection committed on leaving the block: the read and its audit row are recorded.
    except VetAssistError as exc:
        # A server error: its primary message and SQLSTATE. No SQLSTATE (the connection failed):
        # libpq's message, which names the server, never a veteran.
        why = f"{exc} (SQLSTATE {exc.sqlstate})" if exc.sqlstate else f"{exc}: {exc.__cause__ or ''}".rstrip(": ")
        print(f"{parser.prog}: {why}", file=sys.stderr)
        return 1
    if args.format == "csv":
        text = render_csv(args.user, rows)
    else:
        text = render_html(args.user, rows, generated_at, since=args.since)
    if args.output:
        with open(args.output, "w", encoding="utf-8", newline="") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
