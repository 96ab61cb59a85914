//! Postgres plumbing the layers above share (docs/ARCHITECTURE.md, "Layers"): queries on a
//! snapshot taken now, the one conversion of a failed internal query, object lock tags.

use crate::error::{Failure, Kind, Result};
use crate::search_path;
use pgrx::prelude::*;

/// The one conversion of a failed internal query into a Failure: names what the query was about
/// (our queries hold no caller input: ids and purposes are formatted in by us, values are
/// parameters) and Postgres's reason.
pub fn query_failed(about: &str, error: pgrx::spi::SpiError) -> Failure {
    Failure::new(
        Kind::NotConfigured,
        format!("vetassist_auth: a query on {about} failed ({error})"),
    )
    .with_hint("Run SELECT * FROM vetassist_auth.verify_installation().")
}

/// `query_failed` for a query of ours, named by its first words.
pub fn query_failure(sql: &str) -> impl FnOnce(pgrx::spi::SpiError) -> Failure + '_ {
    move |error| {
        let head: String = sql.split_whitespace().take(8).collect::<Vec<_>>().join(" ");
        query_failed(&format!("\"{head} …\""), error)
    }
}

/// Rows of a read-only query on a snapshot taken now rather than the caller's, so a key
/// created, rotated or retired by a transaction that committed after the caller's snapshot is
/// seen. `sql` holds no caller input (ids and purposes are formatted in by us); `read` gets a
/// column reader per row.
pub fn latest_rows<T>(sql: &str, read: impl FnMut(&LatestRow) -> Result<T>) -> Result<Vec<T>> {
    let query = std::ffi::CString::new(sql).expect("internal queries hold no NUL");
    search_path::pinned(|| {
        Spi::connect(|_client| {
            // SAFETY: SPI is connected for the duration of this closure; the plan is prepared and
            // freed here.
            unsafe {
                let plan = pg_sys::SPI_prepare(query.as_ptr(), 0, std::ptr::null_mut());
                if plan.is_null() {
                    return Err(query_failure(sql)(pgrx::spi::SpiError::NoTupleTable));
                }
                let rows = execute_latest(plan, std::ptr::null_mut(), sql, read);
                pg_sys::SPI_freeplan(plan);
                rows
            }
        })
    })
}

/// A query of ours that runs on every call of a hot function: each backend prepares it once and
/// keeps the plan (Postgres re-plans it when a table it reads changes).
pub struct SavedQuery {
    sql: &'static std::ffi::CStr,
    arg_types: &'static [pg_sys::Oid],
    plan: std::sync::atomic::AtomicPtr<pg_sys::_SPI_plan>,
}

impl SavedQuery {
    pub const fn new(sql: &'static std::ffi::CStr, arg_types: &'static [pg_sys::Oid]) -> Self {
        SavedQuery {
            sql,
            arg_types,
            plan: std::sync::atomic::AtomicPtr::new(std::ptr::null_mut()),
        }
    }

    /// `latest_rows` for this query with these arguments (one datum per argument type, none NULL).
    pub fn latest_rows<T>(
        &self,
        args: &[pg_sys::Datum],
        read: impl FnMut(&LatestRow) -> Result<T>,
    ) -> Result<Vec<T>> {
        use std::sync::atomic::Ordering::Relaxed;
        assert_eq!(args.len(), self.arg_types.len(), "one datum per argument");
        let sql = self.sql.to_str().expect("our queries are UTF-8");
        search_path::pinned(|| {
            Spi::connect(|_client| {
                // SAFETY: SPI is connected for the duration of this closure. A saved plan lives in
                // its own memory context until the backend exits (SPI_keepplan); the argument
                // types outlive the prepare, and `args` holds one datum per argument.
                unsafe {
                    let mut plan = self.plan.load(Relaxed);
                    if plan.is_null() {
                        plan = pg_sys::SPI_prepare(
                            self.sql.as_ptr(),
                            self.arg_types.len() as i32,
                            self.arg_types.as_ptr().cast_mut(),
                        );
                        if plan.is_null() || pg_sys::SPI_keepplan(plan) != 0 {
                            return Err(query_failure(sql)(pgrx::spi::SpiError::NoTupleTable));
                        }
                        self.plan.store(plan, Relaxed);
                    }
                    execute_latest(plan, args.as_ptr().cast_mut(), sql, read)
                }
            })
        })
    }
}

