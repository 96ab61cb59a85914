#!/usr/bin/env bash
# The checklists of docs/CONTRIBUTING.md, done once for real in a throw-away worktree: a new API
# function (session_count, for vetassist_app) and a new encrypted column (users.phone_encrypted,
# with its hash). Prints which files each one touched. With RUN=1 it also builds and installs
# the worktree's extension for PG_CONFIG and runs the tests that must pass after each change.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WT="$ROOT/target/dry-run"
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/Cargo.toml" | head -1)
LAST=$(grep -v '^#' "$ROOT/sql/RELEASED" | tail -1 | cut -d' ' -f1)
UPGRADE="sql/vetassist_auth--$LAST--$VERSION.sql"

git -C "$ROOT" worktree remove --force "$WT" 2>/dev/null || true
git -C "$ROOT" worktree add --detach "$WT" HEAD >/dev/null
[ -n "${KEEP:-}" ] || trap 'git -C "$ROOT" worktree remove --force "$WT"' EXIT
cd "$WT"

echo "==> A new API function: vetassist_auth.session_count(user_id uuid), for vetassist_app"
cat >> sql/sessions.sql <<'SQL'

-- How many live sessions a veteran has (the per-user cap counts the same).
CREATE FUNCTION vetassist_auth.session_count(user_id uuid) RETURNS integer
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT count(*)::integer FROM vetassist_auth.sessions s
    WHERE s.user_id = session_count.user_id AND s.status = 'ACTIVE' AND s.live_until > clock_timestamp()
$$;
GRANT EXECUTE ON FUNCTION vetassist_auth.session_count(uuid) TO vetassist_app;
SQL
cat >> "$UPGRADE" <<'SQL'

CREATE FUNCTION vetassist_auth.session_count(user_id uuid) RETURNS integer
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT count(*)::integer FROM vetassist_auth.sessions s
    WHERE s.user_id = session_count.user_id AND s.status = 'ACTIVE' AND s.live_until > clock_timestamp()
$$;
REVOKE ALL ON FUNCTION vetassist_auth.session_count(uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION vetassist_auth.session_count(uuid) TO vetassist_app;
SQL
python3 - <<'PY'
from pathlib import Path
api = Path("docs/api.md")
text = api.read_text()
row = "| `session_count(uuid)` | ✓ |  |  |\n"
marker = "|---|---|---|---|\n"
text = text.replace(marker, marker + row, 1)
text += "\n`session_count(user_id)`: how many live sessions the veteran has.\n"
api.write_text(text)
PY
cat > tests/integration/test_session_count.py <<'PY'
"""session_count, as the application."""
from vetassist_testing import veteran


def test_a_veteran_with_two_sessions_has_two(app):
    uid = veteran(app, "1012660001V000001")
    for jti in ("count-1", "count-2"):
        app.execute("SELECT vetassist_auth.create_session(%s, %s, now() + interval '1 hour')", (uid, jti))
    assert app.execute("SELECT vetassist_auth.session_count(%s)", (uid,)).fetchone()[0] == 2
PY
git add -A && git commit -qm "dry run: an API function"
echo "files touched:"; git diff --stat HEAD~1 | sed 's/^/    /'
if [ -n "${RUN:-}" ]; then
    cargo pgrx install --release --pg-config "$PG_CONFIG" >/dev/null
    "$ROOT/target/venv/bin/pytest" -q tests/integration/test_session_count.py tests/integration/test_hardening.py \
        tests/integration/test_upgrade.py
fi

echo "==> A new encrypted column: users.phone_encrypted, and its hash users.phone_hash"
python3 - <<'PY'
from pathlib import Path
schema = Path("sql/schema.sql")
text = schema.read_text()
# Last in the table, where an upgrade's ADD COLUMN puts them too (the catalog diff compares).
anchor = "    last_login_at         timestamptz\n);"
assert anchor in text, "sql/schema.sql changed: update the dry run"
schema.write_text(text.replace(anchor, "    last_login_at         timestamptz,\n    phone_encrypted       bytea,\n    phone_hash            bytea\n);", 1))
registry = Path("src/protected_columns.rs")
text = registry.read_text()
anchor = '    hash(    "users",            "last_name_hash",'
line = next(l for l in text.splitlines() if l.startswith(anchor))
text = text.replace(line, line + '\n    envelope("users",            "phone_encrypted",              Purpose::Phi,    ("users.phone",                "id",      Veteran),      "id"),'
                    '\n    hash(    "users",            "phone_hash",                   "phone",                  Some("phone_encrypted"),        "id"),', 1)
registry.write_text(text)
PY
python3 - "$UPGRADE" <<'PY'
import sys
from pathlib import Path
upgrade = Path(sys.argv[1])
text = upgrade.read_text()
# Tables first, before the functions (define_key_usage reads the new registry), once per script.
marker = "-- Functions new or changed since"
text = text.replace(marker, "ALTER TABLE vetassist_auth.users ADD COLUMN phone_encrypted bytea, ADD COLUMN phone_hash bytea;\n\n" + marker, 1)
if "SELECT vetassist_auth.define_key_usage();" not in text:
    text += "\nSELECT vetassist_auth.define_key_usage();\n"
upgrade.write_text(text)
PY
git add -A && git commit -qm "dry run: an encrypted column"
echo "files touched:"; git diff --stat HEAD~1 | sed 's/^/    /'
if [ -n "${RUN:-}" ]; then
    cargo pgrx install --release --pg-config "$PG_CONFIG" >/dev/null
    # The registry's other tests also want a value in the column: its writer is an API function.
    "$ROOT/target/venv/bin/pytest" -q tests/integration/test_upgrade.py \
        "tests/integration/test_protected_columns.py::test_every_column_under_a_data_key_is_registered"
fi
