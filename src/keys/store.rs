//! The keys table through SPI: reading rows on a fresh snapshot, loading data keys, creating a
//! purpose's first key.

use super::*;

pub(super) fn spi_failure(_: pgrx::spi::SpiError) -> Failure {
    Failure::new(
        Kind::NotConfigured,
        "vetassist_auth: the keys table cannot be read",
    )
    .with_hint("Run SELECT * FROM vetassist_auth.verify_installation().")
}

/// Rows of a read-only query on a snapshot taken now rather than the caller's, so a key
/// created, rotated or retired by a transaction that committed after the caller's snapshot is
/// seen. `sql` holds no caller input (ids and purposes are formatted in by us); `read` gets a
/// column reader per row.
pub fn latest_rows<T>(sql: &str, mut read: impl FnMut(&LatestRow) -> Result<T>) -> Result<Vec<T>> {
    let query = std::ffi::CString::new(sql).expect("internal queries hold no NUL");
    search_path::pinned(|| {
        Spi::connect(|_client| {
            // SAFETY: SPI is connected for the duration of this closure. The plan is prepared and
            // freed here; SPI_execute_snapshot pushes (a copy of) the latest snapshot for the query
            // alone. Tuples are read before the next SPI call, and FromDatum copies every value out
            // of SPI's memory.
            unsafe {
                let plan = pg_sys::SPI_prepare(query.as_ptr(), 0, std::ptr::null_mut());
                if plan.is_null() {
                    return Err(spi_failure(pgrx::spi::SpiError::NoTupleTable));
                }
                let status = pg_sys::SPI_execute_snapshot(
                    plan,
                    std::ptr::null_mut(),
                    std::ptr::null(),
                    pg_sys::GetLatestSnapshot(),
                    std::ptr::null_mut(),
                    true,
                    false,
                    0,
                );
                let rows =
                    if status == pg_sys::SPI_OK_SELECT as i32 && !pg_sys::SPI_tuptable.is_null() {
                        let table = &*pg_sys::SPI_tuptable;
                        (0..pg_sys::SPI_processed as usize)
                            .map(|i| {
                                read(&LatestRow {
                                    tuple: *table.vals.add(i),
                                    desc: table.tupdesc,
                                })
                            })
                            .collect()
                    } else {
                        Err(spi_failure(pgrx::spi::SpiError::NoTupleTable))
                    };
                pg_sys::SPI_freeplan(plan);
                rows
            }
        })
    })
}

pub struct LatestRow {
    tuple: pg_sys::HeapTuple,
    desc: pg_sys::TupleDesc,
}

impl LatestRow {
    pub fn get<T: FromDatum>(&self, column: i32) -> Option<T> {
        let mut is_null = false;
        // SAFETY: the tuple and descriptor come from SPI_tuptable of the query just run, and
        // the column numbers are those of our own SELECT lists.
        unsafe {
            let datum = pg_sys::SPI_getbinval(self.tuple, self.desc, column, &mut is_null);
            T::from_datum(datum, is_null)
        }
    }
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

/// Whether an extension table has a column: the library is installed before `ALTER EXTENSION
/// vetassist_auth UPDATE` runs, and must keep an older release's schema working until then.
pub fn schema_has_column(table: &str, column: &str) -> bool {
    search_path::pinned(|| {
        Spi::get_one_with_args::<bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a \
                        WHERE a.attrelid = pg_catalog.to_regclass('vetassist_auth.' || $1) \
                          AND a.attname = $2 AND NOT a.attisdropped)",
            &[table.into(), column.into()],
        )
    })
    .ok()
    .flatten()
    .unwrap_or(false)
}

/// Whether the keys row being inserted is one this extension made (the restore guard's test).
/// Internal: not granted to any role.
#[pg_extern]
pub(super) fn key_creation_in_progress() -> bool {
    CREATING_KEY.get()
}
