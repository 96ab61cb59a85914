"""The master key as a KMS envelope, for real (docs/operations.md, "The master key: file, command
or KMS"): the database host keeps only the master key wrapped by a real OpenBao's Transit key
(tests/kms_servers.py) or moto's AWS KMS, and vetassist_auth.master_key_command runs the shipped
scripts (kms/) to unwrap it. Start, outage at start and after, rotation of the KMS key, a revoked
token, garbage, a master key change through previous_master_key_command, a key that opens no data
key, and the custody rows of each load. Every wait after a reload waits for what the postmaster
published (verify_installation's row changes with every run), never a fixed time."""
import hashlib
import hmac
import secrets
import shutil
import subprocess
import sys

import pytest

from vetassist_testing import ROOT, Cluster, expect_sqlstate, install, master_key_source, reload_master_key, wait_for

sys.path.insert(0, str(ROOT / "tests"))
from kms_servers import (MotoKms, OpenBao, argv_as_postgres, give_to_postgres, kms_bin_dir, postgres_dir,  # noqa: E402
                         remove_tree)

def key_check(hex_key):
    """The extension's key check, computed independently: HKDF-SHA256(salt "vetassist_auth",
    info "check:v1", 8 bytes) of the master key (RFC 5869)."""
    prk = hmac.new(b"vetassist_auth", bytes.fromhex(hex_key), hashlib.sha256).digest()
    return hmac.new(prk, b"check:v1\x01", hashlib.sha256).hexdigest()[:16]


def as_postgres(script, *args, env, stdin=None):
    """A provider script as the postgres OS user with exactly `env` (as a KMS administrator runs
    `wrap` and `rewrap`)."""
    done = subprocess.run(argv_as_postgres(script, args, env), input=stdin, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr)


def command_of(script, env):
    """The master_key_command line: the script with its environment."""
    return " ".join([*(f"{k}={v}" for k, v in env.items()), str(script)])


class KmsCluster:
    """A cluster whose master key comes from `command` (changed with `set`, which reloads and
    waits for the postmaster's run)."""

    def __init__(self, name, command, *extra):
        self.c = Cluster(name, "shared_preload_libraries = 'vetassist_auth'", "vetassist_auth.master_key_file = ''",
                         "vetassist_auth.master_key_command_timeout = '5s'",
                         f"vetassist_auth.master_key_command = '{command}'", *extra)
        install(self.c)

    def source(self):
        return master_key_source(self.c)

    def reload(self, **settings):
        """Appends `settings` (vetassist_auth.NAME = value) to postgresql.conf, reloads, and
        returns verify_installation's row once the postmaster has run the command again."""
        return reload_master_key(self.c, *(f"vetassist_auth.{name} = '{value}'" for name, value in settings.items()))

    def custody(self):
        with self.c.connect("vetassist") as su:
            return [r[0] for r in su.execute("SELECT details FROM vetassist_auth.audit_log "
                                             "WHERE event_type = 'master_key_loaded' ORDER BY id").fetchall()]

    def used_and_recorded(self, matching):
        """Uses the key as the application and returns the newest custody row `matching` (a
        predicate): the row of the load in force, written for the first session that used it
        (verify_installation's own session may have been first)."""
        with self.c.connect("vetassist", "app_user") as app:
            app.execute("SELECT vetassist_auth.field_hash('x', 'email')")
        return wait_for("the load's custody row", lambda: [r for r in self.custody() if matching(r)])[-1]

    def stop(self):
        self.c.stop()


@pytest.fixture(scope="module")
def bins():
    return kms_bin_dir()


@pytest.fixture(scope="module")
def bao(bins):
    with OpenBao(bins) as server:
        yield server


@pytest.fixture(scope="module")
def keydir():
    """postgres's directory for wrapped key files, token files and the scripts (a clone of the
    repository may be out of the postgres user's reach)."""
    d = postgres_dir()
    for script in ("openbao-transit", "aws-kms"):
        give_to_postgres(shutil.copy(ROOT / "kms" / script, d / script), 0o700)
    yield d
    remove_tree(d.parent)


class Transit:
    """The database host's side of one OpenBao set-up: a wrapped master key and a decrypt-only
    token, and the command that unwraps it."""

    def __init__(self, bao, keydir, name):
        self.bao, self.keydir, self.name = bao, keydir, name
        self.key = secrets.token_hex(32)
        self.wrapped = keydir / f"{name}.wrapped"
        self.admin_env = {**bao.env(), "VETASSIST_WRAPPED_KEY_FILE": str(self.wrapped)}
        as_postgres(keydir / "openbao-transit", "wrap", env=self.admin_env, stdin=self.key + "\n")
        self.token_file = bao.write_token_file(bao.create_limited_token())
        self.env = {**bao.env(token_file=self.token_file), "VETASSIST_WRAPPED_KEY_FILE": str(self.wrapped)}
        self.command = command_of(keydir / "openbao-transit", self.env)


