-- Key rotation and re-encryption (docs/operations.md, "Keys: setup, rotation, master key change"), as vetassist_admin.
-- A veteran stored the way the identity functions store one, to have data to move.
INSERT INTO vetassist_auth.users (id, va_icn_encrypted, va_icn_hash, email_encrypted, email_hash,
                                  first_name_encrypted, first_name_hash, last_name_encrypted, last_name_hash)
SELECT id,
       vetassist_auth.seal_phi_text('1012667985V123', 'users.va_icn:' || id), vetassist_auth.field_hash('1012667985V123', 'va_icn'),
       vetassist_auth.seal_phi_text('vet@example.org', 'users.email:' || id), vetassist_auth.field_hash('vet@example.org', 'email'),
       vetassist_auth.seal_phi_text('Maria', 'users.first_name:' || id), vetassist_auth.field_hash('Maria', 'first_name'),
       vetassist_auth.seal_phi_text('Lopez', 'users.last_name:' || id), vetassist_auth.field_hash('Lopez', 'last_name')
FROM (VALUES ('6b0c1f7e-3a57-4d6e-9a55-0d8c3c1f2a10'::uuid)) v(id);
INSERT INTO vetassist_auth.va_tokens (user_id, access_token_encrypted, refresh_token_encrypted, expires_at)
SELECT id, vetassist_auth.encrypt_token('access-1', 'va_tokens.access_token:' || id),
       vetassist_auth.encrypt_token('refresh-1', 'va_tokens.refresh_token:' || id), now() + interval '1 hour'
FROM vetassist_auth.users;
CREATE TEMP TABLE before_rotation AS SELECT vetassist_auth.encrypt_text('kept', 'c') AS c;

SET ROLE vetassist_admin;
SELECT regress.try('SELECT vetassist_auth.rotate_key(''nonsense'')') AS bad_purpose;
SELECT regress.try('SELECT vetassist_auth.reencrypt(0)') AS bad_batch;
SELECT purpose, status FROM vetassist_auth.keys ORDER BY key_id;
CREATE TEMP TABLE rotated AS
SELECT vetassist_auth.rotate_key('phi') AS phi, vetassist_auth.rotate_key('hash') AS hash, vetassist_auth.rotate_key('token') AS token;
SELECT purpose, status FROM vetassist_auth.keys ORDER BY key_id;
RESET ROLE;

-- Old data is still readable and still found.
SELECT vetassist_auth.decrypt_text(c, 'c') AS old_ciphertext FROM before_rotation;
SELECT vetassist_auth.decrypt_text(email_encrypted, 'users.email:' || id) AS email,
       email_hash = ANY (vetassist_auth.field_hashes('VET@example.org', 'email')) AS found_during_rotation,
       email_hash = vetassist_auth.field_hash('vet@example.org', 'email') AS on_new_hash_key
FROM vetassist_auth.users;
-- New encryptions use the new key.
SELECT vetassist_auth.envelope_key_id(vetassist_auth.encrypt_text('x', 'c')) = phi AS new_key_used FROM rotated;

SET ROLE vetassist_admin;
SELECT vetassist_auth.reencrypt(1) AS moved_first_batch;
SELECT vetassist_auth.reencrypt(1000) AS moved_rest;
RESET ROLE;
-- A key retires once every snapshot older than the last move off it has ended: wait for those
-- (an autovacuum worker's, say, which a loaded machine kept open past the next call). Snapshots
-- taken later do not count, so once true this stays true.
DO $$BEGIN
    FOR i IN 1..1200 LOOP
        PERFORM pg_stat_clear_snapshot();
        EXIT WHEN NOT EXISTS (SELECT 1 FROM pg_stat_activity a, vetassist_auth.keys k
            WHERE k.retire_after IS NOT NULL AND a.pid <> pg_backend_pid()
              AND (a.datname = current_database() OR a.datname IS NULL) AND a.backend_xmin IS NOT NULL
              AND ((a.backend_xmin::text::bigint - (k.retire_after & 4294967295)) & 4294967295) >= 2147483648);
        PERFORM pg_sleep(0.1);
    END LOOP;
END$$;
SET ROLE vetassist_admin;
SELECT vetassist_auth.reencrypt(1000) AS moved_when_done;
SELECT purpose, status, retired_at IS NOT NULL AS retired_at_set FROM vetassist_auth.keys ORDER BY key_id;
RESET ROLE;

-- Everything now sits on the active keys and still decrypts.
SELECT vetassist_auth.envelope_key_id(u.va_icn_encrypted) = r.phi AS icn_moved,
       vetassist_auth.hash_key_id(u.email_hash) = r.hash AS hash_moved,
       vetassist_auth.envelope_key_id(t.access_token_encrypted) = r.token AS token_moved,
       vetassist_auth.decrypt_text(u.va_icn_encrypted, 'users.va_icn:' || u.id) AS icn,
       vetassist_auth.decrypt_text(u.first_name_encrypted, 'users.first_name:' || u.id) AS first_name,
       vetassist_auth.decrypt_token(t.refresh_token_encrypted, 'va_tokens.refresh_token:' || u.id) AS refresh,
       u.email_hash = vetassist_auth.field_hash('vet@example.org', 'email') AS email_found
FROM vetassist_auth.users u JOIN vetassist_auth.va_tokens t ON t.user_id = u.id, rotated r;
-- The ad-hoc ciphertext made before rotation is not in any table, so its key retired: it no
-- longer decrypts, exactly like any other unknown key.
SELECT regress.try(format('SELECT vetassist_auth.decrypt_text(%L::bytea, %L)', c, 'c')) AS retired_key FROM before_rotation;
SELECT check_name, ok FROM vetassist_auth.verify_installation() WHERE check_name LIKE 'key %' ORDER BY 1;