/// Runs a prepared plan on (a copy of) the latest snapshot, for this query alone, and reads its
/// rows before the next SPI call; FromDatum copies every value out of SPI's memory.
///
/// # Safety
/// SPI is connected, `plan` is a valid plan, and `args` holds one datum per argument of it.
unsafe fn execute_latest<T>(
    plan: pg_sys::SPIPlanPtr,
    args: *mut pg_sys::Datum,
    sql: &str,
    mut read: impl FnMut(&LatestRow) -> Result<T>,
) -> Result<Vec<T>> {
    // SAFETY: as the caller promises.
    unsafe {
        let status = pg_sys::SPI_execute_snapshot(
            plan,
            args,
            std::ptr::null(),
            pg_sys::GetLatestSnapshot(),
            std::ptr::null_mut(),
            true,
            false,
            0,
        );
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
            Err(query_failure(sql)(pgrx::spi::SpiError::NoTupleTable))
        }
    }
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

/// The first column of the first row of a read-only query (None for no row or NULL), through a
/// read-only SPI connection: `Spi::get_one` runs its query as an update, which gives the
/// transaction an id, and no transaction can have one on a hot standby.
pub fn read_one<T: FromDatum + IntoDatum>(
    sql: &str,
    args: &[pgrx::datum::DatumWithOid],
) -> std::result::Result<Option<T>, pgrx::spi::SpiError> {
    Spi::connect(
        |client| match client.select(sql, Some(1), args)?.first().get_one::<T>() {
            Err(pgrx::spi::SpiError::InvalidPosition) => Ok(None),
            other => other,
        },
    )
}

/// This backend's database.
pub fn database() -> pg_sys::Oid {
    // SAFETY: set once the backend is connected; our functions run only in connected backends.
    unsafe { pg_sys::MyDatabaseId }
}

/// A TimestampTz as Postgres prints it (DateStyle and TimeZone of this backend).
pub fn timestamp_text(at: i64) -> String {
    // SAFETY: timestamptz_to_str formats into a static buffer, copied at once.
    unsafe { std::ffi::CStr::from_ptr(pg_sys::timestamptz_to_str(at)) }
        .to_string_lossy()
        .into_owned()
}

/// Whether an extension table has a column: the library is installed before `ALTER EXTENSION
/// vetassist_auth UPDATE` runs, and must keep an older release's schema working until then.
pub fn schema_has_column(table: &str, column: &str) -> bool {
    search_path::pinned(|| {
        read_one::<bool>(
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

/// An object lock tag in this database: only C code can take one, unlike an advisory lock,
/// which any role could squat on.
pub fn object_lock_tag(class: pg_sys::Oid, objid: u32, subid: u16) -> pg_sys::LOCKTAG {
    pg_sys::LOCKTAG {
        // SAFETY: MyDatabaseId is set once at backend start and only read here.
        locktag_field1: unsafe { pg_sys::MyDatabaseId }.to_u32(),
        locktag_field2: class.to_u32(),
        locktag_field3: objid,
        locktag_field4: subid,
        locktag_type: pg_sys::LockTagType::LOCKTAG_OBJECT as u8,
        locktag_lockmethodid: pg_sys::DEFAULT_LOCKMETHOD as u8,
    }
}

/// Takes a transaction-level lock; false when `wait` is off and someone else holds it.
pub fn acquire(tag: pg_sys::LOCKTAG, mode: u32, wait: bool) -> bool {
    // SAFETY: a valid tag of the default lock method; the lock belongs to the current
    // transaction's resource owner and is released at its end (or its subtransaction's abort).
    let result = unsafe { pg_sys::LockAcquire(&tag, mode as pg_sys::LOCKMODE, false, !wait) };
    result != pg_sys::LockAcquireResult::LOCKACQUIRE_NOT_AVAIL
}

/// Locks the extension in `mode` for the rest of the transaction. DROP EXTENSION takes this lock
/// before any of our tables, and our ProcessUtility hook takes it for ALTER EXTENSION UPDATE: a
/// background process that takes it (shared) first waits for an open drop or update holding
/// nothing they need, and they wait for it; neither deadlocks. False when the extension is not
/// (or no longer) there.
pub fn lock_extension(mode: u32) -> bool {
    const NAME: &std::ffi::CStr = c"vetassist_auth";
    // SAFETY: a NUL-terminated name; missing_ok returns InvalidOid rather than raising.
    let extension = unsafe { pg_sys::get_extension_oid(NAME.as_ptr(), true) };
    if extension == pg_sys::InvalidOid {
        return false;
    }
    // SAFETY: a transaction is open; the lock is released at its end. Taking it processes
    // pending invalidations, so the lookup below sees a drop that committed while we waited.
    unsafe {
        pg_sys::LockDatabaseObject(
            pg_sys::ExtensionRelationId,
            extension,
            0,
            mode as pg_sys::LOCKMODE,
        );
        pg_sys::get_extension_oid(NAME.as_ptr(), true) == extension
    }
}
