//! Keeping the per-backend key cache (`KEY_CACHE`) true: re-checking the master key once per
//! transaction, unwrapping data keys into it, and dropping it on any backend's key change
//! (a relcache invalidation of the keys table) or an abort.

use super::*;

/// Brings the cache up to date; called at every entry point before any lookup.
pub(super) fn refresh() -> Result<()> {
    if STALE.replace(false) {
        KEY_CACHE.with_borrow_mut(KeyCache::drop_data_keys);
    }
    keys_relid(); // so this backend recognises the next invalidation of the keys table
    if CHECKED_THIS_XACT.get() {
        return Ok(());
    }
    crate::log_redaction::warn_about_unsafe_channels();
    let checked = master_source().and_then(|source| {
        let previous = previous_source()?;
        Ok((
            master_fingerprint(&source, previous.as_ref())?,
            source,
            previous,
        ))
    });
    let (fingerprint, source, previous) = match checked {
        Ok(checked) => checked,
        Err(e) => {
            // A removed key disables the cached keys too, not just new ones.
            KEY_CACHE.with_borrow_mut(|cache| {
                cache.drop_data_keys();
                cache.kek = None;
                cache.previous_kek = None;
                cache.previous_failure = None;
                cache.master_fingerprint = None;
                cache.source_setting = None;
            });
            return Err(e);
        }
    };
    let changed = KEY_CACHE.with_borrow(|cache| cache.master_fingerprint != Some(fingerprint));
    if changed {
        let master = load_master_key(&source)?;
        let kek = Rc::new(crypto::derive_kek(&master));
        // A previous key that cannot be read only means no fallback: the current key works.
        // A previous key that cannot be loaded only means no fallback; a key that then opens
        // under neither says why (unwrap_row).
        let (previous_key, previous_failure) =
            match previous.as_ref().map(|p| (p, load_previous_key(p))) {
                Some((p, Ok(key))) => (Some((p, key)), None),
                Some((_, Err(failure))) => (None, Some(failure)),
                None => (None, None),
            };
        let previous_kek = previous_key
            .as_ref()
            .map(|(_, key)| Rc::new(crypto::derive_kek(key)));
        let custody = custody(
            &source,
            &master,
            previous_key.as_ref().map(|(p, key)| (*p, key)),
        );
        KEY_CACHE.with_borrow_mut(|cache| {
            cache.drop_data_keys();
            cache.kek = Some(kek);
            cache.previous_kek = previous_kek;
            cache.previous_failure = previous_failure;
            cache.master_fingerprint = Some(fingerprint);
            cache.source_setting = Some(source.setting());
            // Put on record once a data key opens under it (unwrap_row): only then is it used.
            cache.custody_to_record = Some(custody);
        });
    }
    CHECKED_THIS_XACT.set(true);
    Ok(())
}

/// `refresh`, re-checking the master key source even if this transaction already did: a key
/// is wrapped under the master key in force when it is wrapped, and a session reloads its
/// configuration between statements, inside a transaction too.
pub(super) fn refresh_master() -> Result<()> {
    CHECKED_THIS_XACT.set(false);
    refresh()
}

pub(super) fn kek() -> Result<Rc<SecretKey>> {
    KEY_CACHE
        .with_borrow(|cache| cache.kek.clone())
        .ok_or_else(no_master_key)
}

pub fn keys_relid() -> pg_sys::Oid {
    let cached = KEYS_RELID.get();
    if cached != pg_sys::InvalidOid {
        return cached;
    }
    let oid = search_path::pinned(|| {
        crate::pg::read_one::<pg_sys::Oid>(
            "SELECT pg_catalog.to_regclass('vetassist_auth.keys')::oid",
            &[],
        )
    })
    .ok()
    .flatten()
    .unwrap_or(pg_sys::InvalidOid);
    KEYS_RELID.set(oid);
    oid
}

/// Tells every backend (at its next statement) and this one to drop cached keys.
pub(super) fn invalidate_all_backends() {
    let relid = keys_relid();
    if relid != pg_sys::InvalidOid {
        // SAFETY: queues an invalidation of an existing relation, inside a transaction.
        unsafe { pg_sys::CacheInvalidateRelcacheByRelid(relid) };
    }
    STALE.set(true);
}

