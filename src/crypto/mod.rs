//! The cryptographic core: pure Rust, no pgrx, so it is unit-tested without a database.
//!
//! Everything here is built from well-kept primitives: AES-256-GCM from ring (BoringSSL's
//! assembly: about four times the aes-gcm crate's speed here), HMAC-SHA256 and HKDF-SHA256 from
//! RustCrypto; this module only fixes the formats described in docs/ARCHITECTURE.md, "Formats".

pub mod audit_chain;
pub mod envelope;
pub mod field_hash;
pub mod master_key;
pub mod totp;

pub use field_hash::{normalize, FieldKey};
pub use master_key::{derive_kek, key_check, parse_master_key_hex, unwrap_dek, wrap_dek};

pub const KEY_LEN: usize = 32;
pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;

/// A 32-byte secret that is wiped from memory when dropped.
#[derive(Clone)]
pub struct SecretKey(pub [u8; KEY_LEN]);

impl Drop for SecretKey {
    fn drop(&mut self) {
        wipe(&mut self.0);
    }
}

/// Zeroes secret bytes with volatile writes, so the wipe is not optimised away.
pub fn wipe(bytes: &mut [u8]) {
    for byte in bytes.iter_mut() {
        // SAFETY: `byte` is a valid, aligned &mut u8.
        unsafe { std::ptr::write_volatile(byte, 0) };
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

    /// AES-256-GCM under this key, with the key schedule expanded once.
    pub fn cipher(&self) -> Cipher {
        Cipher(ring::aead::LessSafeKey::new(
            ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &self.0)
                .expect("a 32-byte key is an AES-256 key"),
        ))
    }
}

/// AES-256-GCM with 96-bit nonces and 128-bit tags, in place. The nonce discipline is ours
/// (`random_nonce`), hence ring's "less safe" key type.
pub struct Cipher(ring::aead::LessSafeKey);

impl Cipher {
    /// Encrypts `in_out` in place; returns the tag.
    pub fn seal_in_place(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        in_out: &mut [u8],
    ) -> Result<[u8; TAG_LEN], Error> {
        let tag = self
            .0
            .seal_in_place_separate_tag(
                ring::aead::Nonce::assume_unique_for_key(*nonce),
                ring::aead::Aad::from(aad),
                in_out,
            )
            .map_err(|_| Error::Authentication)?;
        let mut out = [0u8; TAG_LEN];
        out.copy_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Decrypts `ciphertext || tag` in place; returns the plaintext's length (at the front).
    pub fn open_in_place(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        in_out: &mut [u8],
    ) -> Result<usize, Error> {
        self.0
            .open_in_place(
                ring::aead::Nonce::assume_unique_for_key(*nonce),
                ring::aead::Aad::from(aad),
                in_out,
            )
            .map(|plaintext| plaintext.len())
            .map_err(|_| Error::Authentication)
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

/// Nonces come from ChaCha20 (rand_chacha) seeded with 32 bytes from the OS RNG, one generator
/// per process: a system call per nonce cost more than the encryption of a token. A fork (every
/// backend is one) or 2^20 nonces make it draw a fresh seed, so no two processes share a stream.
struct NonceSource {
    /// The value of FORKS when the generator was seeded.
    forks: u64,
    drawn: u32,
    rng: Option<rand_chacha::ChaCha20Rng>,
}

const RESEED_AFTER: u32 = 1 << 20;

/// Counts forks in this process's ancestry (a pthread_atfork child handler): comparing it is
/// cheaper than asking the OS for the pid on every nonce.
static FORKS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

extern "C" fn count_fork() {
    FORKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

fn forks_so_far() -> Result<u64, Error> {
    static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    // SAFETY: registers a child handler that only increments an atomic, which is
    // async-signal-safe as a fork handler must be.
    let registered = *REGISTERED
        .get_or_init(|| unsafe { libc::pthread_atfork(None, None, Some(count_fork)) == 0 });
    if !registered {
        return Err(Error::Random);
    }
    Ok(FORKS.load(std::sync::atomic::Ordering::Relaxed))
}

thread_local! {
    static NONCES: std::cell::RefCell<NonceSource> =
        const { std::cell::RefCell::new(NonceSource { forks: 0, drawn: 0, rng: None }) };
}

/// A fresh 96-bit nonce, unpredictable and, for all practical purposes, never repeated
/// (random 96-bit nonces under one key stay within NIST's 2^32 budget, which keys::counter
/// enforces).
pub fn random_nonce() -> Result<[u8; NONCE_LEN], Error> {
    use rand_chacha::rand_core::{RngCore, SeedableRng};
    let forks = forks_so_far()?;
    NONCES.with_borrow_mut(|source| {
        if source.rng.is_none() || source.forks != forks || source.drawn >= RESEED_AFTER {
            let mut seed = [0u8; 32];
            fill_random(&mut seed)?;
            source.rng = Some(rand_chacha::ChaCha20Rng::from_seed(seed));
            seed.fill(0);
            source.forks = forks;
            source.drawn = 0;
        }
        let mut nonce = [0u8; NONCE_LEN];
        source
            .rng
            .as_mut()
            .expect("seeded above")
            .fill_bytes(&mut nonce);
        source.drawn += 1;
        Ok(nonce)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonces_do_not_repeat_within_a_process() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..2000 {
            assert!(seen.insert(random_nonce().unwrap()));
        }
    }

    /// Postgres forks every backend: a child must not hand out the nonces its parent's block
    /// still holds (the parent's next nonce here).
    #[test]
    fn a_forked_child_does_not_reuse_its_parents_nonces() {
        random_nonce().unwrap();
        let mut pipe = [0; 2];
        // SAFETY: a plain pipe(2) into a two-element array.
        assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
        // SAFETY: the child only computes a nonce, writes it to the pipe and _exits.
        let child = unsafe { libc::fork() };
        assert!(child >= 0);
        if child == 0 {
            let nonce = random_nonce().unwrap_or([0; NONCE_LEN]);
            // SAFETY: writes the nonce's bytes to the pipe's write end, then leaves at once.
            unsafe {
                libc::write(pipe[1], nonce.as_ptr().cast(), NONCE_LEN);
                libc::_exit(0);
            }
        }
        let parents = random_nonce().unwrap();
        let mut childs = [0u8; NONCE_LEN];
        // SAFETY: reads NONCE_LEN bytes into a buffer of that size; waits for the child.
        unsafe {
            assert_eq!(
                libc::read(pipe[0], childs.as_mut_ptr().cast(), NONCE_LEN),
                NONCE_LEN as isize
            );
            libc::waitpid(child, std::ptr::null_mut(), 0);
        }
        assert_ne!(childs, [0; NONCE_LEN]);
        assert_ne!(childs, parents);
    }
}
