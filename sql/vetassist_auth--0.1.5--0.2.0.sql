-- vetassist_auth 0.1.5 -> 0.2.0
-- Operations: the background processes stop when asked, stay out of restores and replicas, and
-- leave the operator's procedures intact (docs/ARCHITECTURE.md, "Background worker").
\echo Use "ALTER EXTENSION vetassist_auth UPDATE TO '0.2.0'" to load this file. \quit

-- Recorders: verify_installation says whether this database has a reserved recorder and whether
-- it runs (durable_audit_state replaces durable_audit_problem).
DROP FUNCTION vetassist_auth.durable_audit_problem();
