//! TOTP (RFC 6238) over HMAC-SHA1 from RustCrypto: 30-second steps, 6 digits, a window of
//! one step either side, and constant-time comparison of the code.

use hmac::{Hmac, Mac};
use sha1::Sha1;
use subtle::ConstantTimeEq;

pub const STEP_SECONDS: u64 = 30;
pub const DIGITS: u32 = 6;
pub const SECRET_LEN: usize = 20; // 160 bits, as RFC 4226 recommends

/// HOTP value (RFC 4226 section 5.3) for one counter, with `digits` decimal digits.
pub fn code(secret: &[u8], counter: u64, digits: u32) -> u32 {
    let mut mac = Hmac::<Sha1>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(&counter.to_be_bytes());
    let digest = mac.finalize().into_bytes();
    let offset = (digest[19] & 0x0f) as usize;
    let binary = u32::from_be_bytes([
        digest[offset] & 0x7f,
        digest[offset + 1],
        digest[offset + 2],
        digest[offset + 3],
    ]);
    binary % 10u32.pow(digits)
}

/// The zero-padded text of a code, as an authenticator app shows it.
pub fn code_text(secret: &[u8], counter: u64) -> String {
    format!(
        "{:0width$}",
        code(secret, counter, DIGITS),
        width = DIGITS as usize
    )
}

/// The time step of a Unix time.
pub fn step_at(unix_seconds: u64) -> u64 {
    unix_seconds / STEP_SECONDS
}

/// The step (now - 1, now or now + 1) whose code matches, skipping steps at or before
/// `last_used` so that a code is never accepted twice. Every candidate is compared, in
/// constant time, whether or not an earlier one matched.
pub fn matching_step(
    secret: &[u8],
    presented: &str,
    now: u64,
    last_used: Option<u64>,
) -> Option<u64> {
    let presented = presented.as_bytes();
    if presented.len() != DIGITS as usize || !presented.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut found = None;
    for step in now.saturating_sub(1)..=now + 1 {
        let expected = code_text(secret, step);
        let same: bool = expected.as_bytes().ct_eq(presented).into();
        let fresh = last_used.is_none_or(|used| step > used);
        if same && fresh && found.is_none() {
            found = Some(step);
        }
    }
    found
}

/// The `otpauth://` URI that authenticator apps read (Key Uri Format), secret in base32.
pub fn otpauth_uri(secret: &[u8], issuer: &str, account: &str) -> String {
    let enc = |s: &str| -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'@' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect()
    };
    format!(
        "otpauth://totp/{}:{}?secret={}&issuer={}&algorithm=SHA1&digits={DIGITS}&period={STEP_SECONDS}",
        enc(issuer),
        enc(account),
        data_encoding::BASE32_NOPAD.encode(secret),
        enc(issuer)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6238 appendix B, SHA-1 rows (secret "12345678901234567890", 8 digits).
    const VECTORS: [(u64, u32); 6] = [
        (59, 94287082),
        (1111111109, 7081804),
        (1111111111, 14050471),
        (1234567890, 89005924),
        (2000000000, 69279037),
        (20000000000, 65353130),
    ];
    const SECRET: &[u8] = b"12345678901234567890";

    #[test]
    fn rfc6238_appendix_b_eight_digits() {
        for (time, expected) in VECTORS {
            assert_eq!(code(SECRET, step_at(time), 8), expected, "T = {time}");
        }
    }

    #[test]
    fn rfc6238_appendix_b_six_digits() {
        for (time, expected) in VECTORS {
            assert_eq!(
                code(SECRET, step_at(time), 6),
                expected % 1_000_000,
                "T = {time}"
            );
            assert_eq!(code_text(SECRET, step_at(time)).len(), 6);
        }
    }

    #[test]
    fn window_is_one_step_either_side() {
        let now = step_at(1_700_000_000);
        for (offset, accepted) in [(-2i64, false), (-1, true), (0, true), (1, true), (2, false)] {
            let presented = code_text(SECRET, (now as i64 + offset) as u64);
            let got = matching_step(SECRET, &presented, now, None);
            // A code of another step could collide by chance; then it matches that step.
            assert_eq!(
                got.is_some(),
                accepted || got.is_some_and(|s| s.abs_diff(now) <= 1),
                "offset {offset}"
            );
        }
    }

    #[test]
    fn a_step_is_never_accepted_twice() {
        let now = step_at(1_700_000_000);
        let presented = code_text(SECRET, now);
        assert_eq!(matching_step(SECRET, &presented, now, None), Some(now));
        assert_eq!(matching_step(SECRET, &presented, now, Some(now)), None);
        assert_eq!(
            matching_step(SECRET, &code_text(SECRET, now - 1), now, Some(now)),
            None
        );
        assert_eq!(
            matching_step(SECRET, &code_text(SECRET, now + 1), now, Some(now)),
            Some(now + 1)
        );
    }

    #[test]
    fn malformed_codes_never_match() {
        for bad in ["", "12345", "1234567", "12a456", " 123456", "１２３４５６"] {
            assert_eq!(matching_step(SECRET, bad, 1, None), None, "{bad:?}");
        }
    }

    #[test]
    fn otpauth_uri_carries_base32_secret_and_parameters() {
        let uri = otpauth_uri(b"12345678901234567890", "Vet Assist", "vet@example.org");
        assert_eq!(
            uri,
            "otpauth://totp/Vet%20Assist:vet@example.org?secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ&issuer=Vet%20Assist&algorithm=SHA1&digits=6&period=30"
        );
    }
}
