-- Searchable field hashes (docs/api.md, "Ciphertext and hash formats"), as the application role.
SET ROLE vetassist_app;

SELECT octet_length(vetassist_auth.field_hash('a@b.org', 'email')) AS hash_len;

-- Normalization: equal after normalizing, different otherwise.
SELECT vetassist_auth.field_hash('  Vet@Example.ORG ', 'email') = vetassist_auth.field_hash('vet@example.org', 'email') AS email_normalized,
       vetassist_auth.field_hash(' 1012 667985 v123 ', 'va_icn') = vetassist_auth.field_hash('1012667985V123', 'va_icn') AS icn_normalized,
       vetassist_auth.field_hash('  Ｊｏｈｎ   PAUL ', 'first_name') = vetassist_auth.field_hash('john paul', 'first_name') AS name_nfkc,
       vetassist_auth.field_hash('+1 (555) 010-9999', 'phone') = vetassist_auth.field_hash('15550109999', 'phone') AS phone_digits,
       vetassist_auth.field_hash('10.0.0.1/32', 'ip') = vetassist_auth.field_hash('10.0.0.1', 'ip') AS ipv4_canonical,
       vetassist_auth.field_hash('2001:DB8:0:0:0:0:0:1', 'ip') = vetassist_auth.field_hash('2001:db8::1', 'ip') AS ipv6_canonical,
       vetassist_auth.field_hash('A b', 'note') <> vetassist_auth.field_hash('a b', 'note') AS other_fields_as_is,
       vetassist_auth.field_hash('a@b.org', 'email') <> vetassist_auth.field_hash('a@b.org2', 'email') AS distinct_values;

-- Per-field separation: the same text in two fields never hashes alike.
SELECT substr(vetassist_auth.field_hash('smith', 'first_name'), 5) <> substr(vetassist_auth.field_hash('smith', 'last_name'), 5) AS names_separated,
       substr(vetassist_auth.field_hash('x', 'email'), 5) <> substr(vetassist_auth.field_hash('x', 'note'), 5) AS fields_separated;

-- Not a plain SHA-256 of the value: a dictionary attack needs the key.
SELECT substr(vetassist_auth.field_hash('10.0.0.1', 'ip'), 5) <> sha256('10.0.0.1'::bytea) AS keyed;

-- field_hashes: one per usable hash key, the active one first.
SELECT array_length(vetassist_auth.field_hashes('a@b.org', 'email'), 1) AS hashes,
       (vetassist_auth.field_hashes('a@b.org', 'email'))[1] = vetassist_auth.field_hash('a@b.org', 'email') AS active_first;

-- Bad input.
SELECT regress.try('SELECT vetassist_auth.field_hash(''not an ip'', ''ip'')') AS bad_ip;
SELECT regress.try('SELECT vetassist_auth.field_hash(''10.0.0.1/99'', ''ip'')') AS bad_prefix;
SELECT regress.try('SELECT vetassist_auth.field_hash(''x'', '''')') AS empty_field;
SELECT vetassist_auth.field_hash(NULL, 'email') IS NULL AS null_value;
RESET ROLE;
