-- Veteran identity, as the application role.
SET ROLE vetassist_app;
CREATE TEMP TABLE ids (name text, id uuid);
INSERT INTO ids SELECT 'maria', vetassist_auth.upsert_va_user('1012667985V123456', 'veteran', 'Maria.Lopez@Example.org', 'Maria', 'Lopez');
INSERT INTO ids SELECT 'james', vetassist_auth.upsert_va_user('1012667986V654321', 'veteran', 'jim@example.org', 'James', 'Smith');

-- Same ICN again (any spacing or case): same account, profile updated, NULL keeps stored values.
SELECT vetassist_auth.upsert_va_user(' 1012667985v123456 ', 'veteran', 'maria.new@example.org', NULL, NULL) = id AS same_account
FROM ids WHERE name = 'maria';
SELECT vetassist_auth.find_user_by_icn('1012667985V123456') = id AS found_by_icn FROM ids WHERE name = 'maria';
SELECT vetassist_auth.find_user_by_icn('9999999999V999999') IS NULL AS unknown_icn_is_null;
SELECT count(*) AS found_by_new_email FROM vetassist_auth.find_users_by_email('  MARIA.NEW@example.org') f JOIN ids ON ids.id = f AND ids.name = 'maria';
SELECT count(*) AS old_email_no_longer_found FROM vetassist_auth.find_users_by_email('maria.lopez@example.org');

-- The profile comes back decrypted.
SELECT va_icn, veteran_status, email, first_name, last_name, is_active, mfa_enabled, last_login_at IS NOT NULL AS signed_in
FROM ids, vetassist_auth.user_profile(ids.id) WHERE ids.name = 'maria';

-- Bad input: clear errors, nothing written.
SELECT regress.try('SELECT vetassist_auth.upsert_va_user(NULL, ''v'', ''a@b.org'', ''A'', ''B'')') AS null_icn;
SELECT regress.try('SELECT vetassist_auth.upsert_va_user(''   '', ''v'', ''a@b.org'', ''A'', ''B'')') AS empty_icn;
SELECT regress.try('SELECT vetassist_auth.upsert_va_user(''12-34'', ''v'', ''a@b.org'', ''A'', ''B'')') AS bad_icn;
SELECT regress.try('SELECT vetassist_auth.upsert_va_user(''123V4'', ''v'', ''not-an-email'', ''A'', ''B'')') AS bad_email;
SELECT regress.try('SELECT vetassist_auth.upsert_va_user(''123V4'', ''v'', ''a@b.org'', repeat(''x'', 201), ''B'')') AS long_name;
SELECT regress.try('SELECT vetassist_auth.user_profile(''00000000-0000-0000-0000-000000000000'')') AS unknown_user;
SELECT vetassist_auth.find_user_by_icn('123V4') IS NULL AS nothing_written;

-- The app role cannot touch the tables.
SELECT regress.try('SELECT * FROM vetassist_auth.users') AS select_users;
SELECT regress.try('UPDATE vetassist_auth.users SET is_active = false') AS update_users;
SELECT regress.try('DELETE FROM vetassist_auth.users') AS delete_users;
RESET ROLE;

-- Stored only encrypted: no plaintext anywhere in the row, and the contexts of docs/ARCHITECTURE.md, "Formats".
SELECT position(convert_to('1012667985V123456', 'UTF8') IN u::text::bytea) = 0 AS icn_not_in_row,
       position(convert_to('Lopez', 'UTF8') IN u::text::bytea) = 0 AS name_not_in_row,
       vetassist_auth.decrypt_text(u.va_icn_encrypted, 'users.va_icn:' || u.id) AS icn_by_context,
       vetassist_auth.decrypt_text(u.email_encrypted, 'users.email:' || u.id) AS email_by_context
FROM vetassist_auth.users u JOIN ids ON ids.id = u.id AND ids.name = 'maria';

-- Each profile read is audited as PHI access; creation and sign-in too.
SELECT category, event_type, outcome, count(*)
FROM vetassist_auth.audit_log a JOIN ids ON ids.id = a.subject_user_id
GROUP BY 1, 2, 3 ORDER BY 1, 2, 3;

-- Deactivation ends sessions, deletes tokens, refuses sign-in; audited.
SET ROLE vetassist_app;
SELECT vetassist_auth.create_session(id, 'jwt-james-1', now() + interval '1 hour') IS NOT NULL AS session_created
FROM ids WHERE name = 'james';
SELECT vetassist_auth.store_va_tokens(id, 'access-james', 'refresh-james', now() + interval '1 hour', 'openid')
FROM ids WHERE name = 'james';
SELECT regress.try(format('SELECT vetassist_auth.deactivate_user(%L, %L)', id, '')) AS no_reason FROM ids WHERE name = 'james';
SELECT vetassist_auth.deactivate_user(id, 'veteran closed the account') FROM ids WHERE name = 'james';
SELECT regress.try('SELECT vetassist_auth.upsert_va_user(''1012667986V654321'', ''veteran'', NULL, NULL, NULL)') AS sign_in_after_deactivation;
SELECT is_active FROM ids, vetassist_auth.user_profile(ids.id) WHERE name = 'james';
RESET ROLE;
SELECT status, end_reason FROM vetassist_auth.sessions WHERE jwt_id = 'jwt-james-1';
SELECT count(*) AS tokens_left FROM vetassist_auth.va_tokens t JOIN ids ON ids.id = t.user_id AND ids.name = 'james';
SELECT event_type, outcome, details->>'sessions_ended' AS sessions_ended FROM vetassist_auth.audit_log
WHERE event_type = 'user_deactivated' ORDER BY id;
