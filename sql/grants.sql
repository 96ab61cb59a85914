-- Runs last: nothing of the extension is executable by PUBLIC. Each role's functions are granted
-- beside them, in the file that defines them; its tables here.

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

-- Key administration: metadata of the keys, never their material.
GRANT SELECT (key_id, purpose, status, created_at, retired_at, encrypt_count, retire_after, destroyed_at) ON vetassist_auth.keys TO vetassist_admin;

-- Auditors read the trail.
GRANT SELECT ON vetassist_auth.audit_log, vetassist_auth.audit_seals TO vetassist_auditor;

-- Last, so that the install's own CREATE TRIGGERs are not audited (a fresh install writes no
-- audit row, and a data-only restore into it finds the ids free): from here on every change to
-- a row-audited table's triggers is (audit.sql, audit_table_altered).
CREATE EVENT TRIGGER vetassist_auth_audited_table_altered ON ddl_command_end
    WHEN TAG IN ('ALTER TABLE', 'CREATE TRIGGER', 'ALTER TRIGGER')
    EXECUTE FUNCTION vetassist_auth.audit_table_altered();
CREATE EVENT TRIGGER vetassist_auth_row_audit_dropped ON sql_drop
    EXECUTE FUNCTION vetassist_auth.audit_row_audit_dropped();
