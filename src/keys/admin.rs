//! Administration functions, granted to `vetassist_admin`: rotation, re-wrapping under a new
//! master key, retirement and destruction of old keys.

use super::*;

#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn rotate_key(purpose: &str) -> i32 {
    let purpose = Purpose::parse(purpose).or_raise();
    rotate(purpose, None).or_raise().unwrap_or_default() as i32
}

/// Makes a new active key of `purpose` and turns the old one decrypt_only; with `only_if`, only
/// while that key is still the active one (None otherwise). Returns the new key's id.
fn rotate(purpose: Purpose, only_if: Option<u32>) -> Result<Option<u32>> {
    crate::replica::require_primary();
    // Before any row lock on the keys table, so that a waiting rewrap_keys (which holds the
    // wrapping lock and then updates rows) and this never wait for each other.
    lock_key_wrapping(pg_sys::ShareLock);
    refresh()?;
    kek()?;
    // The retiring key's final count comes from the counter before the new key takes it over.
    lock_purpose(purpose);
    let retiring = load_active_key(purpose)?;
    if let Some(expected) = only_if {
        if retiring.as_ref().map(|key| key.id) != Some(expected) {
            return Ok(None);
        }
    }
    if let Some(key) = retiring {
        let position = Spi::connect(|client| counter_position(client, purpose))?;
        Spi::run_with_args(
            "UPDATE vetassist_auth.keys \
             SET status = 'decrypt_only', encrypt_count = greatest(encrypt_count, $2) \
             WHERE key_id = $1 AND status = 'active'",
            &[
                (key.id as i32).into(),
                encryptions_counted(position, key.counter_base).into(),
            ],
        )
        .map_err(spi_failure)?;
    }
    // create_active_key tells every backend, this one included, to drop its cached keys.
    create_active_key(purpose)?;
    let key = load_active_key(purpose)?.expect("the key was just created");
    Ok(Some(key.id))
}

/// Rotates a key that reached the warning mark of its encryption budget, unless it has been
/// rotated already; audited. The recorder runs it (in a transaction of its own), so reaching the
/// mark never turns into every writer being refused at the limit.
pub fn rotate_worn_key(purpose: Purpose, key_id: u32) -> Result<()> {
    if let Some(new_key) = rotate(purpose, Some(key_id))? {
        let details = format!(
            r#"{{"purpose": "{}", "retired_from_writing": {key_id}, "new_key": {new_key}, "reason": "encryption count reached {ENCRYPT_WARN_AT}"}}"#,
            purpose.as_str()
        );
        Spi::run_with_args(
            "SELECT vetassist_auth.write_audit('key', 'key_rotated_automatically', 'success', \
             NULL, 'keys', $1, $2::jsonb)",
            &[key_id.to_string().into(), details.into()],
        )
        .map_err(spi_failure)?;
    }
    Ok(())
}

