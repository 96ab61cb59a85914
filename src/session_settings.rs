//! Sessions (docs/ARCHITECTURE.md, "Sessions and time"): the settings of `sql/sessions.sql` as
//! SQL values. The lifecycle itself is SQL; `sweeper.rs` sweeps what expired.

use crate::gucs;
use pgrx::prelude::*;

fn seconds(setting: &pgrx::GucSetting<i32>) -> Interval {
    Interval::from_seconds(f64::from(setting.get()))
}

// Settings as SQL values, for the session functions. Internal: not granted to any role.

#[pg_extern(stable, parallel_safe)]
fn session_idle_timeout() -> Interval {
    seconds(&gucs::SESSION_IDLE_TIMEOUT)
}

#[pg_extern(stable, parallel_safe)]
fn session_absolute_timeout() -> Interval {
    seconds(&gucs::SESSION_ABSOLUTE_TIMEOUT)
}

#[pg_extern(stable, parallel_safe)]
fn session_idle_warning() -> Interval {
    seconds(&gucs::SESSION_IDLE_WARNING)
}

#[pg_extern(stable, parallel_safe)]
fn session_touch_interval() -> Interval {
    seconds(&gucs::SESSION_TOUCH_INTERVAL)
}

#[pg_extern(stable, parallel_safe)]
fn session_retention() -> Interval {
    seconds(&gucs::SESSION_RETENTION)
}

#[pg_extern(stable, parallel_safe)]
fn refresh_reuse_grace() -> Interval {
    seconds(&gucs::REFRESH_REUSE_GRACE)
}

#[pg_extern(stable, parallel_safe)]
fn max_sessions_per_user() -> i32 {
    gucs::MAX_SESSIONS_PER_USER.get()
}
