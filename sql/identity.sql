-- Veteran identity: accounts keyed by the ICN's field hash, PHI stored
-- only encrypted (context users.<column>:<user id>) next to its field hash.

-- Validates and normalizes one optional PHI value; raises 22023 naming only the field.
CREATE FUNCTION vetassist_auth.checked_phi(value text, field text, max_length integer)
RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF value IS NULL THEN
        RETURN NULL;
    END IF;
    value := btrim(value);
    IF value = '' OR length(value) > max_length THEN
        RAISE EXCEPTION 'vetassist_auth: % must be 1 to % characters', field, max_length USING ERRCODE = '22023';
    END IF;
    RETURN value;
END
$$;

CREATE FUNCTION vetassist_auth.upsert_va_user(
    va_icn text, veteran_status text, email text, first_name text, last_name text)
RETURNS uuid
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    icn       text := upper(regexp_replace(coalesce(va_icn, ''), '\s', '', 'g'));
    icn_hash  bytea;
    email_h   bytea;
    first_h   bytea;
    last_h    bytea;
    icn_hashes bytea[];
    sealed    bytea[];
    signed_in timestamptz := now();  -- a variable: Citus allows no function in an UPDATE's CASE
    uid       uuid;
    old       vetassist_auth.users;
    changed   text[] := '{}';
