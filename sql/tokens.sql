-- The VA token vault: one row per user, tokens encrypted under the token
-- key with contexts va_tokens.access_token:<user id> and va_tokens.refresh_token:<user id>.
-- Every operation is audited (category auth) without any token bytes.

CREATE FUNCTION vetassist_auth.store_va_tokens(
    user_id uuid, access_token text, refresh_token text, expires_at timestamptz, scope text DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    new_generation integer;
    active boolean;
BEGIN
    IF access_token IS NULL OR access_token = '' OR octet_length(access_token) > 16384 THEN
        RAISE EXCEPTION 'vetassist_auth: access_token must be 1 byte to 16 KiB' USING ERRCODE = '22023';
    END IF;
    IF refresh_token = '' OR octet_length(refresh_token) > 16384 THEN
        RAISE EXCEPTION 'vetassist_auth: refresh_token must be 1 byte to 16 KiB' USING ERRCODE = '22023';
    END IF;
    IF expires_at IS NULL OR expires_at <= clock_timestamp() OR expires_at = 'infinity' THEN
        RAISE EXCEPTION 'vetassist_auth: expires_at must be a finite time in the future' USING ERRCODE = '22023';
    END IF;
    IF length(scope) > 2048 THEN
        RAISE EXCEPTION 'vetassist_auth: scope is longer than 2048 characters' USING ERRCODE = '22023';
    END IF;
    -- FOR SHARE waits for a deactivation in flight and then sees it.
    SELECT u.is_active INTO active FROM vetassist_auth.users u WHERE u.id = store_va_tokens.user_id FOR SHARE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'vetassist_auth: no such user' USING ERRCODE = 'P0002';
    ELSIF NOT active THEN
        RAISE EXCEPTION 'vetassist_auth: this account is deactivated' USING ERRCODE = '28000';
    END IF;
    -- A refresh response without a new refresh token keeps the stored one.
    INSERT INTO vetassist_auth.va_tokens AS t
        (user_id, access_token_encrypted, refresh_token_encrypted, scope, expires_at, created_at)
    VALUES (user_id,
            vetassist_auth.encrypt_token(access_token, 'va_tokens.access_token:' || user_id),
            vetassist_auth.encrypt_token(refresh_token, 'va_tokens.refresh_token:' || user_id),
            scope, expires_at, clock_timestamp())
    ON CONFLICT ON CONSTRAINT va_tokens_user_id_key DO UPDATE SET
        access_token_encrypted = excluded.access_token_encrypted,
        refresh_token_encrypted = coalesce(excluded.refresh_token_encrypted, t.refresh_token_encrypted),
        scope = coalesce(excluded.scope, t.scope),
        expires_at = excluded.expires_at,
        generation = t.generation + 1,
        refreshed_at = excluded.created_at  -- the clock, read once (Citus runs the SET on a worker)
    RETURNING t.generation INTO new_generation;
    PERFORM vetassist_auth.write_audit('auth',
        CASE WHEN new_generation = 1 THEN 'va_tokens_stored' ELSE 'va_tokens_refreshed' END,
        'success', user_id, 'va_tokens', user_id::text,
        jsonb_build_object('generation', new_generation, 'expires_at', expires_at,
                           'refresh_token', refresh_token IS NOT NULL));
    RETURN new_generation;
END
$$;
COMMENT ON FUNCTION vetassist_auth.store_va_tokens(uuid, text, text, timestamptz, text) IS
    'Stores (or refreshes) the VA.gov tokens of a user, encrypted; returns the token generation.';

-- Shared by the two readers: decrypts one column, audits the access (durably). One query finds both
-- the user (P0002 when unknown) and the token row.
CREATE FUNCTION vetassist_auth.read_va_token(user_id uuid, which text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    row record;
BEGIN
    SELECT t.*, u.is_active AS user_active INTO row FROM vetassist_auth.users u
    LEFT JOIN vetassist_auth.va_tokens t ON t.user_id = u.id
    WHERE u.id = read_va_token.user_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'vetassist_auth: no such user' USING ERRCODE = 'P0002';
    END IF;
    IF NOT row.user_active THEN
        RAISE EXCEPTION 'vetassist_auth: this account is deactivated' USING ERRCODE = '28000';
    END IF;
    IF row.user_id IS NULL OR (which = 'refresh_token' AND row.refresh_token_encrypted IS NULL) THEN
        RETURN NULL;
    END IF;
    IF which = 'access_token' AND row.expires_at <= clock_timestamp() THEN
        RAISE EXCEPTION 'vetassist_auth: the VA access token has expired' USING ERRCODE = 'VA001',
            HINT = 'Refresh it with the refresh token, then call store_va_tokens.';
    END IF;
    -- Recorded, beyond the reach of the caller's ROLLBACK, before the token is returned.
    PERFORM vetassist_auth.write_audit_durably('auth', 'va_' || which || '_read', 'success', user_id, 'va_tokens', user_id::text,
                                               jsonb_build_object('generation', row.generation));
    RETURN vetassist_auth.decrypt_token(
        CASE which WHEN 'access_token' THEN row.access_token_encrypted ELSE row.refresh_token_encrypted END,
        'va_tokens.' || which || ':' || user_id);
END
$$;

CREATE FUNCTION vetassist_auth.va_access_token(user_id uuid) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN vetassist_auth.read_va_token(user_id, 'access_token');
END
$$;
COMMENT ON FUNCTION vetassist_auth.va_access_token(uuid) IS
    'The decrypted VA access token, NULL when none is stored; SQLSTATE VA001 when it has expired.';

CREATE FUNCTION vetassist_auth.va_refresh_token(user_id uuid) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN vetassist_auth.read_va_token(user_id, 'refresh_token');
END
$$;
COMMENT ON FUNCTION vetassist_auth.va_refresh_token(uuid) IS 'The decrypted VA refresh token, NULL when none is stored.';

CREATE FUNCTION vetassist_auth.va_tokens_due(within interval) RETURNS SETOF uuid
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF within IS NULL OR within < interval '0' THEN
        RAISE EXCEPTION 'vetassist_auth: within must be a non-negative interval' USING ERRCODE = '22023';
    END IF;
    RETURN QUERY
    SELECT t.user_id FROM vetassist_auth.va_tokens t
    JOIN vetassist_auth.users u ON u.id = t.user_id AND u.is_active
    WHERE t.expires_at <= clock_timestamp() + within AND t.refresh_token_encrypted IS NOT NULL
    ORDER BY t.expires_at;
END
$$;
COMMENT ON FUNCTION vetassist_auth.va_tokens_due(interval) IS
    'Users whose VA access token expires within the interval and who have a refresh token: work for a refresher job.';

CREATE FUNCTION vetassist_auth.delete_va_tokens(user_id uuid) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    deleted boolean;
BEGIN
    PERFORM vetassist_auth.require_user(user_id);
    DELETE FROM vetassist_auth.va_tokens t WHERE t.user_id = delete_va_tokens.user_id;
    deleted := FOUND;
    PERFORM vetassist_auth.write_audit('auth', 'va_tokens_deleted', 'success', user_id, 'va_tokens', user_id::text,
                                       jsonb_build_object('existed', deleted));
    RETURN deleted;
END
$$;
COMMENT ON FUNCTION vetassist_auth.delete_va_tokens(uuid) IS 'Deletes the VA tokens of a user (logout); returns whether any existed.';

-- Who may call the functions of this file (any other function of the extension: no role,
-- sql/grants.sql).
GRANT EXECUTE ON FUNCTION vetassist_auth.store_va_tokens(uuid, text, text, timestamptz, text) TO vetassist_app;
GRANT EXECUTE ON FUNCTION vetassist_auth.va_access_token(uuid) TO vetassist_app;
GRANT EXECUTE ON FUNCTION vetassist_auth.va_refresh_token(uuid) TO vetassist_app;
GRANT EXECUTE ON FUNCTION vetassist_auth.va_tokens_due(interval) TO vetassist_app;
GRANT EXECUTE ON FUNCTION vetassist_auth.delete_va_tokens(uuid) TO vetassist_app;
