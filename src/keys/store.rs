//! The keys table through SPI: reading rows on a fresh snapshot, loading data keys, creating a
//! purpose's first key.

use super::*;

pub(super) fn spi_failure(error: pgrx::spi::SpiError) -> Failure {
    crate::pg::query_failed("the data keys", error)
}

/// Creates the active key of a purpose unless another transaction already did.
pub fn create_active_key(purpose: Purpose) -> Result<()> {
    // A subscriber receives the primary's keys; one of its own would take the primary's next id.
    crate::replica::require_primary();
    // Before reading the master key: a rewrap_keys that starts later waits for this transaction.
    lock_key_wrapping(pg_sys::ShareLock);
    refresh_master()?; // the recorder calls this first thing in its transaction
    let kek = kek()?;
    lock_purpose(purpose);
    // Read after the lock, on a fresh snapshot: a key another transaction created while we
    // waited is seen even from a repeatable-read transaction.
    if load_active_key(purpose)?.is_some() {
        return Ok(());
    }
    search_path::pinned(|| {
        Spi::connect_mut(|client| -> Result<()> {
            let id: i32 = client
                .update(
                    "SELECT pg_catalog.nextval('vetassist_auth.keys_key_id_seq')::integer",
                    None,
                    &[],
                )
                .map_err(spi_failure)?
                .first()
                .get_one()
                .map_err(spi_failure)?
                .ok_or_else(|| spi_failure(pgrx::spi::SpiError::NoTupleTable))?;
            let dek = SecretKey::random()?;
            let wrapped = crypto::wrap_dek(&kek, id as u32, purpose.as_str(), &dek)?;
            let base = counter_position(client, purpose)?;
            CREATING_KEY.set(true);
            let inserted = client.update(
            "INSERT INTO vetassist_auth.keys (key_id, purpose, status, wrapped_key, counter_base) \
             VALUES ($1, $2, 'active', $3, $4)",
            None,
            &[
                id.into(),
                purpose.as_str().into(),
                wrapped.into(),
                base.into(),
            ],
        );
            CREATING_KEY.set(false);
            inserted.map_err(spi_failure)?;
            Ok(())
        })
    })?;
    invalidate_all_backends();
    Ok(())
}

/// Loads data keys matching `condition` (a WHERE clause of our own) on a fresh snapshot.
pub(super) fn load_keys(condition: &str) -> Result<Vec<Rc<DataKey>>> {
    let rows = latest_rows(
        &format!(
            "SELECT key_id, purpose, wrapped_key, counter_base FROM vetassist_auth.keys \
             WHERE wrapped_key IS NOT NULL AND {condition} ORDER BY key_id DESC"
        ),
        |row| {
            Ok((
                row.get::<i32>(1).unwrap_or_default(),
                row.get::<String>(2).unwrap_or_default(),
                row.get::<Vec<u8>>(3).unwrap_or_default(),
                row.get::<i64>(4).unwrap_or_default(),
            ))
        },
    )?;
    rows.into_iter()
        .map(|(id, purpose, wrapped, base)| unwrap_row(id, &purpose, &wrapped, base))
        .collect()
}

pub(super) fn load_active_key(purpose: Purpose) -> Result<Option<Rc<DataKey>>> {
    Ok(load_keys(&format!(
        "purpose = '{}' AND status = 'active'",
        purpose.as_str()
    ))?
    .pop())
}

/// Whether the keys row being inserted is one this extension made (the restore guard's test).
/// Internal: not granted to any role.
#[pg_extern]
pub(super) fn key_creation_in_progress() -> bool {
    CREATING_KEY.get()
}
