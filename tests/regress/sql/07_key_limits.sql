-- NIST SP 800-38D: with random nonces a key must stay far below 2^32 encryptions.
-- vetassist_auth warns from 2^30, and the recorder then rotates the key on its own (audited), so
-- no one reaches the refusal at 2^31 by using the key on purpose; rotate_key is the manual fix.
-- Move the phi counter close to 2^30 (as if a billion encryptions had happened).
SELECT setval('vetassist_auth.phi_encryptions_seq', counter_base + (2 ^ 30)::bigint / 128 - 1) > 0 AS near_warning
FROM vetassist_auth.keys WHERE purpose = 'phi' AND status = 'active';
SELECT count(vetassist_auth.encrypt_text('x', 'c')) AS encrypted_with_warning FROM generate_series(1, 300);
-- The recorder rotates it in a transaction of its own, shortly after the first warning (polled
-- for up to 120 s: a loaded machine may take its time; the loop ends as soon as it is seen).
DO $$BEGIN
    FOR i IN 1..1200 LOOP
        EXIT WHEN EXISTS (SELECT 1 FROM vetassist_auth.audit_log WHERE event_type = 'key_rotated_automatically');
        PERFORM pg_sleep(0.1);
    END LOOP;
END$$;
SELECT count(*) AS rotated_automatically, min(details->>'reason') AS reason
FROM vetassist_auth.audit_log WHERE event_type = 'key_rotated_automatically';
SELECT vetassist_auth.refresh_encrypt_counts() >= 0 AS keys_mirrored;
SELECT status, encrypt_count >= 2 ^ 30 AS count_at_the_mark FROM vetassist_auth.keys
WHERE purpose = 'phi' AND status IN ('active', 'decrypt_only') ORDER BY key_id DESC LIMIT 2;

-- A key at the limit all the same (as if the recorder could not run): refused.
SELECT setval('vetassist_auth.phi_encryptions_seq', counter_base + (2 ^ 31)::bigint / 128) > 0 AS at_limit
FROM vetassist_auth.keys WHERE purpose = 'phi' AND status = 'active';
SELECT regress.try('SELECT count(vetassist_auth.encrypt_text(''x'', ''c'')) FROM generate_series(1, 300)') AS refused;
-- Decryption and hashing go on; only new encryptions under that key stop.
SELECT vetassist_auth.decrypt_token(vetassist_auth.encrypt_token('still', 't'), 't') AS other_purpose_unaffected,
       octet_length(vetassist_auth.field_hash('still', 'note')) AS hashing_unaffected;

SET ROLE vetassist_admin;
SELECT vetassist_auth.rotate_key('phi') > 0 AS rotated;
RESET ROLE;
SELECT vetassist_auth.decrypt_text(vetassist_auth.encrypt_text('after rotation', 'c'), 'c') AS works_again;
SELECT status, encrypt_count >= 2 ^ 31 AS final_count_kept FROM vetassist_auth.keys WHERE purpose = 'phi' ORDER BY key_id;
