"""The master key commands kms/openbao-transit and kms/aws-kms on their own, against real KMS
servers on loopback (tests/kms_servers.py: OpenBao 2.7.2, moto's AWS KMS), run as the postgres OS
user the way the postmaster runs vetassist_auth.master_key_command: stdout is exactly the key and
its id lines or nothing, the exit status tells an outage (75) from a refusal (77) or an unusable
wrapped key (65), and no run prints a secret. No PostgreSQL cluster: runs with or without
tests/conftest.py (--noconftest)."""
import base64
import os
import secrets
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kms_servers import (MotoKms, OpenBao, StalledServer, argv_as_postgres, command_lines,  # noqa: E402
                         give_to_postgres, kms_bin_dir, postgres_dir, postgres_ids, remove_tree)

# The scripts do not depend on the PostgreSQL under test: once per make test.
pytestmark = pytest.mark.no_pg

ROOT = Path(__file__).resolve().parents[2]
TRANSIT = ROOT / "kms" / "openbao-transit"
AWS = ROOT / "kms" / "aws-kms"
# Every key, token and ciphertext a test made: no run may print one on stderr.
SECRETS = set()


def secret(value):
    SECRETS.add(value)
    return value


def new_master_key():
    return secret(secrets.token_hex(32))


@dataclass
class Run:
    status: int
    stdout: str
    stderr: str
    seconds: float


def run(script, *args, env, stdin=None):
    """The script as postgres with exactly `env`; checks that stderr holds no secret."""
    started = time.monotonic()
    done = subprocess.run(argv_as_postgres(script, args, env), input=stdin, capture_output=True, text=True,
                          timeout=120)
    result = Run(done.returncode, done.stdout, done.stderr, time.monotonic() - started)
    leaked = [s for s in SECRETS if s in result.stderr]
    assert not leaked, f"{script.name} {' '.join(args)} printed a secret on stderr: {result.stderr!r}"
    return result


def refused(result, status):
    """The run failed with `status`, stdout empty (the protocol: nothing on stdout but a key)."""
    assert (result.status, result.stdout) == (status, ""), result
    return True


def wrapped_file_of(path):
    """The wrapped file's text, checked to be postgres's, 0600, and alone (no temporary left)."""
    st = path.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (postgres_ids()[0], 0o600)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    return secret(path.read_text().strip())


@pytest.fixture(scope="session")
def bins():
    if os.geteuid() != 0:
        pytest.skip("runs the scripts as the postgres OS user through runuser: run as root")
    try:
        postgres_ids()
    except KeyError:
        pytest.skip("no postgres OS user")
    # Idempotent and quick once installed; a failure here is a failure, not a skip.
    return kms_bin_dir()


@pytest.fixture
def keydir():
    """A directory of postgres's for the wrapped key file (wrap writes a temporary file there)."""
    d = postgres_dir()
    yield d
    remove_tree(d.parent)


@pytest.fixture(scope="module")
def bao(bins):
    with OpenBao(bins) as server:
        secret(server.root_token)
        yield server


@pytest.fixture(scope="module")
def moto(bins):
    with MotoKms(bins) as server:
        yield server


# -- OpenBao / Vault Transit ------------------------------------------------------------------------

def test_transit_wrap_then_unwrap_prints_the_key_its_id_and_version(bao, keydir):
    key = new_master_key()
    env = {**bao.env(), "VETASSIST_WRAPPED_KEY_FILE": str(keydir / "master.wrapped")}
    wrapped = run(TRANSIT, "wrap", env=env, stdin=key + "\n")
    assert (wrapped.status, wrapped.stdout) == (0, "")
    ciphertext = wrapped_file_of(keydir / "master.wrapped")
    assert ciphertext.startswith("vault:v1:") and key not in ciphertext
    expected = f"{key}\nkms_key_id=transit/{bao.key}\nkms_key_version=1\n"
    # No argument is what the postmaster runs: unwrap.
    for args in ((), ("unwrap",)):
        result = run(TRANSIT, *args, env=env)
        assert (result.status, result.stdout) == (0, expected), result


