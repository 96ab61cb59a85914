-- vetassist_auth walkthrough: run as a superuser in psql, in a database of a server that has a
-- master key configured (vetassist_auth.master_key_file):
--     psql -v ON_ERROR_STOP=1 -d mydb -f examples/walkthrough.sql
-- Each step runs as the role that would run it in production.
\set QUIET on
\pset footer off
CREATE EXTENSION IF NOT EXISTS vetassist_auth;
SELECT check_name, ok FROM vetassist_auth.verify_installation() WHERE NOT ok;

\echo '== 1. The application (role vetassist_app) signs a veteran in after VA.gov OAuth'
SET ROLE vetassist_app;
SELECT vetassist_auth.upsert_va_user('1012667985V123456', 'veteran', 'maria@example.org', 'Maria', 'Lopez') AS user_id \gset
SELECT vetassist_auth.find_user_by_icn('1012667985v123456') = :'user_id' AS found_by_icn;

\echo '== 2. VA tokens go into the vault, encrypted; the app reads them back when calling VA APIs'
SELECT vetassist_auth.store_va_tokens(:'user_id', 'eyJhbGciOi.access', 'refresh-token', now() + interval '1 hour', 'openid') AS generation;
SELECT left(vetassist_auth.va_access_token(:'user_id'), 10) || '…' AS access_token;

\echo '== 3. A session for the JWT the app issued; touch it on every request'
SELECT vetassist_auth.create_session(:'user_id', 'jti-walkthrough', now() + interval '8 hours',
                                     '198.51.100.4', 'curl/8', 'fingerprint-1') AS session_id;
SELECT vetassist_auth.touch_session('jti-walkthrough') AS status;
SELECT vetassist_auth.session_status('jti-walkthrough'::text) AS peek;

\echo '== 4. Application events go to the audit log with the actor of the request'
BEGIN;
SELECT vetassist_auth.set_actor(:'user_id', '198.51.100.4');
SELECT vetassist_auth.audit_event('phi', 'lab_results_viewed', 'success', '{"panel": "CBC"}') > 0 AS audited;
COMMIT;
-- A disclosure outside treatment, payment and operations: in the veteran's accounting (164.528).
SELECT vetassist_auth.record_disclosure(:'user_id', 'State cancer registry', 'Pathology report', 'public_health') > 0 AS disclosed;
SELECT first_name, email FROM vetassist_auth.user_profile(:'user_id');

\echo '== 5. The app cannot read any table directly'
\set ON_ERROR_STOP off
SELECT * FROM vetassist_auth.va_tokens;
\set ON_ERROR_STOP on

\echo '== 6. Logout'
SELECT vetassist_auth.end_session('jti-walkthrough', 'logout') AS ended;
SELECT vetassist_auth.delete_va_tokens(:'user_id') AS tokens_deleted;
RESET ROLE;

\echo '== 7. The administrator (vetassist_admin) seals the audit log and rotates a key'
SET ROLE vetassist_admin;
SELECT vetassist_auth.seal_audit_log() > 0 AS sealed;
SELECT vetassist_auth.rotate_key('phi') > 0 AS rotated;
SELECT vetassist_auth.reencrypt(1000) >= 0 AS reencrypted;
RESET ROLE;

\echo '== 8. The privacy officer (vetassist_auditor) verifies the chain and lists disclosures'
SET ROLE vetassist_auditor;
SELECT ok, checked > 0 AS checked_rows, problem FROM vetassist_auth.verify_audit_chain();
SELECT recorded_by, description, purpose, accountable FROM vetassist_auth.phi_disclosures(:'user_id', now() - interval '1 hour', now() + interval '1 minute');
SELECT recipient, description, purpose FROM vetassist_auth.accounting_of_disclosures(:'user_id');
RESET ROLE;
