//! Running `vetassist_auth.master_key_command` (docs/ARCHITECTURE.md, "The master key from a
//! command"): `/bin/sh -c <command>` with a deadline, stdout read and parsed, stderr read and
//! thrown away, nothing of either ever logged. Plain std and libc: the postmaster calls it from a
//! setting's assign hook, where nothing may raise an ERROR.

use crate::crypto::{self, SecretKey};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// More than a key and two labels: the command printed something else.
const STDOUT_LIMIT: usize = 4096;
/// Longest KMS key id or version kept (they go into audit rows and the log).
pub const LABEL_LIMIT: usize = 120;
/// The exit status (sysexits' EX_TEMPFAIL) by which a command says the KMS could not be reached:
/// the key already loaded stays in force.
pub const TEMPORARY_FAILURE: i32 = 75;

/// What a run of the command gave.
pub enum Outcome {
    Key {
        key: SecretKey,
        kms_key_id: Option<String>,
        kms_key_version: Option<String>,
    },
    /// The KMS could not be reached (exit status 75, or the deadline passed): keep the old key.
    Unreachable(Why),
    /// The command failed otherwise, or printed something that is not a key: withdraw the key.
    Refused(Why),
}

/// Why a run gave no key; shown in the log, in 55000 hints and by verify_installation. Nothing
/// the command printed is in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    TimedOut(u32),
    Status(i32),
    Signal(i32),
    Malformed,
    CannotStart,
    /// A shutdown was asked for while it ran: it was killed so the server can stop at once.
    Stopped,
}

impl Why {
    /// (kind, value) for shared memory.
    pub fn encode(self) -> (u8, i32) {
        match self {
            Why::TimedOut(s) => (1, s as i32),
            Why::Status(s) => (2, s),
            Why::Signal(s) => (3, s),
            Why::Malformed => (4, 0),
            Why::CannotStart => (5, 0),
            Why::Stopped => (6, 0),
        }
    }

    pub fn decode(kind: u8, value: i32) -> Option<Why> {
        Some(match kind {
            1 => Why::TimedOut(value as u32),
            2 => Why::Status(value),
            3 => Why::Signal(value),
            4 => Why::Malformed,
            5 => Why::CannotStart,
            6 => Why::Stopped,
            _ => return None,
        })
    }
}

impl std::fmt::Display for Why {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Why::TimedOut(s) => write!(f, "did not finish within {s} s"),
            Why::Status(TEMPORARY_FAILURE) => {
                write!(f, "exited with status 75 (the KMS could not be reached)")
            }
            Why::Status(s) => write!(f, "exited with status {s}"),
            Why::Signal(s) => write!(f, "was killed by signal {s}"),
            Why::Malformed => write!(
                f,
                "printed no valid key (64 hex characters on the first line)"
            ),
            Why::CannotStart => write!(f, "could not be started"),
            Why::Stopped => write!(f, "was stopped for a server shutdown"),
        }
    }
}

/// Runs `command` under `/bin/sh` and waits at most `timeout` for it (and for anything it started
/// that keeps its output open: the whole process group is killed at the deadline). A shutdown
/// asked for meanwhile ends the wait at once: the postmaster runs this, and a KMS that hangs must
/// not hold off `pg_ctl stop`.
pub fn run(command: &str, timeout: Duration) -> Outcome {
    // The shutdown signals wait while the command runs (on 15 the postmaster blocks them already),
    // so the postmaster's handler runs after the command is gone; the wait looks for them pending.
    let shutdown = ShutdownSignals::block();
    let outcome = run_watching(command, timeout, &shutdown);
    drop(shutdown);
    outcome
}

/// SIGTERM, SIGINT and SIGQUIT: a smart, fast and immediate shutdown.
const SHUTDOWN: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGQUIT];

/// The shutdown signals blocked until dropped.
struct ShutdownSignals {
    before: libc::sigset_t,
}

impl ShutdownSignals {
    fn block() -> ShutdownSignals {
        // SAFETY: sigset_t is plain data, initialised by sigemptyset before use; the mask is
        // this thread's (the postmaster has one).
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            let mut before: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for signal in SHUTDOWN {
                libc::sigaddset(&mut set, signal);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut before);
            ShutdownSignals { before }
        }
    }

    fn pending(&self) -> bool {
        // SAFETY: reads this process's pending signals into a zeroed set.
        unsafe {
            let mut pending: libc::sigset_t = std::mem::zeroed();
            libc::sigpending(&mut pending);
            SHUTDOWN
                .iter()
                .any(|&signal| libc::sigismember(&pending, signal) == 1)
        }
    }
}

impl Drop for ShutdownSignals {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved by block(); a signal that came meanwhile is delivered
        // now, to the postmaster's own handler.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.before, std::ptr::null_mut()) };
    }
}