def test_transit_wrap_keeps_an_existing_file_unless_forced(bao, keydir):
    first, second = new_master_key(), new_master_key()
    env = {**bao.env(), "VETASSIST_WRAPPED_KEY_FILE": str(keydir / "master.wrapped")}
    assert run(TRANSIT, "wrap", env=env, stdin=first).status == 0
    before = wrapped_file_of(keydir / "master.wrapped")
    assert refused(run(TRANSIT, "wrap", env=env, stdin=second), 73)
    assert wrapped_file_of(keydir / "master.wrapped") == before
    assert run(TRANSIT, "wrap", "--force", env=env, stdin=second).status == 0
    assert run(TRANSIT, env=env).stdout.splitlines()[0] == second


def test_transit_rotate_then_rewrap_says_version_2_of_the_same_key(bao, keydir):
    transit_key = bao.create_key()
    key = new_master_key()
    env = {**bao.env(key=transit_key), "VETASSIST_WRAPPED_KEY_FILE": str(keydir / "master.wrapped")}
    assert run(TRANSIT, "wrap", env=env, stdin=key).status == 0
    before = wrapped_file_of(keydir / "master.wrapped")
    assert bao.rotate(transit_key) == 2
    # Until rewrapped, the file stays under version 1 (which still decrypts).
    assert run(TRANSIT, env=env).stdout == f"{key}\nkms_key_id=transit/{transit_key}\nkms_key_version=1\n"
    rewrapped = run(TRANSIT, "rewrap", env=env)
    assert (rewrapped.status, rewrapped.stdout) == (0, ""), rewrapped
    after = wrapped_file_of(keydir / "master.wrapped")
    assert after.startswith("vault:v2:") and after != before
    result = run(TRANSIT, env=env)
    assert (result.status, result.stdout) == (0, f"{key}\nkms_key_id=transit/{transit_key}\nkms_key_version=2\n")


def test_transit_decrypt_only_token_unwraps_and_once_revoked_is_77(bao, keydir):
    key = new_master_key()
    wrapped = str(keydir / "master.wrapped")
    assert run(TRANSIT, "wrap", env={**bao.env(), "VETASSIST_WRAPPED_KEY_FILE": wrapped}, stdin=key).status == 0
    token = secret(bao.create_limited_token())
    env = {**bao.env(token_file=bao.write_token_file(token)), "VETASSIST_WRAPPED_KEY_FILE": wrapped}
    assert run(TRANSIT, env=env).stdout.splitlines()[0] == key
    # Its policy grants decrypt alone.
    assert refused(run(TRANSIT, "wrap", "--force", env=env, stdin=new_master_key()), 77)
    bao.revoke(token)
    assert refused(run(TRANSIT, env=env), 77)


def test_transit_outage_is_75_sealed_is_75_and_the_same_key_comes_back(bins, keydir):
    """Its own server: this one is stopped and started."""
    with OpenBao(bins) as server:
        secret(server.root_token)
        key = new_master_key()
        env = {**server.env(), "VETASSIST_WRAPPED_KEY_FILE": str(keydir / "master.wrapped")}
        assert run(TRANSIT, "wrap", env=env, stdin=key).status == 0
        expected = f"{key}\nkms_key_id=transit/{server.key}\nkms_key_version=1\n"
        assert run(TRANSIT, env=env).stdout == expected

        server.stop()
        assert refused(run(TRANSIT, env=env), 75)
        other = {**env, "VETASSIST_WRAPPED_KEY_FILE": str(keydir / "other.wrapped")}
        assert refused(run(TRANSIT, "wrap", env=other, stdin=new_master_key()), 75)
        assert not (keydir / "other.wrapped").exists()

        server.start(unseal=False)  # answers again, 503: sealed
        assert refused(run(TRANSIT, env=env), 75)
        server.unseal()
        result = run(TRANSIT, env=env)
        assert (result.status, result.stdout) == (0, expected)