BEGIN
    IF icn !~ '^[0-9A-Z]{1,64}$' THEN
        RAISE EXCEPTION 'vetassist_auth: va_icn must be 1 to 64 letters and digits' USING ERRCODE = '22023';
    END IF;
    email := vetassist_auth.checked_phi(email, 'email', 320);
    IF email IS NOT NULL AND position('@' IN email) < 2 THEN
        RAISE EXCEPTION 'vetassist_auth: email is not an e-mail address' USING ERRCODE = '22023';
    END IF;
    first_name := vetassist_auth.checked_phi(first_name, 'first_name', 200);
    last_name := vetassist_auth.checked_phi(last_name, 'last_name', 200);
    veteran_status := vetassist_auth.checked_phi(veteran_status, 'veteran_status', 64);
    -- Each hash once: it is stored on insert, and decides what changed on update.
    icn_hash := vetassist_auth.field_hash(icn, 'va_icn');
    email_h := vetassist_auth.field_hash(email, 'email');
    first_h := vetassist_auth.field_hash(first_name, 'first_name');
    last_h := vetassist_auth.field_hash(last_name, 'last_name');

    FOR attempt IN 1..2 LOOP
        -- Found by its hash, then locked by its id: on Citus the hash is looked up on every
        -- shard (an index probe each), and only the account's own shard is locked.
        icn_hashes := vetassist_auth.field_hashes(icn, 'va_icn');
        uid := (SELECT u.id FROM vetassist_auth.users u WHERE u.va_icn_hash = ANY (icn_hashes) LIMIT 1);
        IF uid IS NOT NULL THEN
            SELECT * INTO old FROM vetassist_auth.users u WHERE u.id = uid FOR UPDATE;
            EXIT WHEN FOUND;
        END IF;
        -- A transaction creating the same account under another hash key (a rotation between
        -- the two) would not conflict in the unique index: wait for it and look again.
        CONTINUE WHEN vetassist_auth.claim_new_account(icn);
        uid := gen_random_uuid();
        INSERT INTO vetassist_auth.users AS u
            (id, va_icn_encrypted, va_icn_hash, va_veteran_status,
             email_encrypted, email_hash, first_name_encrypted, first_name_hash,
             last_name_encrypted, last_name_hash, last_login_at)
        VALUES (uid, vetassist_auth.seal_phi_text(icn, 'users.va_icn:' || uid), icn_hash, veteran_status,
                vetassist_auth.seal_phi_text(email, 'users.email:' || uid), email_h,
                vetassist_auth.seal_phi_text(first_name, 'users.first_name:' || uid), first_h,
                vetassist_auth.seal_phi_text(last_name, 'users.last_name:' || uid), last_h,
                now())
        -- On one node the unique index on va_icn_hash; on Citus, which cannot keep a unique index
        -- without the distribution column, the claim above alone keeps one account per ICN.
        ON CONFLICT DO NOTHING;
        IF FOUND THEN
            PERFORM vetassist_auth.write_audit('identity', 'user_created', 'success', uid, 'users', uid::text,
                jsonb_build_object('fields', array_remove(ARRAY['va_icn',
                    CASE WHEN email IS NOT NULL THEN 'email' END,
                    CASE WHEN first_name IS NOT NULL THEN 'first_name' END,
                    CASE WHEN last_name IS NOT NULL THEN 'last_name' END], NULL)));
            RETURN uid;
        END IF;
        -- Another transaction created the account at the same moment: update that one.
    END LOOP;

    uid := old.id;
    IF uid IS NULL THEN  -- created and deleted again while we looked: let the caller retry
        RAISE EXCEPTION 'vetassist_auth: concurrent change to this account, retry' USING ERRCODE = '40001';
    END IF;
    IF NOT old.is_active THEN
        -- A refused sign-in is recorded whatever becomes of the caller's transaction.
        PERFORM vetassist_auth.write_audit_durably('identity', 'sign_in_refused', 'denied', uid, 'users', uid::text,
                                                   '{"reason": "account_deactivated"}');
        RAISE EXCEPTION 'vetassist_auth: this account is deactivated' USING ERRCODE = '28000';
    END IF;
    -- Re-encrypt only what changed, judged by the field hashes; NULL keeps the stored value.
    IF email IS NOT NULL AND old.email_hash IS DISTINCT FROM email_h THEN
        changed := changed || 'email'::text;
    END IF;
    IF first_name IS NOT NULL AND old.first_name_hash IS DISTINCT FROM first_h THEN
        changed := changed || 'first_name'::text;
    END IF;
    IF last_name IS NOT NULL AND old.last_name_hash IS DISTINCT FROM last_h THEN
        changed := changed || 'last_name'::text;
    END IF;
    IF veteran_status IS NOT NULL AND old.va_veteran_status IS DISTINCT FROM veteran_status THEN
        changed := changed || 'va_veteran_status'::text;
    END IF;
    -- Sealed here, not in the UPDATE: on Citus a statement's expressions may run on a worker,
    -- and values are encrypted and decrypted on the coordinator only.
    sealed := ARRAY[
        CASE WHEN 'email' = ANY (changed) THEN vetassist_auth.seal_phi_text(email, 'users.email:' || uid) END,
        CASE WHEN 'first_name' = ANY (changed) THEN vetassist_auth.seal_phi_text(first_name, 'users.first_name:' || uid) END,
        CASE WHEN 'last_name' = ANY (changed) THEN vetassist_auth.seal_phi_text(last_name, 'users.last_name:' || uid) END];
    UPDATE vetassist_auth.users u SET
        email_encrypted = coalesce(sealed[1], u.email_encrypted),
        email_hash = CASE WHEN 'email' = ANY (changed) THEN email_h ELSE u.email_hash END,
        first_name_encrypted = coalesce(sealed[2], u.first_name_encrypted),
        first_name_hash = CASE WHEN 'first_name' = ANY (changed) THEN first_h ELSE u.first_name_hash END,
        last_name_encrypted = coalesce(sealed[3], u.last_name_encrypted),
        last_name_hash = CASE WHEN 'last_name' = ANY (changed) THEN last_h ELSE u.last_name_hash END,
        va_veteran_status = coalesce(veteran_status, u.va_veteran_status),
        updated_at = CASE WHEN cardinality(changed) > 0 THEN signed_in ELSE u.updated_at END,
        last_login_at = signed_in
    WHERE u.id = uid;
    PERFORM vetassist_auth.write_audit('identity', 'user_signed_in', 'success', uid, 'users', uid::text,
                                       jsonb_build_object('changed_fields', changed));
    RETURN uid;
END
$$;
COMMENT ON FUNCTION vetassist_auth.upsert_va_user(text, text, text, text, text) IS
    'After VA.gov sign-in: creates or updates the account keyed by the ICN; returns the user id. NULL arguments keep stored values.';

-- Look-ups try every usable hash key, so they keep working during a hash-key rotation. The
-- hashes are computed first: on Citus the look-up runs on every shard, the hashing here.
CREATE FUNCTION vetassist_auth.find_user_by_icn(va_icn text) RETURNS uuid
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    hashes bytea[] := vetassist_auth.field_hashes(va_icn, 'va_icn');
BEGIN
    RETURN (SELECT u.id FROM vetassist_auth.users u WHERE u.va_icn_hash = ANY (hashes) LIMIT 1);
END
$$;

CREATE FUNCTION vetassist_auth.find_users_by_email(email text) RETURNS SETOF uuid
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    hashes bytea[] := vetassist_auth.field_hashes(email, 'email');
BEGIN
    RETURN QUERY SELECT u.id FROM vetassist_auth.users u WHERE u.email_hash = ANY (hashes)
                 ORDER BY u.created_at;
