-- The accounting of disclosures (45 CFR 164.528) and the records auditors read (164.312(b)):
-- docs/hipaa.md. Every disclosure row names the veteran it is about as its subject, and the
-- person who made or saw it as its actor.

-- Why PHI may be disclosed, and whether 164.528(a)(1) requires the disclosure in an accounting.
-- The one list: record_disclosure checks against it, the accounting joins it, clients read it.
CREATE FUNCTION vetassist_auth.disclosure_purposes()
RETURNS TABLE (purpose text, accountable boolean, statement text)
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    VALUES ('treatment', false, 'Treatment (45 CFR 164.506)'),
           ('payment', false, 'Payment (45 CFR 164.506)'),
           ('health_care_operations', false, 'Health care operations (45 CFR 164.506)'),
           ('to_individual', false, 'To the individual (45 CFR 164.502)'),
           ('incidental', false, 'Incidental to a permitted use or disclosure (45 CFR 164.502(a)(1)(iii))'),
           ('authorized', false, 'Authorized by the individual (45 CFR 164.508)'),
           ('directory_or_involved', false, 'Facility directory or persons involved in care (45 CFR 164.510)'),
           ('national_security', false, 'National security or intelligence (45 CFR 164.512(k)(2))'),
           ('correctional_custody', false, 'Correctional institution or law enforcement custody (45 CFR 164.512(k)(5))'),
           ('limited_data_set', false, 'Limited data set (45 CFR 164.514(e))'),
           ('required_by_law', true, 'Required by law (45 CFR 164.512(a))'),
           ('public_health', true, 'Public health activities (45 CFR 164.512(b))'),
           ('abuse_neglect', true, 'Report of abuse, neglect or domestic violence (45 CFR 164.512(c))'),
           ('health_oversight', true, 'Health oversight activities (45 CFR 164.512(d))'),
           ('judicial_administrative', true, 'Judicial or administrative proceedings (45 CFR 164.512(e))'),
           ('law_enforcement', true, 'Law enforcement purposes (45 CFR 164.512(f))'),
           ('decedents', true, 'About a decedent (45 CFR 164.512(g))'),
           ('organ_donation', true, 'Organ, eye or tissue donation (45 CFR 164.512(h))'),
           ('research_waiver', true, 'Research under a waiver of authorization (45 CFR 164.512(i))'),
           ('serious_threat', true, 'To avert a serious threat to health or safety (45 CFR 164.512(j))'),
           ('specialized_government', true, 'Specialized government functions (45 CFR 164.512(k))'),
           ('workers_compensation', true, 'Workers'' compensation (45 CFR 164.512(l))'),
           ('impermissible', true, 'A disclosure the Privacy Rule does not permit (45 CFR 164.528(a))')
$$;
COMMENT ON FUNCTION vetassist_auth.disclosure_purposes() IS
    'The purposes record_disclosure accepts, whether 45 CFR 164.528 requires each in an accounting, and the brief statement of purpose the accounting gives.';