/// Re-wraps every data key under the current master key after the master key was changed, from
/// the old key's file given here or from the previous master key source in force (a file or a
/// command). Keys already wrapped under the current master key are left alone, so a rerun is
/// harmless. Audited, with the key checks of both keys.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn rewrap_keys(old_master_key_file: default!(Option<&str>, "NULL")) -> i32 {
    let previous = previous_source().or_raise();
    let (old_setting, old_key) = match (old_master_key_file, &previous) {
        (Some(path), _) => ("the file given", read_server_key_file(path)),
        (None, Some(source @ PreviousSource::File(path))) => {
            (source.setting(), read_server_key_file(path))
        }
        (None, Some(source)) => (source.setting(), load_previous_key(source)),
        (None, None) => Failure::new(
            Kind::InvalidArgument,
            "vetassist_auth: no previous master key is given or set",
        )
        .with_hint("Pass the old key's file, or set vetassist_auth.previous_master_key_file or vetassist_auth.previous_master_key_command and reload.")
        .raise(),
    };
    let old_key = old_key.or_raise();
    let old_kek = crypto::derive_kek(&old_key);
    // Waits for every transaction that created a key (it may have wrapped it under the old
    // master key) and keeps new ones out until this one ends; the rows are then read on a fresh
    // snapshot, so none of those keys is missed.
    lock_key_wrapping(pg_sys::ExclusiveLock);
    refresh_master().or_raise();
    let new_kek = kek().or_raise();
    let rows = latest_rows(
        "SELECT key_id, purpose, wrapped_key FROM vetassist_auth.keys WHERE wrapped_key IS NOT NULL ORDER BY key_id",
        |row| {
            Ok((
                row.get::<i32>(1).unwrap_or_default(),
                row.get::<String>(2).unwrap_or_default(),
                row.get::<Vec<u8>>(3).unwrap_or_default(),
            ))
        },
    )
    .or_raise();
    let mut rewrapped = 0;
    for (id, purpose, wrapped) in rows {
        if crypto::unwrap_dek(&new_kek, id as u32, &purpose, &wrapped).is_ok() {
            continue;
        }
        let dek = crypto::unwrap_dek(&old_kek, id as u32, &purpose, &wrapped)
            .map_err(|_| {
                Failure::new(
                    Kind::DataCorrupted,
                    format!("vetassist_auth: data key {id} opens with neither master key"),
                )
                .with_hint(
                    "Pass the file of the master key that wrapped the keys before the change.",
                )
            })
            .or_raise();
        let new_wrapped = crypto::wrap_dek(&new_kek, id as u32, &purpose, &dek).or_raise();
        let updated = Spi::get_one_with_args::<i64>(
            "WITH k AS (UPDATE vetassist_auth.keys SET wrapped_key = $2 \
                        WHERE key_id = $1 AND wrapped_key IS NOT NULL RETURNING 1) \
             SELECT pg_catalog.count(*) FROM k",
            &[id.into(), new_wrapped.into()],
        )
        .map_err(spi_failure)
        .or_raise()
        .unwrap_or_default();
        // SAFETY: reads this backend's isolation level.
        if updated == 0 && unsafe { pg_sys::XactIsoLevel } >= pg_sys::XACT_REPEATABLE_READ as i32 {
            // A key created after this transaction's snapshot: its row cannot be updated here.
            Failure::new(
                Kind::NotConfigured,
                "vetassist_auth: a data key newer than this transaction's snapshot was not rewrapped",
            )
            .with_hint("Run rewrap_keys() again in a READ COMMITTED transaction of its own.")
            .raise();
        }
        rewrapped += updated as i32;
    }
    invalidate_all_backends();
    let source = master_source().or_raise();
    let details = format!(
        r#"{{"rewrapped": {rewrapped}, "from": "{old_setting}", "from_key_check": "{}", "to": "{}", "to_key_check": "{}"}}"#,
        hex::encode(crypto::key_check(&old_key)),
        source.setting(),
        hex::encode(crypto::key_check(&load_master_key(&source).or_raise())),
    );
    Spi::run_with_args(
        "SELECT vetassist_auth.write_audit('key', 'keys_rewrapped', 'success', NULL, 'keys', NULL, $1::jsonb)",
        &[details.into()],
    )
    .map_err(spi_failure)
    .or_raise();
    rewrapped
}

/// A master key file read for the caller: only with the privileges of pg_read_server_files.
fn read_server_key_file(path: &str) -> Result<SecretKey> {
    let allowed = Spi::get_one::<bool>(
        "SELECT pg_catalog.pg_has_role(session_user, 'pg_read_server_files', 'USAGE')",
    )
    .ok()
    .flatten()
    .unwrap_or(false);
    if !allowed {
        return Err(Failure::new(
            Kind::InsufficientPrivilege,
            "vetassist_auth: rewrap_keys reads a server file",
        )
        .with_hint("The session user needs the privileges of pg_read_server_files."));
    }
    read_master_key_file(path)
}

/// For verify_installation: whether a master key is in force, and which setting it comes from
/// (with the time of its load and the KMS key for a command). Internal.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn master_key_source() -> TableIterator<'static, (name!(ok, bool), name!(detail, String))> {
    TableIterator::once(describe_sources())
}

