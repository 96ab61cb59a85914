//! The audit HMAC chain (docs/ARCHITECTURE.md, "Audit chain"): each seal commits to the previous one and to the
//! exact text of one audit row, so editing, deleting, inserting or reordering rows or seals
//! breaks every later link.

use hmac::{Hmac, Mac};
use sha2::Sha256;

pub const GENESIS: [u8; 32] = [0u8; 32];

/// hash = HMAC-SHA256(audit key, prev_hash || UTF-8(to_jsonb(row)::text)).
pub fn link(audit_key: &[u8; 32], prev_hash: &[u8], row_json: &str) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(audit_key).expect("HMAC takes any key length");
    mac.update(prev_hash);
    mac.update(row_json.as_bytes());
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_link_depends_on_key_previous_hash_and_row() {
        let key = [7u8; 32];
        let first = link(&key, &GENESIS, r#"{"id": 1}"#);
        assert_eq!(first, link(&key, &GENESIS, r#"{"id": 1}"#));
        assert_ne!(first, link(&key, &GENESIS, r#"{"id": 2}"#));
        assert_ne!(first, link(&[8u8; 32], &GENESIS, r#"{"id": 1}"#));
        let second = link(&key, &first, r#"{"id": 2}"#);
        assert_ne!(second, link(&key, &GENESIS, r#"{"id": 2}"#));
    }

    #[test]
    fn matches_hmac_over_the_concatenation() {
        let key = [1u8; 32];
        let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
        mac.update(&[0u8; 32]);
        mac.update(b"row");
        assert_eq!(
            link(&key, &GENESIS, "row")[..],
            mac.finalize().into_bytes()[..]
        );
    }
}