@pytest.fixture(scope="module")
def transit(bao, keydir):
    return Transit(bao, keydir, "first")


@pytest.fixture(scope="module")
def db(transit):
    k = KmsCluster("kms-openbao", transit.command)
    try:
        yield k
    finally:
        k.stop()


def test_the_server_starts_with_the_key_openbao_unwraps(db, transit, bao):
    ok, detail = db.source()
    assert ok and f"KMS key transit/{bao.key} version 1" in detail and key_check(transit.key) in detail
    row = db.used_and_recorded(lambda r: True)
    assert row["source"] == "command" and row["key_check"] == key_check(transit.key)
    assert (row["kms_key_id"], row["kms_key_version"]) == (f"transit/{bao.key}", "1")
    with db.c.connect("vetassist", "app_user") as app:
        ct = app.execute("SELECT vetassist_auth.encrypt_text('veteran PHI', 'c')").fetchone()[0]
        assert app.execute("SELECT vetassist_auth.decrypt_text(%s, 'c')", (ct,)).fetchone()[0] == "veteran PHI"
    assert transit.key not in db.c.log()


def test_an_outage_after_start_keeps_the_key_and_its_end_reloads_it(db, bao):
    with db.c.connect("vetassist", "app_user") as app:
        ct = app.execute("SELECT vetassist_auth.encrypt_text('during the outage', 'c')").fetchone()[0]
        bao.stop()
        try:
            ok, detail = db.reload()
            assert ok and "exited with status 75" in detail and "stays in force" in detail
            assert app.execute("SELECT vetassist_auth.decrypt_text(%s, 'c')", (ct,)).fetchone()[0] == "during the outage"
            with db.c.connect("vetassist", "app_user") as new:
                assert new.execute("SELECT vetassist_auth.decrypt_text(%s, 'c')", (ct,)).fetchone()[0] == "during the outage"
        finally:
            bao.start()
        ok, detail = db.reload()
        assert ok and "stays in force" not in detail


def test_rotating_the_kms_key_needs_nothing_in_the_database(db, transit, bao, keydir):
    with db.c.connect("vetassist", "app_user") as app:
        ct = app.execute("SELECT vetassist_auth.encrypt_text('before the rotation', 'c')").fetchone()[0]
    assert bao.rotate() == 2
    as_postgres(keydir / "openbao-transit", "rewrap", env=transit.admin_env)
    assert transit.wrapped.read_text().startswith("vault:v2:")
    ok, detail = db.reload()
    assert ok and "version 2" in detail
    row = db.used_and_recorded(lambda r: r["kms_key_version"] == "2")
    assert row["key_check"] == key_check(transit.key)
    with db.c.connect("vetassist", "app_user") as app:
        assert app.execute("SELECT vetassist_auth.decrypt_text(%s, 'c')", (ct,)).fetchone()[0] == "before the rotation"


def test_a_revoked_token_or_garbage_withdraws_the_key(db, transit, bao, keydir):
    with db.c.connect("vetassist", "app_user") as app:
        ct = app.execute("SELECT vetassist_auth.encrypt_text('after revocation', 'c')").fetchone()[0]
        bao.revoke(transit.token_file.read_text().strip())
        ok, detail = db.reload()
        assert not ok and "exited with status 77" in detail
        err = expect_sqlstate("55000", app, "SELECT vetassist_auth.decrypt_text(%s, 'c')", (ct,))
        assert "vetassist_auth.master_key_command" in err.diag.message_primary
        # A new token (the KMS administrator's remedy), then a reload: back without a restart.
        transit.token_file.write_text(bao.create_limited_token() + "\n")
        ok, _ = db.reload()
        assert ok
        assert app.execute("SELECT vetassist_auth.decrypt_text(%s, 'c')", (ct,)).fetchone()[0] == "after revocation"
    # The KMS answers with something that is no key (a wrapped file of another text).
    garbage = keydir / "garbage.wrapped"
    garbage.write_text(bao.encrypt(b"not a master key") + "\n")
    give_to_postgres(garbage)
    ok, detail = db.reload(master_key_command=command_of(keydir / "openbao-transit",
                                                         {**transit.env, "VETASSIST_WRAPPED_KEY_FILE": str(garbage)}))
    assert not ok and "exited with status 65" in detail
    with db.c.connect("vetassist", "app_user") as app:
        expect_sqlstate("55000", app, "SELECT vetassist_auth.encrypt_text('x', 'c')")
    ok, _ = db.reload(master_key_command=transit.command)
    assert ok


