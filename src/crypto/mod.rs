//! The cryptographic core: pure Rust, no pgrx, so it is unit-tested without a database.
//!
//! Everything here is built from RustCrypto primitives (AES-256-GCM, HMAC-SHA256, HKDF-SHA256);
//! this module only fixes the formats described in docs/ARCHITECTURE.md, "Formats".

pub mod audit_chain;
pub mod envelope;
pub mod field_hash;
pub mod master_key;
pub mod totp;

pub use field_hash::{normalize, FieldKey};
pub use master_key::{derive_kek, parse_master_key_hex, unwrap_dek, wrap_dek};

use aes_gcm::aead::KeyInit;
use aes_gcm::Aes256Gcm;

pub const KEY_LEN: usize = 32;
pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;

/// A 32-byte secret that is wiped from memory when dropped.
#[derive(Clone)]
pub struct SecretKey(pub [u8; KEY_LEN]);

impl Drop for SecretKey {
    fn drop(&mut self) {
        // Volatile writes so the wipe is not optimised away.
        for byte in self.0.iter_mut() {
            // SAFETY: `byte` is a valid, aligned &mut u8.
            unsafe { std::ptr::write_volatile(byte, 0) };
        }
    }
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

impl SecretKey {
    /// A fresh key from the operating system's RNG.
    pub fn random() -> Result<Self, Error> {
        let mut key = [0u8; KEY_LEN];
        fill_random(&mut key)?;
        Ok(SecretKey(key))
    }

    /// An AES-256-GCM instance with the key schedule expanded once.
    pub fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new((&self.0).into())
    }
}

/// Failures of the crypto core. None of them carries input bytes, so none can leak them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// Authentication failed: wrong key, wrong context, or modified bytes.
    Authentication,
    /// The input is too short or has an unknown version byte.
    Malformed,
    /// The master key is not 64 hexadecimal characters.
    BadMasterKey,
    /// The operating system's random number generator failed.
    Random,
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Error::Authentication => "authentication failed",
            Error::Malformed => "malformed ciphertext",
            Error::BadMasterKey => "master key must be 64 hexadecimal characters (32 bytes)",
            Error::Random => "the operating system random number generator failed",
        })
    }
}

impl std::error::Error for Error {}

/// Fills `buf` from the OS RNG (getrandom(2)); never from a user-space generator.
pub fn fill_random(buf: &mut [u8]) -> Result<(), Error> {
    getrandom::getrandom(buf).map_err(|_| Error::Random)
}

/// Nonces are read from the OS RNG in blocks, which saves a system call per encryption.
/// The block belongs to one process: a forked child never reuses its parent's bytes.
struct NoncePool {
    pid: u32,
    bytes: [u8; 4096],
    used: usize,
}

thread_local! {
    static NONCE_POOL: std::cell::RefCell<NoncePool> =
        const { std::cell::RefCell::new(NoncePool { pid: 0, bytes: [0; 4096], used: 4096 }) };
}

/// A fresh 96-bit nonce: bytes straight from the OS RNG, each handed out once.
pub fn random_nonce() -> Result<[u8; NONCE_LEN], Error> {
    NONCE_POOL.with_borrow_mut(|pool| {
        let pid = std::process::id();
        if pool.pid != pid || pool.used + NONCE_LEN > pool.bytes.len() {
            fill_random(&mut pool.bytes)?;
            pool.pid = pid;
            pool.used = 0;
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&pool.bytes[pool.used..pool.used + NONCE_LEN]);
        // Wipe what was handed out, so the pool never holds a nonce twice.
        pool.bytes[pool.used..pool.used + NONCE_LEN].fill(0);
        pool.used += NONCE_LEN;
        Ok(nonce)
    })
}
