//! In-process tests of the Rust/SQL boundary, run inside a real backend by `cargo pgrx test`
//! (`make pg-test`): envelopes through SPI, the key cache and its invalidation, the audit writer
//! and row trigger, settings. Each test runs in a transaction that is rolled back. Behaviour seen
//! by the application's roles is tested by `tests/regress` and `tests/integration`.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    fn one<T: IntoDatum + FromDatum>(sql: &str) -> T {
        Spi::get_one::<T>(sql)
            .expect("query runs")
            .expect("query returns a value")
    }

    #[pg_test]
    fn an_envelope_round_trips_through_spi() {
        let plain: String = one(
            "SELECT vetassist_auth.decrypt_text(vetassist_auth.encrypt_text('discharge note', 'notes.body:7'), 'notes.body:7')",
        );
        assert_eq!(plain, "discharge note");
        // Version byte, key id, nonce, ciphertext and tag: 1 + 4 + 12 + 14 + 16 bytes.
        let length: i32 =
            one("SELECT length(vetassist_auth.encrypt_text('discharge note', 'notes.body:7'))");
        assert_eq!(length, 47);
    }

    #[pg_test(
        error = "vetassist_auth: ciphertext cannot be decrypted (wrong key or context, or damaged data)"
    )]
    fn an_envelope_under_another_context_does_not_open() {
        Spi::run(
            "SELECT vetassist_auth.decrypt_text(vetassist_auth.encrypt_text('note', 'notes.body:7'), 'notes.body:8')",
        )
        .unwrap();
    }

    #[pg_test]
    fn a_rotation_is_seen_by_the_next_encryption_in_the_same_backend() {
        let before: i32 =
            one("SELECT vetassist_auth.envelope_key_id(vetassist_auth.encrypt('x', 'notes.a:1'))");
        let rotated: i32 = one("SELECT vetassist_auth.rotate_key('phi')");
        let after: i32 =
            one("SELECT vetassist_auth.envelope_key_id(vetassist_auth.encrypt('x', 'notes.a:1'))");
        assert_ne!(before, rotated);
        assert_eq!(after, rotated);
        // The old key still decrypts what it wrote: it is decrypt_only, and cached again on demand.
        let status: String = one(&format!(
            "SELECT status FROM vetassist_auth.keys WHERE key_id = {before}"
        ));
        assert_eq!(status, "decrypt_only");
    }

    #[pg_test]
    fn the_keys_table_takes_exactly_the_purposes_the_library_knows() {
        let check: String = one(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'keys_purpose_check'",
        );
        let names = crate::keys::Purpose::ALL.map(|p| format!("'{}'", p.as_str()));
        assert_eq!(check.matches('\'').count(), 2 * names.len(), "{check}");
        for name in names {
            assert!(check.contains(&name), "{check} lacks {name}");
        }
    }

    #[pg_test]
    fn field_hashes_match_across_normalization_and_carry_their_key_id() {
        let same: bool = one(
            "SELECT vetassist_auth.field_hash(' Maria@Example.org ', 'email') = vetassist_auth.field_hash('maria@example.org', 'email')",
        );
        assert!(same);
        let key_id: i32 =
            one("SELECT vetassist_auth.hash_key_id(vetassist_auth.field_hash('x', 'email'))");
        let active: i32 = one("SELECT vetassist_auth.active_key_id('hash')");
        assert_eq!(key_id, active);
    }

    #[pg_test]
    fn the_writer_appends_a_row_with_the_actor() {
        Spi::run("SELECT vetassist_auth.set_actor('6b0c1f7e-3a57-4d6e-9a55-0d8c3c1f2a10')")
            .unwrap();
        let id: i64 =
            one("SELECT vetassist_auth.audit_event('phi', 'record_viewed', 'success', '{\"page\": \"meds\"}')");
        let row: String = one(&format!(
            "SELECT concat_ws(' ', actor_user_id, category, event_type, outcome, details->>'page') \
             FROM vetassist_auth.audit_log WHERE id = {id}"
        ));
        assert_eq!(
            row,
            "6b0c1f7e-3a57-4d6e-9a55-0d8c3c1f2a10 phi record_viewed success meds"
        );
    }

    #[pg_test]
    fn the_row_trigger_records_changes_without_redacted_values() {
        Spi::run("CREATE TABLE public.prescriptions (id int PRIMARY KEY, drug text, notes text)")
            .unwrap();
        Spi::run("SELECT vetassist_auth.enable_row_audit('public.prescriptions', redact => ARRAY['notes'])")
            .unwrap();
        Spi::run("INSERT INTO public.prescriptions VALUES (1, 'sertraline', 'private words')")
            .unwrap();
        Spi::run("UPDATE public.prescriptions SET drug = 'bupropion' WHERE id = 1").unwrap();
        let changes: String = one(
            "SELECT string_agg(event_type || ':' || details::text, ' | ' ORDER BY id) FROM vetassist_auth.audit_log \
             WHERE target_table = 'public.prescriptions' AND category = 'data'",
        );
        assert!(changes.contains("bupropion"), "{changes}");
        assert!(!changes.contains("private words"), "{changes}");
    }

    #[pg_test]
    fn session_settings_reach_sql() {
        let default: String = one("SELECT vetassist_auth.session_idle_timeout()::text");
        assert_eq!(default, "00:15:00");
        Spi::run("SET vetassist_auth.session_idle_timeout = '5min'").unwrap();
        let changed: String = one("SELECT vetassist_auth.session_idle_timeout()::text");
        assert_eq!(changed, "00:05:00");
    }

    #[pg_test(error = "vetassist_auth: this context is reserved for the extension's own columns")]
    fn the_public_encrypt_refuses_an_extension_column_context() {
        Spi::run("SELECT vetassist_auth.encrypt_text('x', 'users.email:6b0c1f7e-3a57-4d6e-9a55-0d8c3c1f2a10')")
            .unwrap();
    }
}
