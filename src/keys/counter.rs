//! Counting encryptions per key against the NIST SP 800-38D limit, in leases of a sequence.

use super::*;

/// NIST SP 800-38D: with random 96-bit nonces a key must stay far below 2^32 encryptions.
pub(super) const ENCRYPT_WARN_AT: i64 = 1 << 30;
pub const ENCRYPT_REFUSE_AT: i64 = 1 << 31;
pub(super) const LEASE: i64 = 128;

/// How many leases a purpose's counter has handed out so far (0 for purposes that only MAC).
pub(super) const COUNTER_POSITION: &str =
    "SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END FROM ";

/// The encryptions a key has had: the leases its purpose's counter handed out since the key
/// took over (its `counter_base`), times the lease. The one place the formula is written.
pub(super) fn encryptions_counted(position: i64, counter_base: i64) -> i64 {
    (position - counter_base) * LEASE
}

pub(super) fn counter_position(client: &pgrx::spi::SpiClient<'_>, purpose: Purpose) -> Result<i64> {
    let Some(counter) = purpose.counter() else {
        return Ok(0);
    };
    client
        .select(&format!("{COUNTER_POSITION}{counter}"), None, &[])
        .map_err(spi_failure)?
        .first()
        .get_one::<i64>()
        .map_err(spi_failure)
        .map(Option::unwrap_or_default)
}

pub fn reserve_encryption(key: &DataKey) -> Result<()> {
    let taken = KEY_CACHE.with_borrow_mut(|cache| match cache.leases.get_mut(&key.purpose) {
        Some((id, tag, remaining)) if *id == key.id && *tag == key.lease_tag && *remaining > 0 => {
            *remaining -= 1;
            true
        }
        _ => false,
    });
    if taken {
        return Ok(());
    }
    let counter = key.purpose.counter().ok_or_else(|| {
        Failure::new(
            Kind::InvalidArgument,
            "vetassist_auth: this key purpose does not encrypt",
        )
    })?;
    // A worker has counters of its own, which would let the cluster as a whole pass the limit.
    if crate::citus::on_worker()? {
        return Err(Failure::new(
            Kind::NotConfigured,
            "vetassist_auth: values are encrypted on the Citus coordinator only",
        )
        .with_hint("Connect the application to the coordinator."));
    }
    let lease = search_path::pinned(|| {
        Spi::get_one::<i64>(&format!("SELECT pg_catalog.nextval('{counter}')"))
    })
    .map_err(spi_failure)?
    .unwrap_or_default();
    let count = encryptions_counted(lease, key.counter_base);
    let purpose = key.purpose.as_str();
    if count >= ENCRYPT_REFUSE_AT {
        return Err(Failure::new(
            Kind::NotConfigured,
            format!(
                "vetassist_auth: data key {} ({purpose}) has reached its encryption limit",
                key.id
            ),
        )
        .with_hint(format!(
            "Rotate it: SELECT vetassist_auth.rotate_key('{purpose}');"
        )));
    }
    if count >= ENCRYPT_WARN_AT {
        if let Some(delegates) = DELEGATES.get() {
            (delegates.rotate_worn_key_soon)(key.purpose, key.id);
        }
        pgrx::ereport!(
            WARNING,
            PgSqlErrorCode::ERRCODE_WARNING,
            format!(
                "vetassist_auth: data key {} ({purpose}) has been used {count} times; it is rotated automatically (or rotate_key('{purpose}'))",
                key.id
            )
        );
    }
    KEY_CACHE.with_borrow_mut(|cache| {
        cache
            .leases
            .insert(key.purpose, (key.id, key.lease_tag, LEASE - 1))
    });
    Ok(())
}

/// How many encryptions each active key has had by its purpose's counter: what
/// `keys.encrypt_count` mirrors. refresh_encrypt_counts, its Citus variant and rotate_key read
/// it. Internal.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn counted_encryptions() -> TableIterator<'static, (name!(key_id, i32), name!(counted, i64))> {
    let counted = Spi::connect(|client| {
        let mut counted = Vec::new();
        for purpose in Purpose::ALL.into_iter().filter(|p| p.counter().is_some()) {
            let position = counter_position(client, purpose)?;
            let active = client
                .select(
                    "SELECT key_id, counter_base FROM vetassist_auth.keys WHERE purpose = $1 AND status = 'active'",
                    None,
                    &[purpose.as_str().into()],
                )
                .map_err(spi_failure)?;
            for row in active {
                let key_id = row.get::<i32>(1).map_err(spi_failure)?.unwrap_or_default();
                let base = row.get::<i64>(2).map_err(spi_failure)?.unwrap_or_default();
                counted.push((key_id, encryptions_counted(position, base)));
            }
        }
        Ok::<_, Failure>(counted)
    })
    .or_raise();
    TableIterator::new(counted)
}
