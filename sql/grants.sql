-- Runs last: nothing is executable by PUBLIC, then each role gets exactly its API.

DO $revoke$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN SELECT p.oid FROM pg_catalog.pg_proc p WHERE p.pronamespace = 'vetassist_auth'::regnamespace LOOP
        EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
    END LOOP;
END
$revoke$;

REVOKE ALL ON ALL TABLES IN SCHEMA vetassist_auth FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA vetassist_auth FROM PUBLIC;

-- The application.
GRANT EXECUTE ON FUNCTION
    vetassist_auth.encrypt(bytea, text),
    vetassist_auth.decrypt(bytea, text),
    vetassist_auth.encrypt_text(text, text),
    vetassist_auth.decrypt_text(bytea, text),
    vetassist_auth.field_hash(text, text),
    vetassist_auth.field_hashes(text, text),
    vetassist_auth.set_actor(uuid, text),
    vetassist_auth.audit_event(text, text, text, jsonb),
    vetassist_auth.upsert_va_user(text, text, text, text, text),
    vetassist_auth.find_user_by_icn(text),
    vetassist_auth.find_users_by_email(text),
    vetassist_auth.user_profile(uuid),
    vetassist_auth.deactivate_user(uuid, text),
    vetassist_auth.store_va_tokens(uuid, text, text, timestamptz, text),
    vetassist_auth.va_access_token(uuid),
    vetassist_auth.va_refresh_token(uuid),
    vetassist_auth.va_tokens_due(interval),
    vetassist_auth.delete_va_tokens(uuid),
    vetassist_auth.create_session(uuid, text, timestamptz, inet, text, text, jsonb),
    vetassist_auth.touch_session(text),
    vetassist_auth.session_status(text),
    vetassist_auth.end_session(text, text),
    vetassist_auth.end_user_sessions(uuid, text),
    vetassist_auth.lock_session(text, text),
    vetassist_auth.rotate_session_refresh_token(text, text, text),
    vetassist_auth.refresh_session_token(text, text, text),
    vetassist_auth.log_session_event(text, text, text, jsonb),
    vetassist_auth.verify_crisis_notice(text),
    vetassist_auth.expire_sessions(integer),
    vetassist_auth.mfa_enroll_totp(uuid),
    vetassist_auth.mfa_confirm_totp(uuid, text),
    vetassist_auth.mfa_verify(text, text),
    vetassist_auth.mfa_generate_backup_codes(uuid, integer),
    vetassist_auth.mfa_trust_device(text, integer),
    vetassist_auth.mfa_trusted_devices(uuid),
    vetassist_auth.mfa_revoke_device(uuid, uuid),
    vetassist_auth.mfa_required(text),
    vetassist_auth.mfa_disable(uuid),
    vetassist_auth.node_role()
TO vetassist_app;

-- Key administration.
GRANT EXECUTE ON FUNCTION
    vetassist_auth.rotate_key(text),
    vetassist_auth.reencrypt(integer),
    vetassist_auth.key_usage_summary(),
    vetassist_auth.rewrap_keys(text),
    vetassist_auth.unretire_key(integer),
    vetassist_auth.resync_sequences(),
    vetassist_auth.promote(),
    vetassist_auth.node_role(),
    vetassist_auth.destroy_key(integer),
    vetassist_auth.verify_installation(),
    vetassist_auth.deactivate_user(uuid, text),
    vetassist_auth.end_user_sessions(uuid, text),
    vetassist_auth.expire_sessions(integer),
    vetassist_auth.mfa_disable(uuid),
    vetassist_auth.seal_audit_log(integer),
    vetassist_auth.audit_seal_status(),
    vetassist_auth.audit_chain_head(),
    vetassist_auth.verify_audit_chain(),
    vetassist_auth.verify_audit_chain(bigint, bytea),
    vetassist_auth.verify_audit_chain(bigint, bytea, integer, text),
    vetassist_auth.purge_audit_log(interval),
    vetassist_auth.enable_row_audit(regclass, text[], text[]),
    vetassist_auth.disable_row_audit(regclass),
    vetassist_auth.set_actor(uuid, text),
    vetassist_auth.audit_event(text, text, text, jsonb),
    vetassist_auth.protected_columns(),
    vetassist_auth.distribute(integer),
    vetassist_auth.veteran_placement(uuid),
    vetassist_auth.seal_worker_audit_logs(integer),
    vetassist_auth.audit_chain_heads(),
    vetassist_auth.verify_audit_chain_at(text, bigint, bytea)
TO vetassist_admin;
GRANT SELECT (key_id, purpose, status, created_at, retired_at, encrypt_count, retire_after, destroyed_at) ON vetassist_auth.keys TO vetassist_admin;

-- Auditors read the trail and check the installation.
GRANT SELECT ON vetassist_auth.audit_log, vetassist_auth.audit_seals TO vetassist_auditor;
GRANT EXECUTE ON FUNCTION
    vetassist_auth.verify_installation(),
    vetassist_auth.verify_audit_chain(),
    vetassist_auth.verify_audit_chain(bigint, bytea),
    vetassist_auth.verify_audit_chain(bigint, bytea, integer, text),
    vetassist_auth.audit_seal_status(),
    vetassist_auth.audit_chain_head(),
    vetassist_auth.phi_disclosures(uuid, timestamptz, timestamptz),
    vetassist_auth.protected_columns(),
    vetassist_auth.audit_chain_heads(),
    vetassist_auth.verify_audit_chain_at(text, bigint, bytea),
    vetassist_auth.node_role()
TO vetassist_auditor;

-- Last, so that the install's own CREATE TRIGGERs are not audited (a fresh install writes no
-- audit row, and a data-only restore into it finds the ids free): from here on every change to
-- a row-audited table's triggers is (audit.sql, audit_table_altered).
CREATE EVENT TRIGGER vetassist_auth_audited_table_altered ON ddl_command_end
    WHEN TAG IN ('ALTER TABLE', 'CREATE TRIGGER', 'ALTER TRIGGER')
    EXECUTE FUNCTION vetassist_auth.audit_table_altered();
CREATE EVENT TRIGGER vetassist_auth_row_audit_dropped ON sql_drop
    EXECUTE FUNCTION vetassist_auth.audit_row_audit_dropped();
