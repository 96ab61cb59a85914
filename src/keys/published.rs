//! The master keys that the postmaster loads with `master_key_command` and
//! `previous_master_key_command` (docs/ARCHITECTURE.md, "The master key from a command"): run at
//! server start and at every reload by the postmaster alone, and published in shared memory,
//! which every backend reads once per transaction. A reload's new key is in force in every
//! backend from its next transaction: the postmaster runs the command before it signals them.

use super::command::{self, Outcome, Why};
use crate::crypto;
use crate::gucs;
use pgrx::prelude::*;
use std::ffi::CStr;
use std::sync::atomic::{fence, AtomicPtr, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Which of the two command settings.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Which {
    Current = 0,
    Previous = 1,
}

impl Which {
    pub fn setting(self) -> &'static str {
        match self {
            Which::Current => "vetassist_auth.master_key_command",
            Which::Previous => "vetassist_auth.previous_master_key_command",
        }
    }
}

/// A label a command printed (`kms_key_id=`, `kms_key_version=`), at most LABEL_LIMIT bytes.
#[derive(Clone, Copy)]
pub struct Label {
    len: u8,
    bytes: [u8; command::LABEL_LIMIT],
}

impl Label {
    const NONE: Label = Label {
        len: 0,
        bytes: [0; command::LABEL_LIMIT],
    };

    fn new(text: Option<&str>) -> Label {
        let mut label = Label::NONE;
        if let Some(text) = text {
            let len = text.len().min(command::LABEL_LIMIT);
            label.bytes[..len].copy_from_slice(&text.as_bytes()[..len]);
            label.len = len as u8;
        }
        label
    }

    pub fn get(&self) -> Option<&str> {
        let text = std::str::from_utf8(&self.bytes[..usize::from(self.len)]).ok()?;
        (!text.is_empty()).then_some(text)
    }
}

/// What the postmaster last published for one setting.
#[derive(Clone, Copy)]
pub struct Published {
    /// A random id of the load in force (audit rows name it); 0: no key.
    pub load: u64,
    pub key: [u8; crypto::KEY_LEN],
    /// When the key in force was loaded (TimestampTz).
    pub loaded_at: i64,
    /// The last run that gave no key, and when; a key may still be in force after it.
    pub failure: Option<(Why, i64)>,
    pub kms_key_id: Label,
    pub kms_key_version: Label,
}

impl Published {
    pub const NOTHING: Published = Published {
        load: 0,
        key: [0; crypto::KEY_LEN],
        loaded_at: 0,
        failure: None,
        kms_key_id: Label::NONE,
        kms_key_version: Label::NONE,
    };

    pub fn has_key(&self) -> bool {
        self.load != 0
    }
}

// Shared memory: one seqlock-protected record per setting, written by the postmaster only.

const RECORD_BYTES: usize = 8 * 3 + crypto::KEY_LEN + 1 + 4 + 2 * (1 + command::LABEL_LIMIT);
const WORDS: usize = RECORD_BYTES.div_ceil(8);
/// Databases whose recorder has recorded the load in force (key custody), by database oid modulo
/// this: a hint that saves a job, never a reason to skip one wrongly (the entry holds a hash of
/// the database and the load).
const CUSTODY_MEMO: usize = 64;

struct Slot {
    /// Odd while the postmaster writes.
    seq: AtomicU64,
    words: [AtomicU64; WORDS],
}

struct Shared {
    slots: [Slot; 2],
    custody_memo: [AtomicU64; CUSTODY_MEMO],
}

pub const SHMEM_SIZE: usize = std::mem::size_of::<Shared>();

static SHARED: AtomicPtr<Shared> = AtomicPtr::new(std::ptr::null_mut());

/// The postmaster's own copy: what it last published, and the commands it was given. Backends
/// forked later inherit it but never read it.
struct PostmasterState {
    published: [Published; 2],
    commands: [Option<String>; 2],
    ran_once: bool,
}

static POSTMASTER: Mutex<PostmasterState> = Mutex::new(PostmasterState {
    published: [Published::NOTHING; 2],
    commands: [None, None],
    ran_once: false,
});

fn encode(p: &Published) -> [u64; WORDS] {
    let mut bytes = [0u8; WORDS * 8];
    let mut at = 0;
    let mut put = |data: &[u8]| {
        bytes[at..at + data.len()].copy_from_slice(data);
        at += data.len();
    };
    let (why, value, failed_at) = match p.failure {
        Some((why, at)) => {
            let (kind, value) = why.encode();
            (kind, value, at)
        }
        None => (0, 0, 0),
    };
    put(&p.load.to_le_bytes());
    put(&p.key);
    put(&p.loaded_at.to_le_bytes());
    put(&failed_at.to_le_bytes());
    put(&[why]);
    put(&value.to_le_bytes());
    for label in [&p.kms_key_id, &p.kms_key_version] {
        put(&[label.len]);
        put(&label.bytes);
    }
    let mut words = [0u64; WORDS];
    for (word, chunk) in words.iter_mut().zip(bytes.chunks_exact(8)) {
        *word = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
    }
    bytes.fill(0);
    words
}

