-- The schema, roles, grants and the health check.
SELECT c.relname, c.relkind
FROM pg_class c
WHERE c.relnamespace = 'vetassist_auth'::regnamespace AND c.relkind IN ('r', 'v', 'S')
ORDER BY c.relname;

SELECT enum_range(NULL::vetassist_auth.session_status);

-- Foreign keys that make a user's rows go with the user.
SELECT conrelid::regclass AS child, confrelid::regclass AS parent, confdeltype
FROM pg_constraint
WHERE contype = 'f' AND connamespace = 'vetassist_auth'::regnamespace
ORDER BY 1, 2;

-- Partial index on live sessions, and the unique look-up keys.
SELECT indexrelid::regclass, indisunique, pg_get_expr(indpred, indrelid) AS predicate
FROM pg_index
WHERE indrelid IN ('vetassist_auth.sessions'::regclass, 'vetassist_auth.keys'::regclass,
                   'vetassist_auth.users'::regclass, 'vetassist_auth.va_tokens'::regclass)
ORDER BY indexrelid::regclass::text;

-- Every table and sequence is dumped by pg_dump.
SELECT count(*) AS config_dumped FROM pg_extension e, unnest(e.extconfig) WHERE e.extname = 'vetassist_auth';
SELECT c.relname AS not_dumped
FROM pg_class c
WHERE c.relnamespace = 'vetassist_auth'::regnamespace AND c.relkind IN ('r', 'S')
  AND c.oid NOT IN (SELECT unnest(extconfig) FROM pg_extension WHERE extname = 'vetassist_auth');

SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname LIKE 'vetassist\_%' ORDER BY 1;

-- Every table has a comment.
SELECT c.relname AS uncommented FROM pg_class c
WHERE c.relnamespace = 'vetassist_auth'::regnamespace AND c.relkind = 'r'
  AND obj_description(c.oid, 'pg_class') IS NULL;

-- Nothing for PUBLIC; every SECURITY DEFINER function pins its search_path.
SELECT p.oid::regprocedure AS public_executable FROM pg_proc p
WHERE p.pronamespace = 'vetassist_auth'::regnamespace AND has_function_privilege('public', p.oid, 'EXECUTE');
-- Only the Rust crypto functions leave search_path unpinned (docs/ARCHITECTURE.md, "The hot
-- path and search_path").
SELECT p.oid::regprocedure AS unpinned, l.lanname FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
WHERE p.pronamespace = 'vetassist_auth'::regnamespace AND p.prosecdef
  AND NOT ('search_path=pg_catalog, pg_temp' = ANY (coalesce(p.proconfig, '{}')))
ORDER BY 1::text;

-- The key check differs with each cluster's random master key.
SELECT check_name, ok, regexp_replace(detail, 'key check [0-9a-f]{16}', 'key check (16 hex digits)') AS detail
FROM vetassist_auth.verify_installation() ORDER BY check_name;

-- The app role reaches no table directly.
SET ROLE vetassist_app;
SELECT regress.try('SELECT * FROM vetassist_auth.keys');
SELECT regress.try('SELECT * FROM vetassist_auth.users');
SELECT regress.try('DELETE FROM vetassist_auth.audit_log');
SELECT regress.try('SELECT vetassist_auth.rotate_key(''phi'')');
SELECT regress.try('SELECT vetassist_auth.verify_installation()');
RESET ROLE;

-- A role with no grants calls nothing.
CREATE ROLE regress_nobody;
SET ROLE regress_nobody;
SELECT regress.try('SELECT vetassist_auth.encrypt_text(''x'', ''y'')');
RESET ROLE;
DROP ROLE regress_nobody;

-- DROP EXTENSION then CREATE EXTENSION works again, and the roles survive.
DROP EXTENSION vetassist_auth;
SELECT to_regclass('vetassist_auth.keys') IS NULL AS tables_gone;
CREATE EXTENSION vetassist_auth;
SELECT count(*) FILTER (WHERE ok) AS checks_ok, count(*) AS checks FROM vetassist_auth.verify_installation();