END
$$;

-- Raises P0002 for an unknown user; returns whether the account is active.
CREATE FUNCTION vetassist_auth.require_user(user_id uuid) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
DECLARE
    active boolean;
BEGIN
    SELECT u.is_active INTO active FROM vetassist_auth.users u WHERE u.id = user_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'vetassist_auth: no such user' USING ERRCODE = 'P0002';
    END IF;
    RETURN active;
END
$$;

CREATE FUNCTION vetassist_auth.user_profile(user_id uuid)
RETURNS TABLE (id uuid, va_icn text, veteran_status text, email text, first_name text, last_name text,
               is_active boolean, mfa_enabled boolean, created_at timestamptz, last_login_at timestamptz)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    u vetassist_auth.users;
    mfa_enabled boolean;
BEGIN
    PERFORM vetassist_auth.require_user(user_id);
    -- Disclosure of PHI: recorded, beyond the reach of the caller's ROLLBACK, before it is returned.
    PERFORM vetassist_auth.write_audit_durably('phi_access', 'user_profile_read', 'success', user_id, 'users', user_id::text,
                                               '{"fields": ["va_icn", "email", "first_name", "last_name"]}');
    -- The row is read first and opened here: on Citus a statement's expressions may run on a
    -- worker, and values are decrypted on the coordinator only.
    SELECT * INTO u FROM vetassist_auth.users x WHERE x.id = user_profile.user_id;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    mfa_enabled := coalesce((SELECT m.totp_enabled FROM vetassist_auth.mfa_settings m
                             WHERE m.user_id = user_profile.user_id), false);
    RETURN QUERY
    SELECT u.id,
           vetassist_auth.open_phi_text(u.va_icn_encrypted, 'users.va_icn:' || u.id),
           u.va_veteran_status,
           vetassist_auth.open_phi_text(u.email_encrypted, 'users.email:' || u.id),
           vetassist_auth.open_phi_text(u.first_name_encrypted, 'users.first_name:' || u.id),
           vetassist_auth.open_phi_text(u.last_name_encrypted, 'users.last_name:' || u.id),
           u.is_active, mfa_enabled, u.created_at, u.last_login_at;
END
$$;
COMMENT ON FUNCTION vetassist_auth.user_profile(uuid) IS
    'The decrypted profile of one veteran; every call is audited as PHI access (category phi_access), and the audit row survives a rollback.';

CREATE FUNCTION vetassist_auth.deactivate_user(user_id uuid, reason text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    sessions_ended integer;
BEGIN
    IF coalesce(btrim(reason), '') = '' OR length(reason) > 500 THEN
        RAISE EXCEPTION 'vetassist_auth: a reason of 1 to 500 characters is required' USING ERRCODE = '22023';
    END IF;
    PERFORM vetassist_auth.require_user(user_id);
    UPDATE vetassist_auth.users u
    SET is_active = false, deactivated_at = now(), deactivation_reason = reason, updated_at = now()
    WHERE u.id = user_id;
    sessions_ended := vetassist_auth.end_user_sessions(user_id, 'user_deactivated');
    DELETE FROM vetassist_auth.va_tokens t WHERE t.user_id = deactivate_user.user_id;
    PERFORM vetassist_auth.write_audit('identity', 'user_deactivated', 'success', user_id, 'users', user_id::text,
        jsonb_build_object('reason', reason, 'sessions_ended', sessions_ended, 'tokens_deleted', FOUND));
END
$$;
COMMENT ON FUNCTION vetassist_auth.deactivate_user(uuid, text) IS
    'Marks the account inactive, ends every session and deletes its VA tokens; audited.';

-- Who may call the functions of this file (any other function of the extension: no role,
-- sql/grants.sql).
GRANT EXECUTE ON FUNCTION vetassist_auth.upsert_va_user(text, text, text, text, text) TO vetassist_app;
GRANT EXECUTE ON FUNCTION vetassist_auth.find_user_by_icn(text) TO vetassist_app;
GRANT EXECUTE ON FUNCTION vetassist_auth.find_users_by_email(text) TO vetassist_app;
GRANT EXECUTE ON FUNCTION vetassist_auth.user_profile(uuid) TO vetassist_app;
GRANT EXECUTE ON FUNCTION vetassist_auth.deactivate_user(uuid, text) TO vetassist_app, vetassist_admin;