fn decode(words: &[u64; WORDS]) -> Published {
    let mut bytes = [0u8; WORDS * 8];
    for (chunk, word) in bytes.chunks_exact_mut(8).zip(words) {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    let (mut key, mut labels) = ([0u8; crypto::KEY_LEN], [Label::NONE; 2]);
    let (load, loaded_at, failed_at, why, value);
    {
        // Slices of `bytes`, read in the order `encode` wrote them; no copy but the fields'.
        let mut rest = &bytes[..];
        let mut take = |n: usize| {
            let (field, tail) = rest.split_at(n);
            rest = tail;
            field
        };
        let u64_of = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
        load = u64_of(take(8));
        key.copy_from_slice(take(crypto::KEY_LEN));
        loaded_at = u64_of(take(8)) as i64;
        failed_at = u64_of(take(8)) as i64;
        why = take(1)[0];
        value = i32::from_le_bytes(take(4).try_into().expect("4 bytes"));
        for label in labels.iter_mut() {
            label.len = take(1)[0].min(command::LABEL_LIMIT as u8);
            label.bytes.copy_from_slice(take(command::LABEL_LIMIT));
        }
    }
    bytes.fill(0);
    Published {
        load,
        key,
        loaded_at,
        failure: Why::decode(why, value).map(|why| (why, failed_at)),
        kms_key_id: labels[0],
        kms_key_version: labels[1],
    }
}

fn shared() -> Option<&'static Shared> {
    // SAFETY: set once by attach_shared to memory that lives as long as the process.
    unsafe { SHARED.load(Ordering::Acquire).as_ref() }
}

/// Finds (or creates) the shared records; called by the shared-memory start-up hook. In the
/// postmaster it then runs the commands (the first time) and publishes what they gave.
///
/// # Safety
/// Only from that hook, with AddinShmemInitLock held.
pub unsafe fn attach_shared() {
    // SAFETY: see the function's contract; the struct is initialised only by its creator, and an
    // all-zero record decodes as "never published".
    unsafe {
        let mut found = false;
        let shared = pg_sys::ShmemInitStruct(
            c"vetassist_auth master keys".as_ptr(),
            SHMEM_SIZE,
            &mut found,
        ) as *mut Shared;
        if !found {
            std::ptr::write_bytes(shared as *mut u8, 0, SHMEM_SIZE);
        }
        SHARED.store(shared, Ordering::Release);
        if !pg_sys::IsUnderPostmaster {
            let mut state = POSTMASTER.lock().unwrap_or_else(|e| e.into_inner());
            // After a crash restart the keys are published again, not loaded again.
            if !state.ran_once {
                state.ran_once = true;
                for which in [Which::Current, Which::Previous] {
                    load(&mut state, which);
                }
            }
            for which in [Which::Current, Which::Previous] {
                publish(which, &state.published[which as usize]);
            }
        }
    }
}

fn publish(which: Which, record: &Published) {
    let Some(shared) = shared() else { return };
    let slot = &shared.slots[which as usize];
    let words = encode(record);
    // One writer (the postmaster): odd while writing, even and larger once done.
    slot.seq.fetch_add(1, Ordering::Relaxed);
    fence(Ordering::Release);
    for (cell, word) in slot.words.iter().zip(words) {
        cell.store(word, Ordering::Relaxed);
    }
    slot.seq.fetch_add(1, Ordering::Release);
}

/// What the postmaster published for `which`; None when nothing can be (the library is not
/// preloaded).
pub fn read(which: Which) -> Option<Published> {
    let slot = &shared()?.slots[which as usize];
    loop {
        let before = slot.seq.load(Ordering::Acquire);
        if before % 2 == 1 {
            std::hint::spin_loop();
            continue;
        }
        let mut words = [0u64; WORDS];
        for (word, cell) in words.iter_mut().zip(&slot.words) {
            *word = cell.load(Ordering::Relaxed);
        }
        fence(Ordering::Acquire);
        if slot.seq.load(Ordering::Relaxed) == before {
            let record = decode(&words);
            words.fill(0);
            return Some(record);
        }
    }
}