/// For verify_installation: NULL when every data key with material opens under the current
/// master key; otherwise how many need the previous one (so it must not be removed yet) or open
/// under neither. Read on a fresh snapshot, after re-checking the master key source. Internal.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn key_wrapping_problem() -> Option<String> {
    if let Err(failure) = refresh_master() {
        return Some(failure.message);
    }
    let (Ok(current), previous) = (
        kek(),
        KEY_CACHE.with_borrow(|cache| cache.previous_kek.clone()),
    ) else {
        return Some("vetassist_auth: no master key is configured".to_owned());
    };
    let rows = latest_rows(
        "SELECT key_id, purpose, wrapped_key FROM vetassist_auth.keys WHERE wrapped_key IS NOT NULL",
        |row| {
            Ok((
                row.get::<i32>(1).unwrap_or_default() as u32,
                row.get::<String>(2).unwrap_or_default(),
                row.get::<Vec<u8>>(3).unwrap_or_default(),
            ))
        },
    );
    let rows = match rows {
        Ok(rows) => rows,
        Err(failure) => return Some(failure.message),
    };
    let (mut need_previous, mut neither) = (0, 0);
    for (id, purpose, wrapped) in rows {
        if crypto::unwrap_dek(&current, id, &purpose, &wrapped).is_ok() {
            continue;
        }
        match &previous {
            Some(previous) if crypto::unwrap_dek(previous, id, &purpose, &wrapped).is_ok() => {
                need_previous += 1;
            }
            _ => neither += 1,
        }
    }
    let mut problems = Vec::new();
    if need_previous > 0 {
        let setting = previous_source()
            .ok()
            .flatten()
            .map(|p| p.setting())
            .unwrap_or("the previous master key setting");
        problems.push(format!("{need_previous} data key(s) open only under the previous master key ({setting}): run rewrap_keys() before removing it"));
    }
    if neither > 0 {
        problems.push(format!(
            "{neither} data key(s) open under neither master key"
        ));
    }
    (!problems.is_empty()).then(|| problems.join("; "))
}

/// The active key id of a purpose (creating it on first use), for reencrypt and health checks.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn active_key_id(purpose: &str) -> i32 {
    active_key(Purpose::parse(purpose).or_raise()).or_raise().id as i32
}

/// The purposes a data key may have, for the checks that go through every one.
#[pg_extern(immutable, parallel_safe)]
fn key_purposes() -> Vec<&'static str> {
    Purpose::ALL.map(Purpose::as_str).to_vec()
}

/// How `retire_unused_keys` found each `decrypt_only` key.
enum Retirement {
    Retired,
    /// No value uses it, but a snapshot from before the last move off it may still be open.
    Waiting,
    /// A stored value, or an open transaction holding the key, still needs it.
    InUse,
}