def test_transit_unusable_wrapped_files_are_65_and_a_missing_one_66(bao, keydir):
    path = keydir / "master.wrapped"
    env = {**bao.env(), "VETASSIST_WRAPPED_KEY_FILE": str(path)}
    other_key = bao.create_key()
    cases = {
        "garbage": "not a ciphertext at all",
        "empty": "",
        "forged": secret("vault:v1:" + base64.b64encode(os.urandom(60)).decode()),
        "another key's": secret(bao.encrypt(secrets.token_hex(32).encode(), key=other_key)),
        "not a hex key": secret(bao.encrypt(b"hello, this is not a master key")),
        "a 32-byte binary key": secret(bao.encrypt(os.urandom(32))),
        "63 hex": secret(bao.encrypt(secrets.token_hex(32)[:63].encode())),
    }
    for name, text in cases.items():
        path.write_text(text + "\n")
        give_to_postgres(path)
        result = run(TRANSIT, env=env)
        assert refused(result, 65), name
    path.unlink()
    assert refused(run(TRANSIT, env=env), 66)


def test_transit_missing_configuration_is_78(bao, keydir):
    env = {**bao.env(), "VETASSIST_WRAPPED_KEY_FILE": str(keydir / "master.wrapped")}
    assert run(TRANSIT, "wrap", env=env, stdin=new_master_key()).status == 0
    for missing in ("VAULT_ADDR", "VETASSIST_TRANSIT_KEY", "VETASSIST_WRAPPED_KEY_FILE", "VAULT_TOKEN_FILE"):
        assert refused(run(TRANSIT, env={k: v for k, v in env.items() if k != missing}), 78), missing
    root_only = bao.dir / "root-only.token"  # root's, 0600: postgres cannot read it
    root_only.write_text(bao.root_token)
    root_only.chmod(0o600)
    assert refused(run(TRANSIT, env={**env, "VAULT_TOKEN_FILE": str(root_only)}), 78)
    assert refused(run(TRANSIT, env={**env, "VETASSIST_KMS_TIMEOUT": "soon"}), 78)
    assert refused(run(TRANSIT, "decrypt", env=env), 64)


# -- AWS KMS (moto) -----------------------------------------------------------------------------

def test_aws_wrap_then_unwrap_prints_the_key_and_the_key_arn(moto, keydir):
    key = new_master_key()
    env = {**moto.env(), "VETASSIST_WRAPPED_KEY_FILE": str(keydir / "master.wrapped")}
    wrapped = run(AWS, "wrap", env=env, stdin=key + "\n")
    assert (wrapped.status, wrapped.stdout) == (0, ""), wrapped
    blob = wrapped_file_of(keydir / "master.wrapped")
    assert key not in blob
    base64.b64decode(blob, validate=True)
    # moto reports no KeyMaterialId: no kms_key_version line.
    expected = f"{key}\nkms_key_id={moto.key_arn}\n"
    for args in ((), ("unwrap",)):
        result = run(AWS, *args, env=env)
        assert (result.status, result.stdout) == (0, expected), result
    # wrap keeps an existing file unless forced.
    assert refused(run(AWS, "wrap", env=env, stdin=new_master_key()), 73)
    assert wrapped_file_of(keydir / "master.wrapped") == blob
    second = new_master_key()
    assert run(AWS, "wrap", "--force", env=env, stdin=second).status == 0
    assert run(AWS, env=env).stdout == f"{second}\nkms_key_id={moto.key_arn}\n"


