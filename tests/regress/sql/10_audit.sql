-- The tamper-evident audit log, as the roles that use it.
SET ROLE vetassist_app;
CREATE TEMP TABLE vet AS SELECT vetassist_auth.upsert_va_user('1012660000V000010', 'veteran', 'a@example.org', 'Ann', 'Lee') AS id;
GRANT SELECT ON vet TO PUBLIC;
SELECT regress.try('SELECT vetassist_auth.audit_event('''', ''x'', ''success'', ''{}'')') AS empty_category;
SELECT regress.try('SELECT vetassist_auth.audit_event(''app'', ''x'', ''maybe'', ''{}'')') AS bad_outcome;
SELECT regress.try('SELECT vetassist_auth.seal_audit_log()') AS app_cannot_seal;
-- Append-only for everyone.
SELECT regress.try('UPDATE vetassist_auth.audit_log SET outcome = ''success''') AS app_update;
RESET ROLE;
SELECT regress.try('UPDATE vetassist_auth.audit_log SET outcome = ''success''') AS owner_update;
SELECT regress.try('DELETE FROM vetassist_auth.audit_log') AS owner_delete;
SELECT regress.try('TRUNCATE vetassist_auth.audit_log') AS owner_truncate;

-- Row audit: one event per upsert, ciphertexts never copied. (va_tokens is not row-audited by
-- default: its functions write their own events. An administrator can add row events.)
SET ROLE vetassist_admin;
SELECT vetassist_auth.enable_row_audit('vetassist_auth.va_tokens');
RESET ROLE;
SET ROLE vetassist_app;
SELECT vetassist_auth.store_va_tokens(id, 'tok-secret-123', 'ref-secret-456', now() + interval '1 hour', NULL) AS generation FROM vet;
RESET ROLE;
SELECT target_table, event_type, changed_columns @> '{access_token_encrypted}' AS names_ciphertext_column,
       details ? 'new' AS has_new, details->'new' ? 'access_token_encrypted' AS copies_ciphertext
FROM vetassist_auth.audit_log WHERE category = 'data' AND target_table = 'vetassist_auth.va_tokens' ORDER BY id;
SET ROLE vetassist_app;
SELECT vetassist_auth.store_va_tokens(id, 'tok-secret-789', NULL, now() + interval '2 hours', 'openid') AS generation FROM vet;
RESET ROLE;
SELECT event_type, changed_columns FROM vetassist_auth.audit_log
WHERE category = 'data' AND target_table = 'vetassist_auth.va_tokens' ORDER BY id;

-- A table of the application's own, with a redacted column.
CREATE TABLE public.notes (id int PRIMARY KEY, patient uuid, body text, diagnosis text, blob bytea);
SET ROLE vetassist_admin;
SELECT regress.try('SELECT vetassist_auth.enable_row_audit(''public.notes'', ''{no_such_column}'')') AS bad_column;
SELECT vetassist_auth.enable_row_audit('public.notes', '{diagnosis}');
RESET ROLE;
-- The blob is 16 bytes: its hex (searched for below) cannot occur by chance in a UUID or a hash.
INSERT INTO public.notes VALUES (1, NULL, 'first visit', 'PTSD-SECRET-DX', '\xdeadbeefdeadbeefdeadbeefdeadbeef');
INSERT INTO public.notes VALUES (1, NULL, 'upserted', 'PTSD-SECRET-DX2', NULL)
    ON CONFLICT (id) DO UPDATE SET body = excluded.body, diagnosis = excluded.diagnosis;
UPDATE public.notes SET body = body;  -- changes nothing, so logs nothing
-- The same long text stored with other bytes (out of line uncompressed, then compressed inline)
-- is no change. (Storage, not lz4: not every server is built with lz4.)
ALTER TABLE public.notes ALTER COLUMN diagnosis SET STORAGE EXTERNAL;
UPDATE public.notes SET diagnosis = repeat('PTSD-SECRET-DX3 ', 500);
ALTER TABLE public.notes ALTER COLUMN diagnosis SET STORAGE EXTENDED;
UPDATE public.notes SET diagnosis = diagnosis || '';
DELETE FROM public.notes;
SELECT event_type, target_id, changed_columns, details FROM vetassist_auth.audit_log
WHERE target_table = 'public.notes' ORDER BY id;
SELECT count(*) AS redacted_value_anywhere FROM vetassist_auth.audit_log a
WHERE a::text LIKE '%PTSD-SECRET%' OR a::text LIKE '%deadbeefdeadbeefdeadbeefdeadbeef%';
SET ROLE vetassist_admin;
SELECT vetassist_auth.disable_row_audit('public.notes') AS disabled, vetassist_auth.disable_row_audit('public.notes') AS disabled_again;
RESET ROLE;

-- Seal, verify, and what the auditor sees.
SET ROLE vetassist_admin;
SELECT vetassist_auth.seal_audit_log(5) AS sealed_first, vetassist_auth.seal_audit_log(100000) > 0 AS sealed_rest,
       vetassist_auth.seal_audit_log() AS nothing_left;