/// How long one wait lasts before the shutdown signals are looked at again.
const SLICE: Duration = Duration::from_millis(50);

fn run_watching(command: &str, timeout: Duration, shutdown: &ShutdownSignals) -> Outcome {
    let seconds = timeout.as_secs().max(1) as u32;
    let mut shell = Command::new("/bin/sh");
    shell
        .arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    // SAFETY: runs in the child between fork and exec and only makes system calls, which is
    // async-signal-safe. The postmaster's sockets and pipes (the listen sockets, the
    // postmaster-alive pipe) must not outlive it in a command or in a daemon the command starts;
    // close-on-exec rather than close keeps std's own exec-error pipe working.
    unsafe {
        shell.pre_exec(|| {
            mark_close_on_exec_from(3);
            default_signal_dispositions();
            Ok(())
        });
    }
    let Ok(mut child) = shell.spawn() else {
        return Outcome::Refused(Why::CannotStart);
    };
    let deadline = Instant::now() + timeout;
    let output = read_until(&mut child, deadline, shutdown);
    let status =
        output.and_then(|stdout| wait_until(&mut child, deadline, shutdown).map(|s| (stdout, s)));
    let Ok((mut stdout, status)) = status else {
        // SAFETY: the child leads its own process group (process_group(0)); the group is ours.
        unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
        let _ = child.wait();
        let why = match status.err() {
            Some(Why::TimedOut(_)) | None => Why::TimedOut(seconds),
            Some(why) => why,
        };
        return Outcome::Unreachable(why);
    };
    let outcome = match (status.code(), status.signal()) {
        (Some(0), _) => match parse(&stdout) {
            Some((key, kms_key_id, kms_key_version)) => Outcome::Key {
                key,
                kms_key_id,
                kms_key_version,
            },
            None => Outcome::Refused(Why::Malformed),
        },
        (Some(TEMPORARY_FAILURE), _) => Outcome::Unreachable(Why::Status(TEMPORARY_FAILURE)),
        (Some(code), _) => Outcome::Refused(Why::Status(code)),
        (None, Some(signal)) => Outcome::Refused(Why::Signal(signal)),
        (None, None) => Outcome::Refused(Why::CannotStart),
    };
    crypto::wipe(&mut stdout);
    outcome
}

/// Every signal back to its default action: the postmaster ignores some (SIGALRM among them),
/// and a child inherits ignored signals.
fn default_signal_dispositions() {
    for signal in 1..libc::SIGRTMAX() {
        if signal != libc::SIGKILL && signal != libc::SIGSTOP {
            // SAFETY: signal(2) is async-signal-safe; an invalid number only returns an error.
            unsafe { libc::signal(signal, libc::SIG_DFL) };
        }
    }
}

fn mark_close_on_exec_from(first: u32) {
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    // SAFETY: close_range(2) with the CLOEXEC flag only sets a flag on this process's
    // descriptors; on a kernel without it the loop below does the same one descriptor at a time.
    unsafe {
        if libc::syscall(libc::SYS_close_range, first, u32::MAX, CLOSE_RANGE_CLOEXEC) == 0 {
            return;
        }
        let max = libc::sysconf(libc::_SC_OPEN_MAX).clamp(first as libc::c_long, 65536);
        for fd in first as libc::c_int..max as libc::c_int {
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
    }
}

/// Reads stdout (up to STDOUT_LIMIT bytes; the rest is dropped and makes the output malformed)
/// and drains stderr until both close; Err at the deadline or at a shutdown.
fn read_until(
    child: &mut Child,
    deadline: Instant,
    shutdown: &ShutdownSignals,
) -> std::result::Result<Vec<u8>, Why> {
    let (Some(mut stdout), Some(mut stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(Why::CannotStart);
    };
    let mut kept = Vec::new();
    let mut overflow = false;
    let mut open = [true, true];
    let mut buffer = [0u8; 1024];
    while open[0] || open[1] {
        if shutdown.pending() {
            return Err(Why::Stopped);
        }
        let left = deadline
            .checked_duration_since(Instant::now())
            .ok_or(Why::TimedOut(0))?
            .min(SLICE);
        let mut fds = [
            libc::pollfd {
                fd: if open[0] { stdout.as_raw_fd() } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: if open[1] { stderr.as_raw_fd() } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let millis = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: two valid pollfd entries; a negative fd is ignored by poll(2).
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, millis) };
        if ready < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Why::CannotStart);
        }
        for (i, fd) in fds.iter().enumerate() {
            if !open[i] || fd.revents == 0 {
                continue;
            }
            let read = if i == 0 {
                stdout.read(&mut buffer)
            } else {
                stderr.read(&mut buffer)
            };
            match read {
                Ok(0) | Err(_) => open[i] = false,
                Ok(n) if i == 0 => {
                    if kept.len() + n <= STDOUT_LIMIT {
                        kept.extend_from_slice(&buffer[..n]);
                    } else {
                        overflow = true;
                    }
                }
                Ok(_) => {} // stderr is never kept
            }
        }
    }
    crypto::wipe(&mut buffer);
    if overflow {
        crypto::wipe(&mut kept);
        return Ok(Vec::new());
    }
    Ok(kept)
}