def test_aws_rewrap_to_another_key_keeps_the_master_key(moto, keydir):
    key = new_master_key()
    env = {**moto.env(), "VETASSIST_WRAPPED_KEY_FILE": str(keydir / "master.wrapped")}
    assert run(AWS, "wrap", env=env, stdin=key).status == 0
    before = wrapped_file_of(keydir / "master.wrapped")
    new_kms_key = moto.create_key()
    env_new = {**env, "VETASSIST_KMS_KEY_ID": new_kms_key}
    rewrapped = run(AWS, "rewrap", env=env_new)
    assert (rewrapped.status, rewrapped.stdout) == (0, ""), rewrapped
    assert wrapped_file_of(keydir / "master.wrapped") != before
    result = run(AWS, env=env_new)
    assert (result.status, result.stdout) == (0, f"{key}\nkms_key_id={new_kms_key}\n")
    # Unwrap names the key it expects: the old one no longer opens the file (moto: AccessDenied,
    # AWS: IncorrectKeyException): a refusal either way.
    assert run(AWS, env=env).status in (65, 77)


def test_aws_disabled_key_is_77_and_enabled_again_unwraps(moto, keydir):
    kms_key = moto.create_key()
    key = new_master_key()
    env = {**moto.env(key=kms_key), "VETASSIST_WRAPPED_KEY_FILE": str(keydir / "master.wrapped")}
    assert run(AWS, "wrap", env=env, stdin=key).status == 0
    moto.disable_key(kms_key)
    try:
        assert refused(run(AWS, env=env), 77)
        # Without --key-id too: KMS names the key from the blob and refuses it.
        assert refused(run(AWS, env={k: v for k, v in env.items() if k != "VETASSIST_KMS_KEY_ID"}), 77)
    finally:
        moto.enable_key(kms_key)
    assert run(AWS, env=env).stdout == f"{key}\nkms_key_id={kms_key}\n"


def test_aws_outage_is_75(bins, keydir):
    """Its own moto: a stopped moto does not come back (its state is in memory)."""
    with MotoKms(bins) as server:
        key = new_master_key()
        env = {**server.env(), "VETASSIST_WRAPPED_KEY_FILE": str(keydir / "master.wrapped")}
        assert run(AWS, "wrap", env=env, stdin=key).status == 0
        assert run(AWS, env=env).stdout.splitlines()[0] == key
        server.stop()
        assert refused(run(AWS, env=env), 75)
        other = {**env, "VETASSIST_WRAPPED_KEY_FILE": str(keydir / "other.wrapped")}
        assert refused(run(AWS, "wrap", env=other, stdin=new_master_key()), 75)
        assert not (keydir / "other.wrapped").exists()


def test_aws_unusable_wrapped_files_are_65_and_a_missing_one_66(moto, keydir):
    path = keydir / "master.wrapped"
    env = {**moto.env(), "VETASSIST_WRAPPED_KEY_FILE": str(path)}
    cases = {
        "not base64": "this is not base64!",
        "empty": "",
        "forged blob": secret(base64.b64encode(os.urandom(180)).decode()),
    }
    for name, text in cases.items():
        path.write_text(text + "\n")
        give_to_postgres(path)
        assert refused(run(AWS, env=env), 65), name
    # A blob that decrypts to something other than 64 hex characters.
    for name, plaintext in {"not hex": b"hello, not a master key", "63 hex": secrets.token_hex(32)[:63].encode(),
                            "binary": os.urandom(32)}.items():
        path.unlink(missing_ok=True)
        blob_file = keydir.parent / "plaintext.bin"
        blob_file.write_bytes(plaintext)
        blob = secret(moto.aws("encrypt", "--key-id", moto.key_arn, "--plaintext", f"fileb://{blob_file}",
                               "--query", "CiphertextBlob"))
        blob_file.unlink()
        path.write_text(blob + "\n")
        give_to_postgres(path)
        assert refused(run(AWS, env=env), 65), name
    path.unlink()
    assert refused(run(AWS, env=env), 66)