-- A disclosure the application made: to whom, what, why. Recorded like the extension's own
-- disclosures: committed before this returns, whatever becomes of the caller's transaction.
-- Recipient, description and purpose are kept in details: a column of their own would change
-- the encoding every existing seal was computed over.
CREATE FUNCTION vetassist_auth.record_disclosure(subject_user_id uuid, recipient text, description text, purpose text,
                                                 details jsonb DEFAULT '{}')
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    recorded jsonb;
BEGIN
    IF coalesce(btrim(recipient), '') = '' OR length(recipient) > 1000
       OR coalesce(btrim(description), '') = '' OR length(description) > 1000 THEN
        RAISE EXCEPTION 'vetassist_auth: recipient and description must be 1 to 1000 characters' USING ERRCODE = '22023';
    END IF;
    IF purpose IS NULL OR NOT EXISTS (SELECT 1 FROM vetassist_auth.disclosure_purposes() p WHERE p.purpose = record_disclosure.purpose) THEN
        RAISE EXCEPTION 'vetassist_auth: unknown purpose of disclosure' USING ERRCODE = '22023',
            HINT = 'SELECT purpose FROM vetassist_auth.disclosure_purposes() lists them.';
    END IF;
    IF details IS NULL OR jsonb_typeof(details) <> 'object' THEN
        RAISE EXCEPTION 'vetassist_auth: details must be a JSON object' USING ERRCODE = '22023';
    END IF;
    recorded := jsonb_build_object('recipient', recipient, 'description', description, 'purpose', purpose,
                                   'details', details);
    -- What the recorder's outbox slot holds with the rest of the row (docs/api.md says 3 KiB).
    IF pg_column_size(recorded) > 3072 THEN
        RAISE EXCEPTION 'vetassist_auth: recipient, description and details take more than 3 KiB' USING ERRCODE = '22023',
            HINT = 'Keep the disclosed documents elsewhere and name them in details.';
    END IF;
    PERFORM vetassist_auth.require_user(subject_user_id);
    -- In the caller's transaction a ROLLBACK would take the disclosure back.
    IF NOT vetassist_auth.durable_audit_in_force() THEN
        RAISE EXCEPTION 'vetassist_auth: disclosures are recorded only with the library preloaded' USING ERRCODE = '55000',
            HINT = 'Add vetassist_auth to shared_preload_libraries and restart.';
    END IF;
    RETURN vetassist_auth.write_audit_durably('disclosure', 'phi_disclosed', 'success', subject_user_id, NULL, NULL, recorded);
END
$$;
COMMENT ON FUNCTION vetassist_auth.record_disclosure(uuid, text, text, text, jsonb) IS
    'Records a disclosure of a veteran''s PHI (recipient, what, purpose from disclosure_purposes) durably; returns its audit row id.';

-- Every PHI access or disclosure about one veteran in [since, until): the extension's own reads
-- (purpose NULL, never accountable), the views the application reported with audit_event
-- (category phi), and the disclosures it recorded with record_disclosure. Internal; without a
-- SET clause of its own, so that the planner inlines it into its callers (which pin the path).
CREATE FUNCTION vetassist_auth.disclosures_about(subject uuid, since timestamptz, until timestamptz)
RETURNS TABLE (audit_id bigint, occurred_at timestamptz, actor_user_id uuid, recipient text, description text,
               purpose text, accountable boolean, recorded_by text, event_type text, outcome text, db_role text,
               session_id uuid, details jsonb)
LANGUAGE sql STABLE AS $$
    SELECT a.id, a.occurred_at, a.actor_user_id,
           CASE WHEN a.category = 'disclosure' THEN a.details ->> 'recipient' END,
           CASE WHEN a.category = 'disclosure' THEN a.details ->> 'description'
                ELSE a.event_type || coalesce(' (' || (a.details ->> 'field') || ')', '') END,
           p.purpose, coalesce(p.accountable, false),
           CASE WHEN a.category = 'phi_access' THEN 'extension' ELSE 'application' END,
           a.event_type, a.outcome, a.db_role, a.session_id,
           CASE WHEN a.category = 'disclosure' THEN a.details -> 'details' ELSE a.details END
    FROM vetassist_auth.audit_log a
    LEFT JOIN vetassist_auth.disclosure_purposes() p ON a.category = 'disclosure' AND p.purpose = a.details ->> 'purpose'
    WHERE a.subject_user_id = subject AND a.occurred_at >= since AND a.occurred_at < until
      AND a.category IN ('phi', 'phi_access', 'disclosure')
    ORDER BY a.occurred_at, a.id
$$;

-- Raises 22023 unless a subject and a period are given. Internal.
CREATE FUNCTION vetassist_auth.check_period(subject uuid, since timestamptz, until timestamptz) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF subject IS NULL OR since IS NULL OR until IS NULL OR since > until THEN
        RAISE EXCEPTION 'vetassist_auth: a user and a period (since <= until) are required' USING ERRCODE = '22023';
    END IF;
