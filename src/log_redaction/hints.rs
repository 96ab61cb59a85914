//! Hints for the errors Postgres raises about a call of ours before any code of ours runs: an
//! argument its input function cannot read (22P02, 22007 for a date or time), a function the
//! caller's role may not execute (42501). Each names what is expected or whom to grant, never the value
//! (docs/api.md, "Error codes").

include!(concat!(env!("OUT_DIR"), "/function_grantees.rs"));

/// The roles in the order a hint suggests them: the least privileged first.
const ROLES_BY_PRIVILEGE: [&str; 3] = ["vetassist_app", "vetassist_auditor", "vetassist_admin"];

/// The hint for an error of this SQLSTATE (ErrorData's `sqlerrcode`) and message, if it is one
/// of them.
pub fn hint_for(sqlerrcode: i32, message: &str) -> Option<String> {
    use pgrx::PgSqlErrorCode::*;
    const INVALID_TEXT: i32 = ERRCODE_INVALID_TEXT_REPRESENTATION as i32;
    const INVALID_DATETIME: i32 = ERRCODE_INVALID_DATETIME_FORMAT as i32;
    const DENIED: i32 = ERRCODE_INSUFFICIENT_PRIVILEGE as i32;
    match sqlerrcode {
        INVALID_TEXT | INVALID_DATETIME => input_format_hint(message),
        DENIED => grant_hint(message),
        _ => None,
    }
}

fn input_format_hint(message: &str) -> Option<String> {
    const SYNTAX: &str = "invalid input syntax for type ";
    if message.starts_with("invalid input value for enum vetassist_auth.session_status") {
        return Some(
            "vetassist_auth.session_status('…') with one text literal reads as a cast to the enum \
             of that name: call the function as session_status(jwt_id => '…')."
                .to_owned(),
        );
    }
    let expected = match message.strip_prefix(SYNTAX)?.split(':').next()? {
        "uuid" => "a uuid: 32 hexadecimal digits, as 123e4567-e89b-12d3-a456-426614174000",
        "inet" => "an IP address, as 203.0.113.7 or 2001:db8::1",
        "timestamp with time zone" => "a time, as 2026-12-04 15:30:00+00",
        "interval" => "an interval, as '15 minutes' or '6 years'",
        "integer" | "bigint" => "a whole number",
        _ => return None,
    };
    Some(format!(
        "The argument marked in the statement must be {expected}."
    ))
}

fn grant_hint(message: &str) -> Option<String> {
    if let Some(name) = message.strip_prefix("permission denied for function ") {
        let granted = FUNCTION_GRANTEES
            .binary_search_by(|(f, _)| (*f).cmp(name))
            .ok()
            .map(|i| FUNCTION_GRANTEES[i].1)?;
        // The message names no schema: the hint says which function it is about.
        let roles: Vec<&str> = ROLES_BY_PRIVILEGE
            .into_iter()
            .filter(|r| granted.contains(r))
            .collect();
        return Some(format!(
            "If this is vetassist_auth.{name}: it is granted to {}; GRANT the one the login acts as TO it.",
            roles.join(" or ")
        ));
    }
    (message == "permission denied for schema vetassist_auth").then(|| {
        "The extension is used through its roles: GRANT vetassist_app (the application), \
         vetassist_auditor or vetassist_admin TO the calling login role."
            .to_owned()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgrx::PgSqlErrorCode::*;

    const DENIED: i32 = ERRCODE_INSUFFICIENT_PRIVILEGE as i32;
    const INVALID_TEXT: i32 = ERRCODE_INVALID_TEXT_REPRESENTATION as i32;

    #[test]
    fn every_granted_function_names_its_roles_in_a_denial() {
        assert!(
            FUNCTION_GRANTEES.windows(2).all(|w| w[0].0 < w[1].0),
            "sorted for the search"
        );
        let hint = hint_for(DENIED, "permission denied for function authenticate").unwrap();
        assert_eq!(
            hint,
            "If this is vetassist_auth.authenticate: it is granted to vetassist_app; \
             GRANT the one the login acts as TO it."
        );
        let hint = hint_for(DENIED, "permission denied for function end_user_sessions");
        assert!(
            hint.as_deref()
                .is_some_and(|h| h.contains("vetassist_app or vetassist_admin")),
            "least privileged first: {hint:?}"
        );
        assert_eq!(
            hint_for(DENIED, "permission denied for function write_audit"),
            None
        );
    }

    #[test]
    fn a_malformed_argument_is_explained_without_its_value() {
        let hint = hint_for(
            INVALID_TEXT,
            "invalid input syntax for type uuid: \"<redacted>\"",
        )
        .unwrap();
        assert!(
            hint.contains("32 hexadecimal digits") && !hint.contains("redacted"),
            "{hint}"
        );
        assert!(hint_for(
            INVALID_TEXT,
            "invalid input value for enum vetassist_auth.session_status: \"<redacted>\""
        )
        .unwrap()
        .contains("jwt_id =>"));
        assert_eq!(
            hint_for(INVALID_TEXT, "invalid input syntax for type point: \"x\""),
            None
        );
    }

    #[test]
    fn a_malformed_time_is_explained_and_other_errors_get_no_hint() {
        let hint = hint_for(
            ERRCODE_INVALID_DATETIME_FORMAT as i32,
            "invalid input syntax for type timestamp with time zone: \"<redacted>\"",
        );
        assert!(hint.is_some_and(|h| h.contains("2026-12-04 15:30:00+00")));
        assert_eq!(
            hint_for(
                ERRCODE_INVALID_PARAMETER_VALUE as i32,
                "invalid input syntax for type uuid: \"x\""
            ),
            None
        );
    }
}