def test_aws_missing_configuration_is_78(moto, keydir):
    env = {**moto.env(), "VETASSIST_WRAPPED_KEY_FILE": str(keydir / "master.wrapped")}
    assert run(AWS, "wrap", env=env, stdin=new_master_key()).status == 0
    no_region = {k: v for k, v in env.items() if k not in ("AWS_REGION", "AWS_DEFAULT_REGION")}
    assert refused(run(AWS, env=no_region), 78)
    no_credentials = {k: v for k, v in env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    assert refused(run(AWS, env=no_credentials), 78)
    assert refused(run(AWS, env={k: v for k, v in env.items() if k != "VETASSIST_WRAPPED_KEY_FILE"}), 78)
    no_key = {k: v for k, v in env.items() if k != "VETASSIST_KMS_KEY_ID"}
    assert refused(run(AWS, "rewrap", env=no_key), 78)
    assert refused(run(AWS, env={**env, "VETASSIST_AWS_CLI": "/nonexistent/aws"}), 78)


# -- both: a KMS that accepts connections and never answers --------------------------------------

@pytest.mark.parametrize("script", [TRANSIT, AWS], ids=["openbao-transit", "aws-kms"])
@pytest.mark.parametrize("command", ["unwrap", "wrap"])
def test_a_stalled_kms_is_75_within_the_timeout_and_no_secret_is_on_a_command_line(bins, keydir, script, command):
    """VETASSIST_KMS_TIMEOUT=2 bounds the whole call (the upper bound asserted is generous: a
    loaded machine is slow, never that slow). While the script waits, every process's command
    line is read: neither the key, nor the token, nor the wrapped blob is on one."""
    key = new_master_key()
    path = keydir / "master.wrapped"
    with StalledServer() as stalled:
        if script == TRANSIT:
            token = secret(f"s.{secrets.token_urlsafe(24)}")
            token_file = keydir.parent / "stalled.token"
            token_file.write_text(token + "\n")
            give_to_postgres(token_file)
            env = {"VAULT_ADDR": stalled.address, "VAULT_TOKEN_FILE": str(token_file),
                   "VETASSIST_TRANSIT_KEY": "vetassist-master"}
            blob = secret("vault:v1:" + base64.b64encode(os.urandom(60)).decode())
        else:
            env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                   "AWS_ENDPOINT_URL": stalled.address, "AWS_EC2_METADATA_DISABLED": "true",
                   "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
                   "VETASSIST_AWS_CLI": str(bins / "aws"),
                   "VETASSIST_KMS_KEY_ID": "arn:aws:kms:us-east-1:123456789012:key/00000000-0000-0000-0000-000000000000"}
            blob = secret(base64.b64encode(os.urandom(180)).decode())
        if command == "unwrap":
            path.write_text(blob + "\n")
            give_to_postgres(path)
        env.update({"VETASSIST_WRAPPED_KEY_FILE": str(path), "VETASSIST_KMS_TIMEOUT": "2"})
        secret(base64.b64encode(key.encode()).decode())  # what Transit's encrypt carries

        # stdin: a pipe holding the key (wrap) or nothing, already closed at our end.
        stdin, feed = os.pipe()
        os.write(feed, (key + "\n").encode() if command == "wrap" else b"")
        os.close(feed)
        started = time.monotonic()
        process = subprocess.Popen(argv_as_postgres(script, [command], env), stdin=stdin,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        os.close(stdin)
        try:
            assert stalled.connected.wait(60), "the script never connected to the KMS"
            on_command_lines = [s for s in SECRETS for line in command_lines() if s in line]
            stdout, stderr = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        seconds = time.monotonic() - started
    assert not on_command_lines, "a secret was on a command line"
    assert (process.returncode, stdout) == (75, ""), (process.returncode, stdout, stderr)
    assert seconds < 20, f"took {seconds:.1f}s with VETASSIST_KMS_TIMEOUT=2"
    assert not [s for s in SECRETS if s in stderr]
    if command == "wrap":
        assert not path.exists()
