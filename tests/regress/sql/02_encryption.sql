-- Envelope encryption (docs/ARCHITECTURE.md, "Formats"), as the application role.
SET ROLE vetassist_app;

SELECT vetassist_auth.decrypt(vetassist_auth.encrypt('\x00ff10'::bytea, 'ctx'), 'ctx') = '\x00ff10'::bytea AS bytea_round_trip,
       vetassist_auth.decrypt_text(vetassist_auth.encrypt_text('Vétéran ✓ 退役軍人', 'notes.body:1'), 'notes.body:1') AS text_round_trip,
       vetassist_auth.decrypt_text(vetassist_auth.encrypt_text('', ''), '') = '' AS empty_round_trip;
-- The extension's own contexts are sealed only by the extension (a forged value would decrypt as
-- a disclosure of the veteran's stored PHI).
SELECT regress.try('SELECT vetassist_auth.encrypt_text(''x'', ''users.email:11111111-2222-3333-4444-555555555555'')') AS reserved_context;

-- Layout: version 1, a 4-byte key id, 12-byte nonce, ciphertext, 16-byte tag.
SELECT get_byte(c, 0) AS version,
       octet_length(c) - octet_length('hello'::bytea) AS overhead,
       vetassist_auth.decrypt_text(c, 'ctx') AS plaintext
FROM (SELECT vetassist_auth.encrypt_text('hello', 'ctx') AS c) s;

-- STRICT: NULL in, NULL out.
SELECT vetassist_auth.encrypt_text(NULL, 'ctx') IS NULL AS null_plaintext,
       vetassist_auth.decrypt_text(NULL, 'ctx') IS NULL AS null_ciphertext;

-- Encrypting the same value twice gives different ciphertexts.
SELECT vetassist_auth.encrypt_text('same', 'ctx') <> vetassist_auth.encrypt_text('same', 'ctx') AS randomized;

-- 10,000 encryptions, 10,000 distinct nonces.
SELECT count(DISTINCT substr(vetassist_auth.encrypt_text('x', 'ctx'), 6, 12)) AS distinct_nonces
FROM generate_series(1, 10000);

-- Every way a ciphertext can be wrong raises XX001 with the same message, echoing nothing.
CREATE TEMP TABLE sample AS SELECT vetassist_auth.encrypt_text('secret-token-value', 'notes.body:abc') AS c;
SELECT regress.try(format('SELECT vetassist_auth.decrypt_text(%L::bytea, %L)', c, 'notes.body:abd')) AS wrong_context FROM sample;
SELECT regress.try(format('SELECT vetassist_auth.decrypt_text(%L::bytea, %L)', c, '')) AS empty_context FROM sample;
SELECT regress.try(format('SELECT vetassist_auth.decrypt_text(%L::bytea, %L)',
                          set_byte(c, i, get_byte(c, i) # 1), 'notes.body:abc')) AS flipped, count(*)
FROM sample, generate_series(0, octet_length((SELECT c FROM sample)) - 1) AS i
GROUP BY 1;
SELECT regress.try(format('SELECT vetassist_auth.decrypt_text(%L::bytea, %L)', substr(c, 1, n), 'notes.body:abc')) AS truncated, count(*)
FROM sample, generate_series(0, octet_length((SELECT c FROM sample)) - 1) AS n
GROUP BY 1;
SELECT regress.try(format('SELECT vetassist_auth.decrypt_text(%L::bytea, %L)', set_byte(c, 0, 2), 'notes.body:abc')) AS unknown_version FROM sample;
-- A key id that does not exist.
SELECT regress.try(format('SELECT vetassist_auth.decrypt_text(%L::bytea, %L)',
                          overlay(c placing '\x7fffffff'::bytea from 2 for 4), 'notes.body:abc')) AS unknown_key FROM sample;
SELECT regress.try('SELECT vetassist_auth.decrypt_text(''\x''::bytea, ''c'')') AS empty_input;
SELECT regress.try(format('SELECT vetassist_auth.decrypt_text(%L::bytea, %L)', c || '\x00'::bytea, 'notes.body:abc')) AS extended FROM sample;
-- Bytes that are not UTF-8 cannot come back as text.
SELECT regress.try(format('SELECT vetassist_auth.decrypt_text(%L::bytea, %L)', vetassist_auth.encrypt('\xff'::bytea, 'b'), 'b')) AS not_utf8;
RESET ROLE;

-- A token-purpose ciphertext is not readable through the PHI decrypt, even with its context.
SELECT regress.try(format('SELECT vetassist_auth.decrypt_text(%L::bytea, %L)',
                          vetassist_auth.encrypt_token('va-access-token', 'va_tokens.access_token:u'), 'va_tokens.access_token:u')) AS token_via_phi;
SELECT vetassist_auth.decrypt_token(vetassist_auth.encrypt_token('va-access-token', 't'), 't') AS token_round_trip;

-- The key id in the envelope is the active phi key's.
SELECT vetassist_auth.envelope_key_id(vetassist_auth.encrypt_text('x', 'c')) = key_id AS uses_active_phi_key
FROM vetassist_auth.keys WHERE purpose = 'phi' AND status = 'active';
-- Encryptions are counted (in leases, so the count may run ahead, never behind); the keys
-- table shows the count once reencrypt or the background worker has mirrored it.
SELECT vetassist_auth.refresh_encrypt_counts() AS keys_mirrored;
SELECT encrypt_count >= 10000 - 1024 AS counted FROM vetassist_auth.keys WHERE purpose = 'phi' AND status = 'active';
-- Each wrapped key is nonce(12) || encrypted key(32) || tag(16).
SELECT count(*) AS keys, bool_and(octet_length(wrapped_key) = 60) AS wrapped_60_bytes FROM vetassist_auth.keys;
