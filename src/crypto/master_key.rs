//! Master key handling (docs/ARCHITECTURE.md, "Formats"): the master key never encrypts data itself. It
//! derives a key-encryption key (KEK) with HKDF, and the KEK wraps the random data keys.

use super::{Error, SecretKey, KEY_LEN, NONCE_LEN};
use hkdf::Hkdf;
use sha2::Sha256;

const KEK_SALT: &[u8] = b"vetassist_auth";
const KEK_INFO: &[u8] = b"kek:v1";
const CHECK_INFO: &[u8] = b"check:v1";

/// Parses 64 hex characters; surrounding white space (a trailing newline in a key file) is
/// ignored. The error never contains the input.
pub fn parse_master_key_hex(text: &str) -> Result<SecretKey, Error> {
    let text = text.trim();
    if text.len() != 2 * KEY_LEN {
        return Err(Error::BadMasterKey);
    }
    let mut key = [0u8; KEY_LEN];
    hex::decode_to_slice(text, &mut key).map_err(|_| Error::BadMasterKey)?;
    Ok(SecretKey(key))
}

/// KEK = HKDF-SHA256(IKM = master key, salt = "vetassist_auth", info = "kek:v1", L = 32).
pub fn derive_kek(master: &SecretKey) -> SecretKey {
    let mut kek = [0u8; KEY_LEN];
    Hkdf::<Sha256>::new(Some(KEK_SALT), &master.0)
        .expand(KEK_INFO, &mut kek)
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    SecretKey(kek)
}

/// A key check value: tells master keys apart in audit rows and logs without revealing them
/// (HKDF with its own info string, so it is independent of the KEK).
pub fn key_check(master: &SecretKey) -> [u8; 8] {
    let mut check = [0u8; 8];
    Hkdf::<Sha256>::new(Some(KEK_SALT), &master.0)
        .expand(CHECK_INFO, &mut check)
        .expect("8 bytes is a valid HKDF-SHA256 output length");
    check
}

fn wrap_aad(key_id: u32, purpose: &str) -> Vec<u8> {
    format!("vetassist_auth:key:{key_id}:{purpose}").into_bytes()
}

/// wrapped_key = nonce(12) || AES-256-GCM(KEK, nonce, DEK, AAD = "vetassist_auth:key:<id>:<purpose>").
pub fn wrap_dek(
    kek: &SecretKey,
    key_id: u32,
    purpose: &str,
    dek: &SecretKey,
) -> Result<Vec<u8>, Error> {
    let mut nonce = [0u8; NONCE_LEN];
    super::fill_random(&mut nonce)?;
    let mut out = nonce.to_vec();
    out.extend_from_slice(&dek.0);
    let tag =
        kek.cipher()
            .seal_in_place(&nonce, &wrap_aad(key_id, purpose), &mut out[NONCE_LEN..])?;
    out.extend_from_slice(&tag);
    Ok(out)
}