def test_a_key_that_opens_no_data_key_is_xx001_naming_the_source(db, bao, keydir):
    other = Transit(bao, keydir, "other")
    with db.c.connect("vetassist", "app_user") as app:
        ct = app.execute("SELECT vetassist_auth.encrypt_text('x', 'c')").fetchone()[0]
    first_command = db.c.connect("vetassist").execute("SHOW vetassist_auth.master_key_command").fetchone()[0]
    try:
        ok, _ = db.reload(master_key_command=other.command)
        assert ok
        with db.c.connect("vetassist", "app_user") as app:
            err = expect_sqlstate("XX001", app, "SELECT vetassist_auth.decrypt_text(%s, 'c')", (ct,))
        assert "vetassist_auth.master_key_command" in err.diag.message_hint
    finally:
        db.reload(master_key_command=first_command)


def test_changing_the_master_key_through_the_kms(db, transit, bao, keydir):
    with db.c.connect("vetassist", "app_user") as app:
        ct = app.execute("SELECT vetassist_auth.encrypt_text('across the change', 'c')").fetchone()[0]
    new = Transit(bao, keydir, "second")
    ok, detail = db.reload(master_key_command=new.command, previous_master_key_command=transit.command)
    assert ok and "previous: vetassist_auth.previous_master_key_command" in detail
    with db.c.connect("vetassist", "app_user") as app:
        assert app.execute("SELECT vetassist_auth.decrypt_text(%s, 'c')", (ct,)).fetchone()[0] == "across the change"
    with db.c.connect("vetassist", "admin_user") as admin:
        assert admin.execute("SELECT vetassist_auth.rewrap_keys()").fetchone()[0] >= 1
    with db.c.connect("vetassist") as su:
        rewrapped = su.execute("SELECT details FROM vetassist_auth.audit_log WHERE event_type = 'keys_rewrapped' "
                               "ORDER BY id DESC LIMIT 1").fetchone()[0]
        problem = su.execute("SELECT ok FROM vetassist_auth.verify_installation() "
                             "WHERE check_name = 'keys: wrapped under the current master key'").fetchone()[0]
    assert (rewrapped["from_key_check"], rewrapped["to_key_check"]) == (key_check(transit.key), key_check(new.key))
    assert problem
    ok, detail = db.reload(previous_master_key_command="")
    assert ok and "previous" not in detail
    row = db.used_and_recorded(lambda r: r["key_check"] == key_check(new.key) and "previous" not in r)
    assert row["kms_key_version"] == "2"  # the Transit key was rotated above
    with db.c.connect("vetassist", "app_user") as app:
        assert app.execute("SELECT vetassist_auth.decrypt_text(%s, 'c')", (ct,)).fetchone()[0] == "across the change"
    log = db.c.log()
    assert transit.key not in log and new.key not in log


def test_a_kms_unreachable_at_start_is_55000_until_a_reload_succeeds(bao, keydir):
    setup = Transit(bao, keydir, "cold")
    bao.stop()
    try:
        k = KmsCluster("kms-cold", setup.command)
    except BaseException:
        bao.start()
        raise
    try:
        with k.c.connect("vetassist", "app_user") as app:
            err = expect_sqlstate("55000", app, "SELECT vetassist_auth.encrypt_text('x', 'c')")
            assert "vetassist_auth.master_key_command exited with status 75" in err.diag.message_primary
            assert app.execute("SELECT vetassist_auth.node_role()").fetchone()[0] == "primary"
            bao.start()
            ok, _ = k.reload()
            assert ok
            assert app.execute("SELECT vetassist_auth.decrypt_text(vetassist_auth.encrypt_text('y', 'c'), 'c')").fetchone()[0] == "y"
    finally:
        k.stop()


def test_aws_kms_through_moto(bins, keydir):
    with MotoKms(bins) as moto:
        key = secrets.token_hex(32)
        wrapped = keydir / "aws.wrapped"
        env = {**moto.env(), "VETASSIST_WRAPPED_KEY_FILE": str(wrapped)}
        as_postgres(keydir / "aws-kms", "wrap", env=env, stdin=key + "\n")
        k = KmsCluster("kms-aws", command_of(keydir / "aws-kms", env))
        try:
            ok, detail = k.source()
            assert ok and key_check(key) in detail and "KMS key arn:aws:kms:" in detail
            with k.c.connect("vetassist", "app_user") as app:
                ct = app.execute("SELECT vetassist_auth.encrypt_text('aws', 'c')").fetchone()[0]
                moto.disable_key()
                ok, detail = k.reload()
                assert not ok and "exited with status 77" in detail
                expect_sqlstate("55000", app, "SELECT vetassist_auth.decrypt_text(%s, 'c')", (ct,))
                moto.enable_key()
                ok, _ = k.reload()
                assert ok and app.execute("SELECT vetassist_auth.decrypt_text(%s, 'c')", (ct,)).fetchone()[0] == "aws"
            assert key not in k.c.log()
        finally:
            k.stop()
