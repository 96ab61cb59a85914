-- Setup shared by the regress suite: the extension, and a helper that runs a statement and
-- reports its SQLSTATE and message, so expected output shows both.
CREATE EXTENSION vetassist_auth;
CREATE SCHEMA regress;
GRANT USAGE ON SCHEMA regress TO PUBLIC;
CREATE FUNCTION regress.try(statement text) RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE statement;
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || SQLERRM;
END
$$;
SELECT extname, extversion = default_version AS is_default_version
FROM pg_extension JOIN pg_available_extensions ON name = extname WHERE extname = 'vetassist_auth';
