//! The floor under `encrypt`/`decrypt`: ring's AES-256-GCM alone sealing and opening the same
//! sizes with the same associated data, no PostgreSQL. `make bench` prints our distance to it.
//! Prints `<operation> <bytes> <µs per call>` lines, best of several rounds.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use std::hint::black_box;
use std::time::Instant;

const CALLS: u32 = 200_000;
const ROUNDS: u32 = 7;

fn best_us(mut call: impl FnMut()) -> f64 {
    (0..ROUNDS)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..CALLS {
                call();
            }
            start.elapsed().as_secs_f64() * 1e6 / f64::from(CALLS)
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[7u8; 32]).unwrap());
    let aad = b"\x01\x00\x00\x00\x01bench";
    for size in [1024usize, 64] {
        let plaintext = vec![0x5au8; size];
        let mut counter = 0u64;
        let encrypt = best_us(|| {
            counter += 1;
            let mut nonce = [0u8; 12];
            nonce[..8].copy_from_slice(&counter.to_le_bytes());
            let mut buffer = plaintext.clone();
            let tag = key
                .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut buffer)
                .unwrap();
            black_box((buffer, tag));
        });
        let mut sealed = plaintext.clone();
        let tag = key
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key([1; 12]), Aad::from(aad), &mut sealed)
            .unwrap();
        sealed.extend_from_slice(tag.as_ref());
        let decrypt = best_us(|| {
            let mut buffer = sealed.clone();
            let plaintext = key
                .open_in_place(Nonce::assume_unique_for_key([1; 12]), Aad::from(aad), &mut buffer)
                .unwrap();
            black_box(plaintext);
        });
        println!("encrypt {size} {encrypt:.3}");
        println!("decrypt {size} {decrypt:.3}");
    }
}