/// Retires `decrypt_only` keys that nothing can need any more (docs/ARCHITECTURE.md,
/// "Retiring a key"): no open transaction holds the key (it would have pinned it), no committed
/// value uses it on a fresh snapshot, and no snapshot older than that check is still open in
/// this database. The first call that finds a key unused records the check's transaction
/// horizon; a later call retires the key once every older snapshot has ended.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn retire_unused_keys() -> i32 {
    refresh().or_raise();
    // A transaction that has already written may have moved values off a key itself: a snapshot
    // taken between this check and its commit would still see them under the key. It only
    // records the horizon, and a later transaction retires.
    let wrote = wrote_values_under_keys().or_raise();
    // A schema from before 0.1.2 cannot record the wait: retire nothing until it is updated.
    if !schema_has_column("keys", "retire_after") {
        return 0;
    }
    let candidates = latest_rows(
        "SELECT key_id, retire_after, purpose FROM vetassist_auth.keys WHERE status = 'decrypt_only' ORDER BY key_id",
        |row| {
            let purpose = Purpose::parse(&row.get::<String>(3).unwrap_or_default())?;
            Ok((row.get::<i32>(1).unwrap_or_default(), row.get::<i64>(2), purpose))
        },
    )
    .or_raise();
    // Without waiting: a key some open transaction has pinned is simply not retired this time.
    let free: Vec<(i32, Option<i64>, Purpose)> = candidates
        .into_iter()
        .filter(|(id, _, _)| acquire(key_lock_tag(*id as u32, 0), pg_sys::ExclusiveLock, false))
        .collect();
    if free.is_empty() {
        return 0;
    }
    // SAFETY: reads the shared transaction counter; no lock is needed for a lower bound.
    let horizon = unsafe { pg_sys::ReadNextFullTransactionId() }.value as i64;
    let mut retired = 0;
    for (id, retire_after, purpose) in free {
        let outcome = if still_used(id, purpose).or_raise() {
            Retirement::InUse
        } else if !wrote && no_snapshot_before(retire_after.unwrap_or(horizon)).or_raise() {
            Retirement::Retired
        } else {
            Retirement::Waiting
        };
        let (sql, args): (&str, Vec<pgrx::datum::DatumWithOid>) = match outcome {
            Retirement::Retired => {
                retired += 1;
                ("UPDATE vetassist_auth.keys SET status = 'retired', retired_at = pg_catalog.now(), retire_after = NULL WHERE key_id = $1",
                 vec![id.into()])
            }
            Retirement::Waiting if wrote || retire_after.is_none() => (
                "UPDATE vetassist_auth.keys SET retire_after = $2 WHERE key_id = $1",
                vec![id.into(), horizon.into()],
            ),
            Retirement::InUse if retire_after.is_some() => (
                "UPDATE vetassist_auth.keys SET retire_after = NULL WHERE key_id = $1",
                vec![id.into()],
            ),
            _ => continue,
        };
        Spi::run_with_args(sql, &args)
            .map_err(spi_failure)
            .or_raise();
        if matches!(outcome, Retirement::Retired) {
            audit_key_event("key_retired", id);
        }
    }
    if retired > 0 {
        invalidate_all_backends();
    }
    retired
}

/// Whether a committed value still depends on the key, on a fresh snapshot. A hash pins only a
/// key of its column's purpose: the audit log's IP hashes from before audit_ip keys existed are
/// under hash keys, never rewritten, and must not hold a hash rotation for the six years the
/// log keeps them (docs/ARCHITECTURE.md, "Retiring a key"). One probe per key, on the branches
/// of key_usage that may hold it, so the audit log is read through its index.
fn still_used(key_id: i32, purpose: Purpose) -> Result<bool> {
    let used = latest_rows(
        &format!(
            "SELECT EXISTS (SELECT 1 FROM vetassist_auth.key_usage u WHERE u.key_id = {key_id} \
             AND u.used_by = ANY (ARRAY(SELECT p.table_name || '.' || p.column_name \
             FROM vetassist_auth.protected_columns() p WHERE p.hash_field IS NULL OR p.purpose = '{}')))",
            purpose.as_str()
        ),
        |row| Ok(row.get::<bool>(1).unwrap_or(true)),
    )?;
    Ok(used.first().copied().unwrap_or(true))
}

/// Whether this transaction wrote a value under a key (it pinned one: encrypting, hashing,
/// reencrypt moving a value) or changed a row of a table that holds such values (an update or
/// delete moves a value off its key without encrypting anything). Having a transaction id is
/// not the test: reading a key the first time in a session takes one.
fn wrote_values_under_keys() -> Result<bool> {
    if WROTE_UNDER_KEYS.get() {
        return Ok(true);
    }
    // SAFETY: reads this backend's own transaction state.
    if unsafe { pg_sys::GetTopTransactionIdIfAny() } == pg_sys::InvalidTransactionId {
        return Ok(false);
    }
    // The statistics of this transaction's own row changes (they include changes of this
    // backend's earlier transactions not yet reported: that only errs on the safe side). Without
    // track_counts they are not kept: assume a write.
    search_path::pinned(|| {
        Spi::get_one::<bool>(
            "SELECT NOT pg_catalog.current_setting('track_counts')::boolean OR EXISTS ( \
               SELECT 1 FROM (SELECT DISTINCT pg_catalog.to_regclass('vetassist_auth.' || pg_catalog.quote_ident(p.table_name)) AS rel \
                              FROM vetassist_auth.protected_columns() p) t \
               WHERE pg_catalog.pg_stat_get_xact_tuples_inserted(t.rel) + pg_catalog.pg_stat_get_xact_tuples_updated(t.rel) \
                     + pg_catalog.pg_stat_get_xact_tuples_deleted(t.rel) > 0)",
        )
    })
    .map_err(spi_failure)
    .map(|wrote| wrote.unwrap_or(true))
}

