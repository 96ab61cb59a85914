-- The VA token vault, as the application role.
SET ROLE vetassist_app;
CREATE TEMP TABLE vet AS SELECT vetassist_auth.upsert_va_user('1012667990V111111', 'veteran', 'ana@example.org', 'Ana', 'Diaz') AS id;

SELECT vetassist_auth.va_access_token(id) IS NULL AS none_yet, vetassist_auth.va_refresh_token(id) IS NULL AS no_refresh FROM vet;
SELECT vetassist_auth.store_va_tokens(id, 'va-access-1', 'va-refresh-1', now() + interval '1 hour', 'openid profile') AS generation FROM vet;
SELECT vetassist_auth.va_access_token(id) AS access, vetassist_auth.va_refresh_token(id) AS refresh FROM vet;
-- A refresh without a new refresh token keeps the old one and bumps the generation.
SELECT vetassist_auth.store_va_tokens(id, 'va-access-2', NULL, now() + interval '1 hour', NULL) AS generation FROM vet;
SELECT vetassist_auth.va_access_token(id) AS access, vetassist_auth.va_refresh_token(id) AS refresh FROM vet;

-- Due for refresh within 2 hours, not within 30 minutes.
SELECT count(*) FILTER (WHERE d = vet.id) AS due_2h FROM vet, vetassist_auth.va_tokens_due('2 hours') d;
SELECT count(*) FILTER (WHERE d = vet.id) AS due_30min FROM vet, vetassist_auth.va_tokens_due('30 minutes') d;

-- Bad input: clear errors, nothing written.
SELECT regress.try(format('SELECT vetassist_auth.store_va_tokens(%L, NULL, ''r'', now() + interval ''1 hour'', NULL)', id)) AS null_token FROM vet;
SELECT regress.try(format('SELECT vetassist_auth.store_va_tokens(%L, '''', ''r'', now() + interval ''1 hour'', NULL)', id)) AS empty_token FROM vet;
SELECT regress.try(format('SELECT vetassist_auth.store_va_tokens(%L, ''a'', '''', now() + interval ''1 hour'', NULL)', id)) AS empty_refresh FROM vet;
SELECT regress.try(format('SELECT vetassist_auth.store_va_tokens(%L, repeat(''x'', 16385), ''r'', now() + interval ''1 hour'', NULL)', id)) AS token_over_16k FROM vet;
SELECT regress.try(format('SELECT vetassist_auth.store_va_tokens(%L, ''a'', ''r'', now() - interval ''1 second'', NULL)', id)) AS expires_in_past FROM vet;
SELECT regress.try(format('SELECT vetassist_auth.store_va_tokens(%L, ''a'', ''r'', NULL, NULL)', id)) AS null_expiry FROM vet;
SELECT regress.try('SELECT vetassist_auth.store_va_tokens(''00000000-0000-0000-0000-000000000000'', ''a'', ''r'', now() + interval ''1 hour'', NULL)') AS unknown_user;
SELECT regress.try('SELECT vetassist_auth.va_tokens_due(''-1 hour'')') AS negative_interval;
SELECT vetassist_auth.va_access_token(id) AS unchanged FROM vet;

-- A 16 KiB token is fine.
SELECT vetassist_auth.store_va_tokens(id, repeat('t', 16384), NULL, now() + interval '1 hour', NULL) AS generation FROM vet;
SELECT length(vetassist_auth.va_access_token(id)) AS long_token FROM vet;

-- The app cannot read the vault directly.
SELECT regress.try('SELECT * FROM vetassist_auth.va_tokens') AS select_tokens;
SELECT regress.try('UPDATE vetassist_auth.va_tokens SET scope = NULL') AS update_tokens;
SELECT regress.try('DELETE FROM vetassist_auth.va_tokens') AS delete_tokens;
RESET ROLE;

-- Expired access token: its own SQLSTATE (VA001), refresh token still readable.
UPDATE vetassist_auth.va_tokens SET expires_at = now() - interval '1 minute' FROM vet WHERE user_id = vet.id;
SET ROLE vetassist_app;
SELECT regress.try(format('SELECT vetassist_auth.va_access_token(%L)', id)) AS expired FROM vet;
SELECT vetassist_auth.va_refresh_token(id) AS refresh_still_readable FROM vet;
SELECT vetassist_auth.store_va_tokens(id, 'va-access-3', 'va-refresh-3', now() + interval '1 hour', NULL) AS generation FROM vet;
RESET ROLE;

-- The plaintext is nowhere in the stored row.
SELECT position(convert_to('va-access-3', 'UTF8') IN t.access_token_encrypted) = 0 AS access_not_in_ciphertext,
       position(convert_to('va-refresh-3', 'UTF8') IN t::text::bytea) = 0 AS refresh_not_in_row,
       t.token_type, t.scope, t.generation, t.refreshed_at IS NOT NULL AS refreshed
FROM vetassist_auth.va_tokens t JOIN vet ON vet.id = t.user_id;

-- Ciphertext moved to another user's row does not decrypt there (the user id is in the AAD).
SET ROLE vetassist_app;
CREATE TEMP TABLE other AS SELECT vetassist_auth.upsert_va_user('1012667991V222222', 'veteran', 'bo@example.org', 'Bo', 'Li') AS id;
SELECT vetassist_auth.store_va_tokens(id, 'bo-access', 'bo-refresh', now() + interval '1 hour', NULL) AS generation FROM other;
RESET ROLE;
UPDATE vetassist_auth.va_tokens t SET access_token_encrypted = (SELECT access_token_encrypted FROM vetassist_auth.va_tokens s JOIN vet ON s.user_id = vet.id)
FROM other WHERE t.user_id = other.id;
SET ROLE vetassist_app;
SELECT regress.try(format('SELECT vetassist_auth.va_access_token(%L)', id)) AS moved_ciphertext FROM other;

-- Logout deletes the tokens.
SELECT vetassist_auth.delete_va_tokens(id) AS deleted, vetassist_auth.delete_va_tokens(id) AS deleted_again FROM vet;
SELECT vetassist_auth.va_access_token(id) IS NULL AS gone FROM vet;
RESET ROLE;

-- Every token operation is audited, without token bytes.
SELECT event_type, outcome, count(*) FROM vetassist_auth.audit_log a JOIN vet ON vet.id = a.subject_user_id
WHERE category = 'auth' GROUP BY 1, 2 ORDER BY 1, 2;
SELECT count(*) AS audit_rows_with_token_bytes FROM vetassist_auth.audit_log a
WHERE a::text LIKE '%va-access%' OR a::text LIKE '%va-refresh%' OR a::text LIKE '%bo-access%';