fn wait_until(
    child: &mut Child,
    deadline: Instant,
    shutdown: &ShutdownSignals,
) -> std::result::Result<std::process::ExitStatus, Why> {
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Ok(status);
        }
        if shutdown.pending() {
            return Err(Why::Stopped);
        }
        // Its output is closed, so it is about to exit; a short poll keeps this simple.
        deadline
            .checked_duration_since(Instant::now())
            .ok_or(Why::TimedOut(0))?;
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The key on the first line, then optional `kms_key_id=` and `kms_key_version=` lines.
fn parse(stdout: &[u8]) -> Option<(SecretKey, Option<String>, Option<String>)> {
    let text = std::str::from_utf8(stdout).ok()?;
    let mut lines = text.lines().filter(|line| !line.trim().is_empty());
    let key = crypto::parse_master_key_hex(lines.next()?).ok()?;
    let (mut id, mut version) = (None, None);
    for line in lines {
        let (name, value) = line.trim().split_once('=')?;
        let printable = value.bytes().all(|b| b.is_ascii_graphic());
        if value.is_empty() || value.len() > LABEL_LIMIT || !printable {
            return None;
        }
        let slot = match name {
            "kms_key_id" => &mut id,
            "kms_key_version" => &mut version,
            _ => return None,
        };
        if slot.replace(value.to_owned()).is_some() {
            return None;
        }
    }
    Some((key, id, version))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    fn run_for(command: &str, seconds: u64) -> Outcome {
        run(command, Duration::from_secs(seconds))
    }

    #[test]
    fn a_key_and_its_labels() {
        match run_for(
            &format!("printf '{HEX}\\nkms_key_id=transit/vetassist\\nkms_key_version=2\\n'"),
            5,
        ) {
            Outcome::Key {
                key,
                kms_key_id,
                kms_key_version,
            } => {
                assert_eq!(key.0[31], 0x1f);
                assert_eq!(kms_key_id.as_deref(), Some("transit/vetassist"));
                assert_eq!(kms_key_version.as_deref(), Some("2"));
            }
            _ => panic!("expected a key"),
        }
    }

    #[test]
    fn stderr_is_drained_and_ignored() {
        // More than a pipe holds, so a command that is not drained would block.
        let command = format!("head -c 200000 /dev/zero >&2; echo {HEX}");
        assert!(matches!(run_for(&command, 5), Outcome::Key { .. }));
    }

    #[test]
    fn anything_but_a_key_is_refused() {
        for command in [
            "true".to_owned(),
            "echo nothex".to_owned(),
            format!("echo {HEX}; echo other=1"),
            format!("echo {HEX}; echo kms_key_id=a; echo kms_key_id=b"),
            format!("echo {HEX}; echo 'kms_key_id=has space'"),
            format!("echo {HEX}{HEX}"),
            format!("yes {HEX} | head -c 10000"),
        ] {
            assert!(
                matches!(run_for(&command, 5), Outcome::Refused(Why::Malformed)),
                "{command}"
            );
        }
    }

    #[test]
    fn exit_statuses() {
        assert!(matches!(
            run_for(&format!("echo {HEX}; exit 77"), 5),
            Outcome::Refused(Why::Status(77))
        ));
        assert!(matches!(
            run_for("exit 75", 5),
            Outcome::Unreachable(Why::Status(75))
        ));
        assert!(matches!(
            run_for("kill -9 $$", 5),
            Outcome::Refused(Why::Signal(9))
        ));
    }

    #[test]
    fn the_deadline_kills_the_command_and_what_it_started() {
        let started = Instant::now();
        // The background sleep keeps stdout open after the shell would have exited.
        let outcome = run_for("sleep 30 & echo started; sleep 30", 1);
        assert!(matches!(outcome, Outcome::Unreachable(Why::TimedOut(1))));
        assert!(started.elapsed() < Duration::from_secs(20));
    }

    #[test]
    fn the_command_inherits_no_descriptor_beyond_its_stdio() {
        let file = std::fs::File::open("/dev/null").unwrap();
        // SAFETY: dup of an open descriptor; dup clears close-on-exec, as the postmaster's are.
        let fd = unsafe { libc::dup(file.as_raw_fd()) };
        assert!(fd > 2);
        let command = format!("if [ -e /proc/self/fd/{fd} ]; then exit 3; fi; echo {HEX}");
        let outcome = run_for(&command, 5);
        // SAFETY: the descriptor dup'ed above.
        unsafe { libc::close(fd) };
        assert!(matches!(outcome, Outcome::Key { .. }));
    }
}