/// The assign hook of the two command settings: in the postmaster, once shared memory exists (a
/// reload), runs the command and publishes the outcome; at server start it only notes the
/// command, which the shared-memory start-up hook runs (`postgres -C` loads the library too and
/// must not call a KMS). Never raises: an assign hook must not fail.
pub fn assigned(which: Which, command: Option<&CStr>) {
    // SAFETY: reads a process-wide flag.
    if unsafe { pg_sys::IsUnderPostmaster } {
        return; // backends never run it
    }
    let mut state = POSTMASTER.lock().unwrap_or_else(|e| e.into_inner());
    state.commands[which as usize] = command
        .and_then(|c| c.to_str().ok())
        .filter(|c| !c.trim().is_empty())
        .map(str::to_owned);
    if shared().is_some() && state.ran_once {
        load(&mut state, which);
        publish(which, &state.published[which as usize]);
    }
}

/// Runs one command (or clears its key when unset) and logs what happened, never what it
/// printed.
fn load(state: &mut PostmasterState, which: Which) {
    let old = state.published[which as usize];
    let mut new = old;
    let setting = which.setting();
    match state.commands[which as usize].clone() {
        None => {
            if old.has_key() {
                pgrx::log!("vetassist_auth: {setting} is unset; the master key it loaded is no longer in force");
            }
            new = Published::NOTHING;
        }
        Some(text) => {
            let timeout = Duration::from_secs(gucs::MASTER_KEY_COMMAND_TIMEOUT.get().max(1) as u64);
            match command::run(&text, timeout) {
                Outcome::Key {
                    key,
                    kms_key_id,
                    kms_key_version,
                } => {
                    new.load = new_load_id();
                    new.key = key.0;
                    new.loaded_at = now();
                    new.failure = None;
                    new.kms_key_id = Label::new(kms_key_id.as_deref());
                    new.kms_key_version = Label::new(kms_key_version.as_deref());
                    let check = hex::encode(crypto::key_check(&key));
                    pgrx::log!(
                        "vetassist_auth: {setting} loaded the master key (key check {check}{})",
                        kms_label(&new)
                    );
                }
                Outcome::Unreachable(why) if old.has_key() => {
                    new.failure = Some((why, now()));
                    pgrx::warning!(
                        "vetassist_auth: {setting} {why}; the master key it loaded before stays in force"
                    );
                }
                Outcome::Unreachable(why) | Outcome::Refused(why) => {
                    new = Published {
                        failure: Some((why, now())),
                        ..Published::NOTHING
                    };
                    pgrx::warning!(
                        "vetassist_auth: {setting} {why}; there is no master key from it until a reload loads one"
                    );
                }
            }
        }
    }
    state.published[which as usize] = new;
}

/// ", KMS key transit/vetassist version 2" when the command named them.
pub fn kms_label(p: &Published) -> String {
    let mut text = String::new();
    if let Some(id) = p.kms_key_id.get() {
        text.push_str(&format!(", KMS key {id}"));
    }
    if let Some(version) = p.kms_key_version.get() {
        text.push_str(&format!(" version {version}"));
    }
    text
}

fn new_load_id() -> u64 {
    let mut bytes = [0u8; 8];
    // A load id only tells loads apart; a clock-derived one is enough if the OS RNG fails.
    if crypto::fill_random(&mut bytes).is_err() {
        bytes = now().to_le_bytes();
    }
    u64::from_le_bytes(bytes).max(1)
}

fn now() -> i64 {
    // SAFETY: reads the clock.
    unsafe { pg_sys::GetCurrentTimestamp() }
}

fn memo_entry(database: pg_sys::Oid, load: u64) -> (usize, u64) {
    let id = database.to_u32();
    let mixed = load ^ (u64::from(id)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((id as usize) % CUSTODY_MEMO, mixed.max(1))
}

/// Whether this database's recorder has already recorded load `load`.
pub fn custody_recorded(database: pg_sys::Oid, load: u64) -> bool {
    let (at, value) = memo_entry(database, load);
    shared().is_some_and(|s| s.custody_memo[at].load(Ordering::Relaxed) == value)
}

/// Notes that this database's custody row for `load` exists.
pub fn note_custody_recorded(database: pg_sys::Oid, load: u64) {
    let (at, value) = memo_entry(database, load);
    if let Some(shared) = shared() {
        shared.custody_memo[at].store(value, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_survives_its_encoding() {
        let record = Published {
            load: 0xdead_beef,
            key: [5; 32],
            loaded_at: -3,
            failure: Some((Why::Status(75), 42)),
            kms_key_id: Label::new(Some("transit/vetassist")),
            kms_key_version: Label::new(Some(&"9".repeat(200))),
        };
        let back = decode(&encode(&record));
        assert_eq!(
            (back.load, back.key, back.loaded_at),
            (0xdead_beef, [5; 32], -3)
        );
        assert_eq!(back.failure, Some((Why::Status(75), 42)));
        assert_eq!(back.kms_key_id.get(), Some("transit/vetassist"));
        assert_eq!(
            back.kms_key_version.get().map(str::len),
            Some(command::LABEL_LIMIT)
        );
        assert!(decode(&[0; WORDS]).failure.is_none());
    }
}
