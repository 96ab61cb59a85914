"""Real KMS servers on loopback for the master key command's tests (kms/openbao-transit,
kms/aws-kms): OpenBao with a Transit key, and moto's AWS KMS. Their programs come from
scripts/ensure-kms.sh (`kms_bin_dir()`); this module itself needs only the standard library.

Files that the postmaster's command reads (token files, wrapped key files) belong to the
postgres OS user, mode 0600, in directories it can traverse (`postgres_dir()`): the server runs
as postgres, so the tests run the scripts as postgres too.

Everything waits on events with deadlines (`wait_for`), never on fixed sleeps.

Run with the KMS venv's python, `python tests/kms_servers.py moto-server PORT` is the moto server
that `MotoKms` starts (moto with the key-state checks it lacks, see `_moto_server`)."""
import http.client
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STARTUP_SECONDS = 60  # a cold machine, both cores busy: generous, polled, never slept

# Loopback only: no proxy from the environment may see these requests.
_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def kms_bin_dir():
    """The bin/ directory holding bao, aws and moto_server (scripts/ensure-kms.sh installs them
    once; on a warm machine it only checks a marker)."""
    out = subprocess.run([str(ROOT / "scripts" / "ensure-kms.sh")], stdout=subprocess.PIPE, text=True,
                         check=True).stdout.strip()
    return Path(out) / "bin"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_closed(port):
    """True once nothing listens on 127.0.0.1:port (a connection is refused)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except OSError:
        return True


def wait_for(predicate, what, seconds=STARTUP_SECONDS, process=None, log=None):
    """Polls `predicate` until it returns a true value (returned), or fails after `seconds`;
    fails at once if `process` has exited, with the end of `log`."""
    deadline = time.monotonic() + seconds
    while True:
        value = predicate()
        if value:
            return value
        if process is not None and process.poll() is not None:
            raise ProcessExited(f"{what}: the server exited ({process.returncode})", _tail(log))
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {seconds}s\n{_tail(log)}")
        time.sleep(0.05)


class ProcessExited(RuntimeError):
    def __init__(self, message, log_tail):
        super().__init__(f"{message}\n{log_tail}")
        self.log_tail = log_tail


def _tail(log, chars=4000):
    if log is None or not Path(log).exists():
        return ""
    return Path(log).read_text(errors="replace")[-chars:]


def postgres_ids():
    entry = pwd.getpwnam("postgres")
    return entry.pw_uid, entry.pw_gid


def give_to_postgres(path, mode=0o600):
    uid, gid = postgres_ids()
    os.chown(path, uid, gid)
    os.chmod(path, mode)
    return Path(path)


def traversable_dir(prefix):
    """A new directory (root's, mode 0711) that the postgres OS user can pass through but not
    list."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    d.chmod(0o711)
    return d


def postgres_dir(prefix="vetassist-kms-"):
    """A new directory of postgres's own (0700) inside a traversable one: where a wrapped key file
    lives, written by `wrap` and `rewrap` run as postgres. Remove it with `remove_tree(d.parent)`."""
    d = traversable_dir(prefix) / "keys"
    d.mkdir()
    return give_to_postgres(d, 0o700)


# What a postmaster started by a service manager has; the provider scripts need nothing else.
BASE_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/var/lib/postgresql", "LANG": "C.UTF-8"}


def argv_as_postgres(script, args, env):
    """The argv that runs `script ARGS` as the postgres OS user with exactly BASE_ENV and `env`."""
    return ["runuser", "-u", "postgres", "--", "env", "-i",
            *(f"{k}={v}" for k, v in {**BASE_ENV, **env}.items()), str(script), *map(str, args)]


def remove_tree(path):
    shutil.rmtree(path, ignore_errors=True)


def _spawn(argv, log, env=None):
    """Starts a server in its own process group (so that stopping it stops all of it), its
    output appended to `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, env=env,
                                cwd=Path(log).parent)


def _stop(process, seconds=30):
    """SIGTERM to the process group, SIGKILL if it lingers; returns once it has exited."""
    if process is None or process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(seconds)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        process.wait()


def _address_in_use(log_tail):
    return "address already in use" in log_tail.lower()


class _LocalServer:
    """A server process of this module's, in a directory of its own: `_setup()` starts it;
    leaving the `with` block (or a failed start) stops it and removes the directory."""

    def __init__(self, bin_dir):
        self.bin_dir = Path(bin_dir)
        self.process = None
        self.dir = None

    def __enter__(self):
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        _stop(self.process)
        if self.dir is not None:
            remove_tree(self.dir)

    def stop(self):
        """An outage: the server process ends; returns once its port refuses connections."""
        _stop(self.process)
        wait_for(lambda: port_is_closed(self.port), f"port {self.port} closed", seconds=30)

    @staticmethod
    def _on_free_ports(start):
        """Runs `start()` (pick free ports, start the server, wait for it to answer) again, up to
        five times, while the server loses a port to another process meanwhile."""
        for attempt in range(5):
            try:
                return start()
            except ProcessExited as e:
                if attempt == 4 or not _address_in_use(e.log_tail):
                    raise


class OpenBao(_LocalServer):
    """An OpenBao 2.7.2 server with a Transit engine at `transit/` and the key `key`.

    Why not `bao server -dev`: dev mode keeps everything in memory, so a stopped dev server
    comes back empty (no key, no tokens) and an outage could not end with the same state. This
    is a real server instead, with integrated (raft) storage in a temporary directory, initialized
    with one unseal key: `stop()` ends the process (connections are refused: a real outage, the
    same as a host down), `start()` runs it again on the same port and data, sealed, then unseals
    it unless `unseal=False` (a sealed server answers 503, the other outage a KMS has). No proxy
    sits in between: what the scripts meet is the server itself. Ports: the API's and raft's
    cluster port, both picked free; a start that loses a port to another process is retried on
    new ports (the first start only: a restart needs its port).

    `root_token` is the root token; `token_file` holds it (postgres's, 0600) for the scripts."""

    def __init__(self, bin_dir, key="vetassist-master"):
        super().__init__(bin_dir)
        self.key = key
        self.transit_ready = False

    # -- lifecycle -------------------------------------------------------------------------------
    def _setup(self):
        self.dir = traversable_dir("vetassist-openbao-")
        self.log = self.dir / "server.log"
        self._on_free_ports(self._start_on_new_ports)
        status, init = self.request("PUT", "sys/init", {"secret_shares": 1, "secret_threshold": 1})
        assert status == 200, (status, init)
        self.unseal_key = init["keys_base64"][0]
        self.root_token = init["root_token"]
        self.unseal()
        self.api("POST", "sys/mounts/transit", {"type": "transit"})
        self.create_key(self.key)
        self.transit_ready = True
        self.token_file = self.write_token_file(self.root_token, "root.token")

    def _start_on_new_ports(self):
        self.port = free_port()
        self.cluster_port = free_port()
        while self.cluster_port == self.port:
            self.cluster_port = free_port()
        data = self.dir / "data"
        remove_tree(data)
        data.mkdir(mode=0o700)
        self.config = self.dir / "server.hcl"
        self.config.write_text(f"""
storage "raft" {{
  path = "{data}"
  node_id = "vetassist-test"
  performance_multiplier = 1
}}
listener "tcp" {{
  address = "127.0.0.1:{self.port}"
  cluster_address = "127.0.0.1:{self.cluster_port}"
  tls_disable = true
}}
api_addr = "http://127.0.0.1:{self.port}"
cluster_addr = "http://127.0.0.1:{self.cluster_port}"
log_level = "info"
""")
        self._spawn_and_wait_answering()

    def _spawn_and_wait_answering(self):
        self.process = _spawn([self.bin_dir / "bao", "server", f"-config={self.config}"], self.log,
                              env=_server_env())
        wait_for(self._health, f"OpenBao on port {self.port} answers", process=self.process, log=self.log)

    def _health(self):
        """The HTTP status of /v1/sys/health (200 active, 503 sealed, 501 not initialized), or None
        while nothing answers; only an OpenBao answer counts."""
        try:
            status, body = self.request("GET", "sys/health", timeout=2)
        except (OSError, ValueError, http.client.HTTPException):
            return None
        return status if isinstance(body, dict) and "sealed" in body else None

    def unseal(self):
        """Unseals (after `start(unseal=False)`) and returns once Transit answers again."""
        status, body = self.request("PUT", "sys/unseal", {"key": self.unseal_key})
        assert status == 200, (status, body)
        wait_for(lambda: self._health() == 200, "OpenBao active after unseal", process=self.process, log=self.log)
        if self.transit_ready:
            # Active is not yet serving every mount: wait until the Transit key itself reads.
            wait_for(lambda: self.request("GET", f"transit/keys/{self.key}", token=self.root_token)[0] == 200,
                     "Transit answers after unseal", process=self.process, log=self.log)

    def start(self, unseal=True):
        """The outage ends: the same server (same port, same storage) runs again; sealed unless
        `unseal` (the default)."""
        assert self.process is None or self.process.poll() is not None, "OpenBao is running"
        self._spawn_and_wait_answering()
        if unseal:
            self.unseal()

    # -- HTTP ------------------------------------------------------------------------------------
    @property
    def addr(self):
        return f"http://127.0.0.1:{self.port}"

    def request(self, method, path, body=None, token=None, timeout=30):
        """(status, parsed JSON or {}) of one API call; connection errors raise."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.addr}/v1/{path}", data=data, method=method)
        if token:
            req.add_header("X-Vault-Token", token)
        try:
            with _http.open(req, timeout=timeout) as r:
                status, payload = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, payload = e.code, e.read()
        return status, (json.loads(payload) if payload.strip() else {})

    def api(self, method, path, body=None, token=None):
        """An API call as root (or `token`) that must succeed; returns its JSON."""
        status, answer = self.request(method, path, body, token or self.root_token)
        assert status in (200, 204), f"{method} {path}: HTTP {status} {answer}"
        return answer

    # -- Transit and tokens ----------------------------------------------------------------------
    def create_key(self, name=None):
        """A new Transit key (aes256-gcm96); returns its name."""
        name = name or f"k-{secrets.token_hex(4)}"
        self.api("POST", f"transit/keys/{name}", {})
        return name

    def rotate(self, key=None):
        """A new version of the Transit key; returns its number."""
        key = key or self.key
        self.api("POST", f"transit/keys/{key}/rotate", {})
        return self.api("GET", f"transit/keys/{key}")["data"]["latest_version"]

    def encrypt(self, plaintext: bytes, key=None):
        """Transit's ciphertext of any bytes (to make wrapped files the scripts must refuse)."""
        import base64
        return self.api("POST", f"transit/encrypt/{key or self.key}",
                        {"plaintext": base64.b64encode(plaintext).decode()})["data"]["ciphertext"]

    def create_limited_token(self, key=None):
        """A token whose only right is to decrypt with the Transit key (what the database host
        should hold)."""
        key = key or self.key
        policy = f"decrypt-{key}"
        self.api("PUT", f"sys/policies/acl/{policy}",
                 {"policy": f'path "transit/decrypt/{key}" {{ capabilities = ["update"] }}'})
        answer = self.api("POST", "auth/token/create", {"policies": [policy], "no_default_policy": True, "ttl": "1h"})
        return answer["auth"]["client_token"]

    def revoke(self, token):
        self.api("POST", "auth/token/revoke", {"token": token})

    def write_token_file(self, token, name=None):
        """A token file for the scripts (postgres's, 0600)."""
        path = self.dir / (name or f"{secrets.token_hex(4)}.token")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        return give_to_postgres(path)

    def env(self, token_file=None, key=None):
        """The environment of kms/openbao-transit for this server (add VETASSIST_WRAPPED_KEY_FILE)."""
        return {
            "VAULT_ADDR": self.addr,
            "VAULT_TOKEN_FILE": str(token_file or self.token_file),
            "VETASSIST_TRANSIT_MOUNT": "transit",
            "VETASSIST_TRANSIT_KEY": key or self.key,
        }


def _server_env():
    """A server's environment: no proxies, nothing of the caller's AWS or Vault settings."""
    return {k: v for k, v in os.environ.items()
            if not k.lower().endswith("_proxy") and not k.startswith(("AWS_", "VAULT_", "BAO_"))}


class MotoKms(_LocalServer):
    """moto's AWS KMS (moto[server] 5.2.5) on a free port, with one symmetric key (`key_arn`),
    made and managed through the aws CLI, not boto3. State lives in the process: `stop()` is
    an outage with no way back (a test that stops it uses its own instance).

    moto decrypts and encrypts with a disabled key, which AWS refuses (DisabledException), so
    the server is moto's own `moto.server.main` run by this file with that check added
    (`_moto_server`)."""

    REGION = "us-east-1"

    def _setup(self):
        self.dir = traversable_dir("vetassist-moto-")
        self.log = self.dir / "server.log"
        self._on_free_ports(self._start_on_a_new_port)
        self.key_arn = self.create_key()

    def _start_on_a_new_port(self):
        self.port = free_port()
        self.process = _spawn([self.bin_dir / "python", Path(__file__).resolve(), "moto-server", self.port],
                              self.log, env=_server_env())
        wait_for(self._answers, f"moto on port {self.port} answers", process=self.process, log=self.log)

    def _answers(self):
        try:
            with _http.open(f"{self.endpoint}/moto-api/data.json", timeout=2) as r:
                return r.status == 200 and b"kms" in r.read()
        except (OSError, ValueError, http.client.HTTPException):
            return False

    @property
    def endpoint(self):
        return f"http://127.0.0.1:{self.port}"

    def aws_env(self):
        """What the aws CLI needs to talk to this moto, and nothing from ~/.aws or the host's
        instance metadata (which is not on loopback)."""
        return {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": self.REGION,
            "AWS_REGION": self.REGION,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": "/dev/null",
            "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        }

    def aws(self, *args):
        """`aws kms ARGS` (text output) against this moto; returns its stdout."""
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.dir), **self.aws_env()}
        done = subprocess.run([str(self.bin_dir / "aws"), "--output", "text", "kms", *map(str, args)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"aws kms {' '.join(map(str, args))}: exit {done.returncode}: {done.stderr.strip()}")
        return done.stdout.strip()

    def create_key(self):
        """A new symmetric key; returns its ARN."""
        return self.aws("create-key", "--description", "vetassist test", "--query", "KeyMetadata.Arn")

    def disable_key(self, key=None):
        """AWS takes an ARN here; moto only the key's id (the ARN's end)."""
        self.aws("disable-key", "--key-id", (key or self.key_arn).rsplit("/", 1)[-1])

    def enable_key(self, key=None):
        self.aws("enable-key", "--key-id", (key or self.key_arn).rsplit("/", 1)[-1])

    def env(self, key=None):
        """The environment of kms/aws-kms for this server (add VETASSIST_WRAPPED_KEY_FILE)."""
        return {**self.aws_env(), "VETASSIST_KMS_KEY_ID": key or self.key_arn,
                "VETASSIST_AWS_CLI": str(self.bin_dir / "aws")}



class StalledServer:
    """A TCP server that accepts connections and never answers (a KMS that hangs): `address`,
    `connected` (an Event set at the first connection)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.connected = threading.Event()
        self.conns = []
        self.closed = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def address(self):
        return f"http://127.0.0.1:{self.port}"

    def _accept(self):
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            self.connected.set()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.closed = True
        # shutdown wakes the accept() in the thread; close alone may not.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        for c in self.conns:
            c.close()
        self.thread.join(10)


def command_lines():
    """Every process's command line now (to check that no secret is on one)."""
    lines = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                lines.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                pass
    return lines


# -- the moto server, run by MotoKms with the KMS venv's python --------------------------------------
def _moto_server(port):
    """moto's server with AWS's key-state checks: a disabled key (DisabledException) or one pending
    deletion (KMSInvalidStateException) encrypts and decrypts nothing. ReEncrypt goes through both."""
    from moto.core.exceptions import JsonRESTError
    from moto.kms.models import KmsBackend
    from moto.server import main

    def check_state(backend, any_id):
        key = backend.keys[backend.any_id_to_key_id(any_id)]
        if key.key_state == "Disabled":
            raise JsonRESTError("DisabledException", f"{key.arn} is disabled.")
        if key.key_state != "Enabled":
            raise JsonRESTError("KMSInvalidStateException", f"{key.arn} is {key.key_state}.")

    encrypt, decrypt = KmsBackend.encrypt, KmsBackend.decrypt

    def checked_encrypt(self, key_id, plaintext, encryption_context):
        check_state(self, key_id)
        return encrypt(self, key_id, plaintext, encryption_context)

    def checked_decrypt(self, ciphertext_blob, encryption_context, key_id=None):
        plaintext, arn = decrypt(self, ciphertext_blob, encryption_context, key_id)
        check_state(self, arn)
        return plaintext, arn

    KmsBackend.encrypt, KmsBackend.decrypt = checked_encrypt, checked_decrypt
    main(["-H", "127.0.0.1", "-p", str(port)])


if __name__ == "__main__":
    del sys.path[0]  # tests/ is no package of moto's
    if len(sys.argv) == 3 and sys.argv[1] == "moto-server":
        _moto_server(int(sys.argv[2]))
    else:
        sys.exit("usage: python tests/kms_servers.py moto-server PORT  (with scripts/ensure-kms.sh's python)")