/// Unwraps a data key; fails on a wrong master key, or a row whose id or purpose was changed.
pub fn unwrap_dek(
    kek: &SecretKey,
    key_id: u32,
    purpose: &str,
    wrapped: &[u8],
) -> Result<SecretKey, Error> {
    if wrapped.len() != NONCE_LEN + KEY_LEN + super::TAG_LEN {
        return Err(Error::Malformed);
    }
    let nonce: &[u8; NONCE_LEN] = wrapped[..NONCE_LEN].try_into().expect("checked length");
    let mut plain = wrapped[NONCE_LEN..].to_vec();
    let opened = kek
        .cipher()
        .open_in_place(nonce, &wrap_aad(key_id, purpose), &mut plain);
    let mut key = [0u8; KEY_LEN];
    if opened.is_ok() {
        key.copy_from_slice(&plain[..KEY_LEN]);
    }
    plain.fill(0); // the data key's bytes, besides the copy returned
    opened?;
    Ok(SecretKey(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    #[test]
    fn parses_hex_with_trailing_newline() {
        let key = parse_master_key_hex(&format!("{HEX}\n")).unwrap();
        assert_eq!(key.0[31], 0x1f);
        assert_eq!(parse_master_key_hex(&HEX.to_uppercase()).unwrap().0, key.0);
    }

    #[test]
    fn rejects_malformed_keys() {
        for bad in [
            "",
            "00",
            &HEX[..63],
            &format!("{HEX}00"),
            &format!("zz{}", &HEX[2..]),
        ] {
            assert_eq!(parse_master_key_hex(bad).unwrap_err(), Error::BadMasterKey);
        }
    }

    #[test]
    fn kek_matches_an_independent_hkdf_computation() {
        // HKDF by hand from HMAC (RFC 5869 section 2): PRK = HMAC(salt, IKM); T1 = HMAC(PRK, info || 0x01).
        use hmac::{Hmac, Mac};
        let master = parse_master_key_hex(HEX).unwrap();
        let mut prk = Hmac::<Sha256>::new_from_slice(KEK_SALT).unwrap();
        prk.update(&master.0);
        let prk = prk.finalize().into_bytes();
        let mut t1 = Hmac::<Sha256>::new_from_slice(&prk).unwrap();
        t1.update(KEK_INFO);
        t1.update(&[1]);
        assert_eq!(derive_kek(&master).0[..], t1.finalize().into_bytes()[..]);
    }

    /// RFC 5869 appendix A, test cases 1-3 (SHA-256).
    #[test]
    fn hkdf_rfc5869_vectors() {
        let cases: [(&str, &str, &str, &str); 3] = [
            (
                "0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b",
                "000102030405060708090a0b0c",
                "f0f1f2f3f4f5f6f7f8f9",
                "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865",
            ),
            (
                "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f404142434445464748494a4b4c4d4e4f",
                "606162636465666768696a6b6c6d6e6f707172737475767778797a7b7c7d7e7f808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9fa0a1a2a3a4a5a6a7a8a9aaabacadaeaf",
                "b0b1b2b3b4b5b6b7b8b9babbbcbdbebfc0c1c2c3c4c5c6c7c8c9cacbcccdcecfd0d1d2d3d4d5d6d7d8d9dadbdcdddedfe0e1e2e3e4e5e6e7e8e9eaebecedeeeff0f1f2f3f4f5f6f7f8f9fafbfcfdfeff",
                "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c59045a99cac7827271cb41c65e590e09da3275600c2f09b8367793a9aca3db71cc30c58179ec3e87c14c01d5c1f3434f1d87",
            ),
            (
                "0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b",
                "",
                "",
                "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8",
            ),
        ];
        for (ikm, salt, info, okm) in cases {
            let (ikm, salt, info, okm) = (
                hex::decode(ikm).unwrap(),
                hex::decode(salt).unwrap(),
                hex::decode(info).unwrap(),
                hex::decode(okm).unwrap(),
            );
            let mut out = vec![0u8; okm.len()];
            Hkdf::<Sha256>::new(Some(&salt), &ikm)
                .expand(&info, &mut out)
                .unwrap();
            assert_eq!(out, okm);
        }
    }

    #[test]
    fn the_key_check_tells_keys_apart_and_is_not_the_kek() {
        let master = parse_master_key_hex(HEX).unwrap();
        let check = key_check(&master);
        assert_eq!(check, key_check(&master));
        assert_ne!(check, key_check(&SecretKey([1u8; 32])));
        assert_ne!(check[..], derive_kek(&master).0[..8]);
    }

    #[test]
    fn wrapped_keys_are_bound_to_id_and_purpose() {
        let kek = derive_kek(&parse_master_key_hex(HEX).unwrap());
        let dek = SecretKey([9u8; 32]);
        let wrapped = wrap_dek(&kek, 3, "phi", &dek).unwrap();
        assert_eq!(wrapped.len(), 12 + 32 + 16);
        assert_eq!(unwrap_dek(&kek, 3, "phi", &wrapped).unwrap().0, dek.0);
        assert_eq!(
            unwrap_dek(&kek, 4, "phi", &wrapped).unwrap_err(),
            Error::Authentication
        );
        assert_eq!(
            unwrap_dek(&kek, 3, "token", &wrapped).unwrap_err(),
            Error::Authentication
        );
        let other_kek = derive_kek(&SecretKey([1u8; 32]));
        assert_eq!(
            unwrap_dek(&other_kek, 3, "phi", &wrapped).unwrap_err(),
            Error::Authentication
        );
        assert_eq!(
            unwrap_dek(&kek, 3, "phi", &wrapped[1..]).unwrap_err(),
            Error::Malformed
        );
    }
}
