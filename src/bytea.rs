//! A `bytea` result built in place: `encrypt` seals straight into the value PostgreSQL gets
//! back, and `decrypt` opens in it, instead of going through a Rust `Vec` that pgrx would copy
//! once more (the copies were a sixth of `encrypt`'s time for 1 KiB).

use pgrx::callconv::{BoxRet, FcInfo};
use pgrx::pg_sys;
use pgrx::pgrx_sql_entity_graph::metadata::{
    ArgumentError, ReturnsError, ReturnsRef, SqlMappingRef, SqlTranslatable, TypeOrigin,
};
use std::ptr::NonNull;

/// A `bytea` in the current memory context, owned until it is returned.
pub struct Bytea {
    value: NonNull<pg_sys::varlena>,
    len: usize,
}

impl Bytea {
    /// `len` zero bytes.
    pub fn zeroed(len: usize) -> Bytea {
        let total = len + pg_sys::VARHDRSZ;
        // SAFETY: palloc0 returns zeroed memory of the requested size in the current memory
        // context or raises an ERROR; set_varsize_4b writes the header of that allocation.
        let value = unsafe {
            let value = pg_sys::palloc0(total) as *mut pg_sys::varlena;
            pgrx::varlena::set_varsize_4b(value, total as i32);
            NonNull::new_unchecked(value)
        };
        Bytea { value, len }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the allocation holds the 4-byte header and `len` initialised bytes after it,
        // and `self` is its only reference.
        unsafe {
            std::slice::from_raw_parts_mut(
                (self.value.as_ptr() as *mut u8).add(pg_sys::VARHDRSZ),
                self.len,
            )
        }
    }

    /// Keeps only the first `len` bytes.
    pub fn truncate(&mut self, len: usize) {
        assert!(len <= self.len);
        self.len = len;
        // SAFETY: shrinks the header's length within the allocation.
        unsafe {
            pgrx::varlena::set_varsize_4b(self.value.as_ptr(), (len + pg_sys::VARHDRSZ) as i32)
        };
    }
}

// SAFETY: returns the palloc'd varlena as the function's result datum, as pgrx does for the
// bytea it copies a Vec<u8> into.
unsafe impl BoxRet for Bytea {
    unsafe fn box_into<'fcx>(self, fcinfo: &mut FcInfo<'fcx>) -> pgrx::datum::Datum<'fcx> {
        // SAFETY: the datum is a valid bytea in the call's memory context.
        unsafe { fcinfo.return_raw_datum(pg_sys::Datum::from(self.value.as_ptr())) }
    }
}

// SAFETY: the value is a bytea in every respect.
unsafe impl SqlTranslatable for Bytea {
    const TYPE_IDENT: &'static str = pgrx::pgrx_resolved_type!(Bytea);
    const TYPE_ORIGIN: TypeOrigin = TypeOrigin::External;
    const ARGUMENT_SQL: Result<SqlMappingRef, ArgumentError> = Ok(SqlMappingRef::literal("bytea"));
    const RETURN_SQL: Result<ReturnsRef, ReturnsError> =
        Ok(ReturnsRef::One(SqlMappingRef::literal("bytea")));
}
