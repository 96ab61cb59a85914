-- vetassist_auth 0.1.0 -> 0.1.1
-- Audit rows are written by Rust (a direct heap insert) instead of a PL/pgSQL INSERT, and
-- verify_audit_chain checks every seal against its row inside one aggregate query.
\echo Use "ALTER EXTENSION vetassist_auth UPDATE TO '0.1.1'" to load this file. \quit

-- Same signature, defaults and privileges (none granted) as 0.1.0's PL/pgSQL function.
CREATE OR REPLACE FUNCTION vetassist_auth.write_audit(
    category text, event_type text, outcome text,
    subject_user_id uuid DEFAULT NULL, target_table text DEFAULT NULL, target_id text DEFAULT NULL,
    details jsonb DEFAULT '{}')
RETURNS bigint
LANGUAGE c
AS 'MODULE_PATHNAME', 'write_audit_wrapper';

CREATE FUNCTION vetassist_auth.audit_seal_matches(key_id integer, prev_hash bytea, row_text text, hash bytea)
RETURNS boolean
STRICT STABLE
LANGUAGE c
AS 'MODULE_PATHNAME', 'audit_seal_matches_wrapper';
REVOKE ALL ON FUNCTION vetassist_auth.audit_seal_matches(integer, bytea, text, bytea) FROM PUBLIC;