/// Whether every other backend of this database (and every standby feeding back through a
/// WAL sender) took its oldest snapshot at or after transaction id `full_xid`.
fn no_snapshot_before(full_xid: i64) -> Result<bool> {
    // SAFETY: drops this transaction's cached copy of the backend status table, so the query
    // below reads every backend's current xmin rather than one read earlier in the transaction.
    unsafe { pg_sys::pgstat_clear_snapshot() };
    let older = Spi::get_one_with_args::<i64>(
        "SELECT pg_catalog.count(*) FROM pg_catalog.pg_stat_activity \
         WHERE pid <> pg_catalog.pg_backend_pid() \
           AND (datname = pg_catalog.current_database() OR datname IS NULL) \
           AND backend_xmin IS NOT NULL \
           AND ((backend_xmin::text::bigint - ($1 & 4294967295)) & 4294967295) >= 2147483648",
        &[full_xid.into()],
    )
    .map_err(spi_failure)?
    .unwrap_or_default();
    Ok(older == 0)
}

fn audit_key_event(event_type: &str, key_id: i32) {
    Spi::run_with_args(
        "SELECT vetassist_auth.write_audit('key', $1, 'success', NULL, 'keys', $2::text, '{}'::jsonb)",
        &[event_type.into(), key_id.into()],
    )
    .map_err(spi_failure)
    .or_raise();
}

/// Applies `set` (an assignment list of our own) to a retired key whose material still exists,
/// audits it as `event_type`, and tells every backend; P0002 when there is no such key.
fn change_retired_key(key_id: i32, set: &str, event_type: &str, hint: &str) -> bool {
    let changed = Spi::get_one_with_args::<i64>(
        &format!(
            "WITH k AS (UPDATE vetassist_auth.keys SET {set} \
                        WHERE key_id = $1 AND status = 'retired' AND wrapped_key IS NOT NULL RETURNING 1) \
             SELECT pg_catalog.count(*) FROM k"
        ),
        &[key_id.into()],
    )
    .map_err(spi_failure)
    .or_raise()
    .unwrap_or_default();
    if changed == 0 {
        Failure::new(
            Kind::NotFound,
            "vetassist_auth: no retired key with this id whose material still exists",
        )
        .with_hint(hint)
        .raise();
    }
    audit_key_event(event_type, key_id);
    invalidate_all_backends();
    true
}

/// Brings a retired key back to `decrypt_only`, for values found under it after all (restored
/// from a backup, written outside the extension's tables). Its material must still exist.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn unretire_key(key_id: i32) -> bool {
    change_retired_key(
        key_id,
        "status = 'decrypt_only', retired_at = NULL",
        "key_unretired",
        "A destroyed key cannot be brought back.",
    )
}

/// Destroys a retired key's material for good (crypto-shredding): values under it can never
/// be read again, and it can no longer be brought back.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn destroy_key(key_id: i32) -> bool {
    change_retired_key(
        key_id,
        "wrapped_key = NULL, destroyed_at = pg_catalog.now()",
        "key_destroyed",
        "Only retired keys are destroyed; reencrypt() retires keys no value uses.",
    )
}

// Who may call the functions above (any other function of the extension: no role,
// sql/grants.sql).
extension_sql!(
    r#"
GRANT EXECUTE ON FUNCTION vetassist_auth.rotate_key(text) TO vetassist_admin;
GRANT EXECUTE ON FUNCTION vetassist_auth.rewrap_keys(text) TO vetassist_admin;
GRANT EXECUTE ON FUNCTION vetassist_auth.unretire_key(integer) TO vetassist_admin;
GRANT EXECUTE ON FUNCTION vetassist_auth.destroy_key(integer) TO vetassist_admin;
"#,
    name = "admin_grants",
    requires = [rotate_key, rewrap_keys, unretire_key, destroy_key],
);
