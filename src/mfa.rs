//! MFA building blocks for `sql/mfa.sql`: TOTP secrets, codes and backup codes. The TOTP
//! secret only ever leaves the database inside the enrolment URI.

use crate::crypto::{self, totp};
use crate::error::{Failure, Kind, OrRaise};
use crate::gucs;
use crate::pg;
use pgrx::prelude::*;

/// A fresh 160-bit TOTP secret from the OS RNG. Internal.
#[pg_extern(volatile)]
fn totp_new_secret() -> Vec<u8> {
    let mut secret = vec![0u8; totp::SECRET_LEN];
    crypto::fill_random(&mut secret).or_raise();
    secret
}

/// The enrolment URI for an authenticator app; STABLE, as it reads the issuer setting. Internal.
#[pg_extern(stable, strict)]
fn totp_uri(secret: &[u8], account: &str) -> String {
    let issuer =
        gucs::string_setting(&gucs::MFA_ISSUER).map_or("VetAssist".into(), |s| s.to_string_lossy());
    totp::otpauth_uri(secret, &issuer, account)
}

/// The time step whose code matches (within one step of the Unix time `at_epoch`) and is
/// later than `last_used_step`, or NULL. Internal.
#[pg_extern(immutable)]
fn totp_match(
    secret: &[u8],
    code: &str,
    at_epoch: i64,
    last_used_step: Option<i64>,
) -> Option<i64> {
    let code: String = code.chars().filter(|c| !c.is_whitespace()).collect();
    let now = totp::step_at(at_epoch.max(0) as u64);
    totp::matching_step(secret, &code, now, last_used_step.map(|s| s.max(0) as u64))
        .map(|s| s as i64)
}

/// The code of one time step, for tests and for the demo's stand-in authenticator. Internal.
#[pg_extern(immutable, strict)]
fn totp_code(secret: &[u8], step: i64) -> String {
    totp::code_text(secret, step.max(0) as u64)
}

/// Unambiguous letters and digits (no 0/O, 1/I/L) for backup codes people type.
const BACKUP_ALPHABET: &[u8; 31] = b"ABCDEFGHJKMNPQRSTUVWXYZ23456789";

/// A backup code such as `K7QX-2MPA-9TRW`: 12 characters, about 59 bits from the OS RNG. Internal.
#[pg_extern(volatile)]
fn mfa_new_backup_code() -> String {
    let alphabet = BACKUP_ALPHABET;
    let mut out = String::with_capacity(14);
    let mut random = [0u8; 24];
    let mut filled = 0;
    while out.len() < 14 {
        if filled == 0 {
            crypto::fill_random(&mut random).or_raise();
            filled = random.len();
        }
        filled -= 1;
        // Rejection sampling keeps every character equally likely.
        let byte = random[filled] & 0x1f;
        if usize::from(byte) >= alphabet.len() {
            continue;
        }
        if out.len() == 4 || out.len() == 9 {
            out.push('-');
        }
        out.push(alphabet[usize::from(byte)] as char);
    }
    out
}

/// MFA settings as SQL values. Internal.
#[pg_extern(stable, parallel_safe)]
fn mfa_max_failures() -> i32 {
    gucs::MFA_MAX_FAILURES.get()
}

#[pg_extern(stable, parallel_safe)]
fn mfa_lockout() -> Interval {
    Interval::from_seconds(f64::from(gucs::MFA_LOCKOUT.get()))
}

/// Backup codes as typed: case and separators do not matter.
#[pg_extern(immutable, strict)]
fn mfa_normalize_backup_code(code: &str) -> String {
    let normalized: String = code
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect::<String>()
        .to_ascii_uppercase();
    if normalized.len() != 12 {
        // Not a backup code at all; the caller counts it as a failed attempt.
        return String::new();
    }
    normalized
}

/// When each MFA attempt of a user at or after `since` was recorded, oldest first, read on a
/// snapshot taken now: the lock-out counts attempts recorded by the audit recorder after the
/// caller's snapshot (a REPEATABLE READ caller would not see them). Failures written by 0.1.2,
/// before attempts were recorded, count as attempts. Internal.
#[pg_extern(strict, volatile)]
fn mfa_failure_times(
    user_id: pgrx::Uuid,
    since: TimestampWithTimeZone,
) -> Vec<TimestampWithTimeZone> {
    let since = pg_sys::TimestampTz::from(since);
    let since = if since == i64::MIN {
        "'-infinity'::timestamptz".to_owned()
    } else {
        // Microseconds after the Postgres epoch: exact, and independent of DateStyle and TimeZone.
        format!("'2000-01-01 00:00:00+00'::timestamptz + {since} * interval '1 microsecond'")
    };
    let sql = format!(
        "SELECT a.occurred_at FROM vetassist_auth.audit_log a \
         WHERE a.subject_user_id = '{user_id}'::uuid AND a.occurred_at >= {since} \
           AND a.category = 'mfa' \
           AND (a.event_type = 'mfa_attempt' \
                OR (a.outcome = 'failure' AND NOT pg_catalog.jsonb_exists(a.details, 'counted_as'))) \
         ORDER BY a.occurred_at"
    );
    pg::latest_rows(&sql, |row| {
        row.get::<TimestampWithTimeZone>(1).ok_or_else(|| {
            Failure::new(
                Kind::NotConfigured,
                "vetassist_auth: audit row without a time",
            )
        })
    })
    .or_raise()
}

/// The durable `mfa_locked_out` row naming a session, if any; the partial index
/// audit_log_mfa_lockouts answers it with one probe.
static LOCKED_SESSION: pg::SavedQuery = pg::SavedQuery::new(
    c"SELECT 1 FROM vetassist_auth.audit_log a \
       WHERE a.category = 'mfa' AND a.event_type = 'mfa_locked_out' \
         AND a.target_table = 'sessions' AND a.target_id = $2 AND a.subject_user_id = $1 LIMIT 1",
    &[pg_sys::UUIDOID, pg_sys::TEXTOID],
);

/// Whether an MFA lock-out was caused in this session, read on a snapshot taken now. The
/// session's LOCKED status is written in the caller's transaction, which may roll back; the
/// lock-out row cannot (docs/ARCHITECTURE.md, "Records that survive a rollback"). Internal.
#[pg_extern(strict, volatile)]
fn mfa_locked_session(user_id: pgrx::Uuid, session_id: pgrx::Uuid) -> bool {
    let args = [
        user_id.into_datum().expect("a uuid datum"),
        session_id.to_string().into_datum().expect("a text datum"),
    ];
    !LOCKED_SESSION
        .latest_rows(&args, |_| Ok(()))
        .or_raise()
        .is_empty()
}