pub(super) fn unwrap_row(
    id: i32,
    purpose: &str,
    wrapped: &[u8],
    counter_base: i64,
) -> Result<Rc<DataKey>> {
    let purpose = Purpose::parse(purpose)?;
    let kek = kek()?;
    let previous = KEY_CACHE.with_borrow(|cache| cache.previous_kek.clone());
    let secret = crypto::unwrap_dek(&kek, id as u32, purpose.as_str(), wrapped)
        .or_else(|e| match &previous {
            Some(previous) => crypto::unwrap_dek(previous, id as u32, purpose.as_str(), wrapped),
            None => Err(e),
        })
        .map_err(|_| {
            // The previous master key was to open it, but could not be loaded: say that, not
            // that the data is damaged.
            if let Some(failure) = KEY_CACHE.with_borrow(|cache| cache.previous_failure.clone()) {
                return failure;
            }
            let setting = KEY_CACHE.with_borrow(|cache| cache.source_setting).unwrap_or("the setting");
            Failure::new(Kind::DataCorrupted, format!("vetassist_auth: data key {id} cannot be unwrapped"))
                .with_hint(format!("The master key from {setting} differs from the one that wrapped the data keys: set vetassist_auth.previous_master_key_file or previous_master_key_command to the old key's source and run rewrap_keys (docs/operations.md, \"Changing the master key\")."))
        })?;
    if let (Some(custody), Some(delegates)) = (
        KEY_CACHE.with_borrow_mut(|cache| cache.custody_to_record.take()),
        DELEGATES.get(),
    ) {
        (delegates.record_custody)(&custody);
    }
    let cipher = secret.cipher();
    let digest = <sha2::Sha256 as sha2::Digest>::digest(secret.0);
    let key = Rc::new(DataKey {
        id: id as u32,
        purpose,
        counter_base,
        lease_tag: digest[..8].try_into().expect("8 bytes"),
        secret,
        cipher,
    });
    KEY_CACHE.with_borrow_mut(|cache| {
        if cache.keys.len() >= DATA_KEYS_CACHED {
            // Looked up again by id when needed; the pinned ones stay in WRITING.
            cache.keys.clear();
            cache.field_keys.clear();
            cache.field_keys_cached = 0;
        }
        cache.keys.insert(key.id, key.clone())
    });
    Ok(key)
}

// Transaction and invalidation callbacks, registered once per backend from _PG_init.

#[pg_guard]
unsafe extern "C-unwind" fn on_xact_event(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::XactEvent::*;
    match event {
        XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT | XACT_EVENT_PREPARE => {
            CHECKED_THIS_XACT.set(false);
            WROTE_UNDER_KEYS.set(false);
            forget_pins();
        }
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT => {
            CHECKED_THIS_XACT.set(false);
            WROTE_UNDER_KEYS.set(false);
            STALE.set(true);
            CREATING_KEY.set(false);
            forget_pins();
        }
        _ => {}
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_subxact_event(
    event: pg_sys::SubXactEvent::Type,
    _my: pg_sys::SubTransactionId,
    _parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    if event == pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB {
        STALE.set(true);
        // Locks the subtransaction took are gone; pinning again is cheap and idempotent.
        forget_pins();
    }
}

/// The transaction's key locks were released (or handed to a prepared transaction).
fn forget_pins() {
    forget_writing_keys();
    PINNED.with(|pinned| {
        if let Ok(mut pinned) = pinned.try_borrow_mut() {
            pinned.clear();
        }
    });
}

#[pg_guard]
unsafe extern "C-unwind" fn on_relcache_invalidation(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    let ours = KEYS_RELID.get();
    // While our oid is unknown (looked up again after the last invalidation of the keys table),
    // any relation's invalidation may be ours: ignoring it would keep a rotated key in use.
    if relid == pg_sys::InvalidOid || relid == ours || ours == pg_sys::InvalidOid {
        STALE.set(true);
        // The extension may have been dropped and recreated: look the oid up again.
        KEYS_RELID.set(pg_sys::InvalidOid);
    }
}

pub fn register_callbacks() {
    // SAFETY: called once per backend from _PG_init; the callbacks are static functions.
    unsafe {
        pg_sys::RegisterXactCallback(Some(on_xact_event), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(on_subxact_event), std::ptr::null_mut());
        pg_sys::CacheRegisterRelcacheCallback(
            Some(on_relcache_invalidation),
            pg_sys::Datum::from(0),
        );
    }
}