RESET ROLE;
SET ROLE vetassist_auditor;
SELECT ok, checked = (SELECT count(*) FROM vetassist_auth.audit_seals) AS checked_all, first_bad_seq, problem FROM vetassist_auth.verify_audit_chain();
SELECT count(*) = (SELECT count(*) FROM vetassist_auth.audit_log) AS every_row_sealed FROM vetassist_auth.audit_seals;
RESET ROLE;
SELECT regress.try('UPDATE vetassist_auth.audit_seals SET hash = prev_hash') AS owner_update_seals;
SELECT regress.try('DELETE FROM vetassist_auth.audit_seals') AS owner_delete_seals;
SELECT regress.try('TRUNCATE vetassist_auth.audit_seals') AS owner_truncate_seals;
SET ROLE vetassist_auditor;
SELECT regress.try('SELECT * FROM vetassist_auth.users') AS auditor_reads_users;
SELECT event_type FROM vetassist_auth.phi_disclosures((SELECT id FROM vet), now() - interval '1 day', now() + interval '1 day');
SELECT regress.try('SELECT * FROM vetassist_auth.phi_disclosures(NULL, now(), now())') AS bad_report;
RESET ROLE;
SET ROLE vetassist_app;
SELECT count(*) AS profile_reads FROM vet, vetassist_auth.user_profile(vet.id);
RESET ROLE;
SET ROLE vetassist_auditor;
SELECT event_type FROM vetassist_auth.phi_disclosures((SELECT id FROM vet), now() - interval '1 day', now() + interval '1 day');
RESET ROLE;

-- Tampering (as superuser with triggers off): each kind is found, with the first bad seq.
CREATE TEMP TABLE probe AS SELECT min(seq) + 2 AS seq FROM vetassist_auth.audit_seals;
SET session_replication_role = replica;
BEGIN;
UPDATE vetassist_auth.audit_log SET outcome = 'failure' WHERE id = (SELECT s.audit_id FROM vetassist_auth.audit_seals s, probe WHERE s.seq = probe.seq);
SELECT ok, first_bad_seq - probe.seq AS at_probe, problem LIKE '%was edited%' AS edited FROM vetassist_auth.verify_audit_chain(), probe;
ROLLBACK;
BEGIN;
DELETE FROM vetassist_auth.audit_log WHERE id = (SELECT s.audit_id FROM vetassist_auth.audit_seals s, probe WHERE s.seq = probe.seq);
SELECT ok, first_bad_seq - probe.seq AS at_probe, problem LIKE '%was deleted%' AS deleted FROM vetassist_auth.verify_audit_chain(), probe;
ROLLBACK;
BEGIN;
DELETE FROM vetassist_auth.audit_seals s USING probe WHERE s.seq = probe.seq;
SELECT ok, first_bad_seq - probe.seq AS at_probe, problem LIKE '%missing%' AS seal_missing FROM vetassist_auth.verify_audit_chain(), probe;
ROLLBACK;
BEGIN;
-- Swap two rows' contents (reorder).
UPDATE vetassist_auth.audit_log a SET event_type = b.event_type, details = b.details, category = b.category
FROM vetassist_auth.audit_log b, vetassist_auth.audit_seals sa, vetassist_auth.audit_seals sb, probe
WHERE sa.seq = probe.seq AND sb.seq = probe.seq + 1 AND a.id = sa.audit_id AND b.id = sb.audit_id;
SELECT ok, first_bad_seq - probe.seq AS at_probe FROM vetassist_auth.verify_audit_chain(), probe;
ROLLBACK;
BEGIN;
-- Swap two seals' places in the chain.
UPDATE vetassist_auth.audit_seals s SET seq = CASE WHEN s.seq = probe.seq THEN -1 ELSE s.seq END FROM probe WHERE s.seq = probe.seq;
UPDATE vetassist_auth.audit_seals s SET seq = probe.seq FROM probe WHERE s.seq = probe.seq + 1;
UPDATE vetassist_auth.audit_seals s SET seq = probe.seq + 1 FROM probe WHERE s.seq = -1;
SELECT ok, first_bad_seq - probe.seq AS at_probe, problem LIKE '%does not follow%' AS reordered FROM vetassist_auth.verify_audit_chain(), probe;
ROLLBACK;
BEGIN;
-- A row slipped in among sealed ones (an id below the highest sealed one), with an old timestamp.
INSERT INTO vetassist_auth.audit_log (id, occurred_at, category, event_type, outcome)
SELECT -s.audit_id, now() - interval '1 day', 'identity', 'user_created', 'success' FROM vetassist_auth.audit_seals s, probe WHERE s.seq = probe.seq;
SELECT ok, problem LIKE '%inserted afterwards%' AS inserted FROM vetassist_auth.verify_audit_chain();
ROLLBACK;
SET session_replication_role = origin;
SELECT ok FROM vetassist_auth.verify_audit_chain();

-- Retention: purge everything sealed, keep a checkpoint, the chain still verifies.
SET ROLE vetassist_app;
SELECT regress.try('SELECT vetassist_auth.purge_audit_log(''0''::interval)') AS app_cannot_purge;
RESET ROLE;
SET ROLE vetassist_admin;
SELECT regress.try('SELECT vetassist_auth.purge_audit_log(''-1 day'')') AS negative;
-- Nothing younger than vetassist_auth.audit_min_retention (6 years) leaves; a superuser lowers it.
SELECT regress.try('SELECT vetassist_auth.purge_audit_log(''1 day'')') AS within_retention;
RESET ROLE;
SET vetassist_auth.audit_min_retention = 0;
SET ROLE vetassist_admin;
SELECT vetassist_auth.purge_audit_log('1 day') AS purged_nothing_recent;
SELECT vetassist_auth.purge_audit_log('0') > 0 AS purged;
SELECT vetassist_auth.seal_audit_log() AS sealed_purge_event;
RESET ROLE;
SELECT checkpoint_seq > 0 AS checkpoint_kept FROM vetassist_auth.audit_seal_state;
SELECT event_type, details ? 'through_seq' AS names_checkpoint FROM vetassist_auth.audit_log ORDER BY id;
SELECT ok, checked FROM vetassist_auth.verify_audit_chain();
SELECT count(*) FILTER (WHERE ok) = count(*) AS installation_ok FROM vetassist_auth.verify_installation();