END
$$;

CREATE FUNCTION vetassist_auth.phi_disclosures(user_id uuid, since timestamptz, until timestamptz)
RETURNS TABLE (audit_id bigint, occurred_at timestamptz, actor_user_id uuid, recipient text, description text,
               purpose text, accountable boolean, recorded_by text, event_type text, outcome text, db_role text,
               session_id uuid, details jsonb)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM vetassist_auth.check_period(user_id, since, until);
    -- Reading a veteran's accounting is itself a disclosure: recorded before it is returned.
    PERFORM vetassist_auth.write_audit_durably('audit', 'phi_disclosures_read', 'success', user_id, 'audit_log', NULL,
        jsonb_build_object('since', since, 'until', until));
    RETURN QUERY SELECT * FROM vetassist_auth.disclosures_about(user_id, since, until);
END
$$;
COMMENT ON FUNCTION vetassist_auth.phi_disclosures(uuid, timestamptz, timestamptz) IS
    'Every access to and disclosure of one veteran''s PHI in [since, until): who, to whom, what, why, whether 164.528 requires it in an accounting, and who recorded it.';

CREATE FUNCTION vetassist_auth.accounting_of_disclosures(user_id uuid, since timestamptz DEFAULT now() - interval '6 years')
RETURNS TABLE (disclosed_at timestamptz, recipient text, description text, purpose text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM vetassist_auth.check_period(user_id, since, 'infinity');
    PERFORM vetassist_auth.write_audit_durably('audit', 'accounting_of_disclosures_read', 'success', user_id, 'audit_log', NULL,
        jsonb_build_object('since', since));
    -- Only the disclosures (index audit_log_disclosures), not every PHI row of the veteran.
    RETURN QUERY
    SELECT a.occurred_at, a.details ->> 'recipient', a.details ->> 'description', p.statement
    FROM vetassist_auth.audit_log a
    JOIN vetassist_auth.disclosure_purposes() p ON p.purpose = a.details ->> 'purpose'
    WHERE a.subject_user_id = accounting_of_disclosures.user_id AND a.category = 'disclosure'
      AND a.occurred_at >= since AND p.accountable
    ORDER BY a.occurred_at, a.id;
END
$$;
COMMENT ON FUNCTION vetassist_auth.accounting_of_disclosures(uuid, timestamptz) IS
    'The accounting of disclosures a veteran may request under 45 CFR 164.528(b)(2): date, recipient, brief description and brief statement of purpose of each accountable disclosure since then (six years by default).';

-- The veteran's own view, through the application: only the signed-in veteran's rows, only in
-- a live session that needs no more MFA. Any other call is 28000, whichever session it names.
CREATE FUNCTION vetassist_auth.my_disclosures(jwt_id text, since timestamptz DEFAULT now() - interval '6 years')
RETURNS TABLE (occurred_at timestamptz, actor_user_id uuid, recipient text, description text, purpose text,
               accountable boolean, recorded_by text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    -- In a REPEATABLE READ transaction a session ended after its snapshot is a serialization
    -- failure (40001), never a live session (request_session).
    s vetassist_auth.sessions := vetassist_auth.request_session(jwt_id);
BEGIN
    IF s.id IS NULL THEN
        RAISE EXCEPTION 'vetassist_auth: no live session' USING ERRCODE = '28000';
    END IF;
    PERFORM vetassist_auth.require_live(s);
    IF vetassist_auth.mfa_pending(s) THEN
        RAISE EXCEPTION 'vetassist_auth: the session has not completed MFA' USING ERRCODE = '28000';
    END IF;
    PERFORM vetassist_auth.check_period(s.user_id, since, 'infinity');
    -- Recorded as the veteran's own access, in this session, with the actor the application
    -- named for the transaction, if another.
    PERFORM vetassist_auth.write_audit_durably_by_subject(s.user_id, s.id, 'my_disclosures_read',
        jsonb_build_object('since', since) || CASE WHEN vetassist_auth.current_actor() <> s.user_id
            THEN jsonb_build_object('requested_by', vetassist_auth.current_actor()) ELSE '{}' END);
    RETURN QUERY
    SELECT d.occurred_at, d.actor_user_id, d.recipient, d.description, d.purpose, d.accountable, d.recorded_by
    FROM vetassist_auth.disclosures_about(s.user_id, since, 'infinity') d;
END
$$;
COMMENT ON FUNCTION vetassist_auth.my_disclosures(text, timestamptz) IS
    'For the veteran signed in with this session (live, MFA done): every access to and disclosure of their PHI since then. 28000 otherwise.';

-- Crisis events (severity crisis, every veteran) and one veteran's session events, for the
-- responders' and privacy officers' record: a NOTIFY is only a wake-up.
CREATE FUNCTION vetassist_auth.crisis_events(since timestamptz)
RETURNS TABLE (event_id bigint, occurred_at timestamptz, user_id uuid, session_id uuid, event_type text, details jsonb)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF since IS NULL THEN
        RAISE EXCEPTION 'vetassist_auth: since must not be NULL' USING ERRCODE = '22023';
    END IF;
    PERFORM vetassist_auth.write_audit_durably('audit', 'crisis_events_read', 'success', NULL, 'session_events', NULL,
        jsonb_build_object('since', since));
    RETURN QUERY
    SELECT e.id, e.occurred_at, e.user_id, e.session_id, e.event_type, e.details
    FROM vetassist_auth.session_events e
    WHERE e.severity = 'crisis' AND e.occurred_at >= since
    ORDER BY e.occurred_at, e.id;
END
$$;
COMMENT ON FUNCTION vetassist_auth.crisis_events(timestamptz) IS
    'Crisis events of every veteran since then, oldest first; the read is audited.';

CREATE FUNCTION vetassist_auth.session_events_of(user_id uuid, since timestamptz)
RETURNS TABLE (event_id bigint, occurred_at timestamptz, session_id uuid, event_type text, severity text, details jsonb)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM vetassist_auth.check_period(user_id, since, 'infinity');
    PERFORM vetassist_auth.write_audit_durably('audit', 'session_events_read', 'success', user_id, 'session_events', NULL,
        jsonb_build_object('since', since));
    RETURN QUERY
    SELECT e.id, e.occurred_at, e.session_id, e.event_type, e.severity, e.details
    FROM vetassist_auth.session_events e
    WHERE e.user_id = session_events_of.user_id AND e.occurred_at >= since
    ORDER BY e.occurred_at, e.id;
END
$$;
COMMENT ON FUNCTION vetassist_auth.session_events_of(uuid, timestamptz) IS
    'One veteran''s session events (every severity) since then, oldest first; the read is audited.';

-- Who may call the functions of this file (any other function of the extension: no role,
-- sql/grants.sql).
GRANT EXECUTE ON FUNCTION vetassist_auth.disclosure_purposes() TO vetassist_app, vetassist_auditor;
GRANT EXECUTE ON FUNCTION vetassist_auth.record_disclosure(uuid, text, text, text, jsonb) TO vetassist_app;
GRANT EXECUTE ON FUNCTION vetassist_auth.phi_disclosures(uuid, timestamptz, timestamptz) TO vetassist_auditor;
GRANT EXECUTE ON FUNCTION vetassist_auth.accounting_of_disclosures(uuid, timestamptz) TO vetassist_auditor;
GRANT EXECUTE ON FUNCTION vetassist_auth.my_disclosures(text, timestamptz) TO vetassist_app;
GRANT EXECUTE ON FUNCTION vetassist_auth.crisis_events(timestamptz) TO vetassist_auditor;
GRANT EXECUTE ON FUNCTION vetassist_auth.session_events_of(uuid, timestamptz) TO vetassist_auditor;
