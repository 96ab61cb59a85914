//! One place that maps every failure to its documented SQLSTATE (docs/api.md, "Error codes").
//! Messages are fixed texts or name only identifiers: never a key, token, code or PHI.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// 55000: no usable master key, or a data key at its encryption limit.
    NotConfigured,
    /// XX001: a ciphertext or wrapped key fails authentication.
    DataCorrupted,
    /// 22023: a well-formed argument the function does not accept.
    InvalidArgument,
    /// 22P02: an argument given as text that is not in its format (an IP address), as
    /// Postgres's input functions report a malformed typed one.
    Malformed,
    /// 42501: the caller lacks a privilege the function needs.
    InsufficientPrivilege,
    /// P0002: the object named does not exist (or is not in the state asked for).
    NotFound,
    /// 53000: the audit recorder cannot take a row now (no worker slot, outbox full).
    InsufficientResources,
    /// 22021: a decrypted value is not valid text (a NUL byte).
    NotText,
}

impl Kind {
    fn sqlstate(self) -> PgSqlErrorCode {
        match self {
            Kind::NotConfigured => PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            Kind::DataCorrupted => PgSqlErrorCode::ERRCODE_DATA_CORRUPTED,
            Kind::InvalidArgument => PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            Kind::Malformed => PgSqlErrorCode::ERRCODE_INVALID_TEXT_REPRESENTATION,
            Kind::InsufficientPrivilege => PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            Kind::NotFound => PgSqlErrorCode::ERRCODE_NO_DATA_FOUND,
            Kind::InsufficientResources => PgSqlErrorCode::ERRCODE_INSUFFICIENT_RESOURCES,
            Kind::NotText => PgSqlErrorCode::ERRCODE_CHARACTER_NOT_IN_REPERTOIRE,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub kind: Kind,
    pub message: String,
    pub hint: Option<String>,
}

impl Failure {
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        Failure {
            kind,
            message: message.into(),
            hint: None,
        }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Raises the failure as a Postgres ERROR; does not return.
    pub fn raise(self) -> ! {
        let mut report = ErrorReport::new(self.kind.sqlstate(), self.message, "vetassist_auth");
        if let Some(hint) = self.hint {
            report = report.set_hint(hint);
        }
        report.report(PgLogLevel::ERROR);
        unreachable!("an ERROR report does not return")
    }
}

/// Ciphertexts that fail authentication all get the same message, whatever the cause,
/// so the error is no oracle for which part of the input was wrong.
impl From<crate::crypto::Error> for Failure {
    fn from(err: crate::crypto::Error) -> Self {
        use crate::crypto::Error;
        match err {
            Error::Authentication | Error::Malformed => Failure::new(
                Kind::DataCorrupted,
                "vetassist_auth: ciphertext cannot be decrypted (wrong key or context, or damaged data)",
            ),
            Error::BadMasterKey => Failure::new(Kind::NotConfigured, "vetassist_auth: the master key is malformed")
                .with_hint("The master key must be 64 hexadecimal characters (32 bytes)."),
            Error::Random => Failure::new(Kind::NotConfigured, "vetassist_auth: the operating system RNG failed"),
        }
    }
}

pub type Result<T> = std::result::Result<T, Failure>;

/// Unwraps a result or raises its failure as a Postgres ERROR.
pub trait OrRaise<T> {
    fn or_raise(self) -> T;
}

impl<T, E: Into<Failure>> OrRaise<T> for std::result::Result<T, E> {
    fn or_raise(self) -> T {
        self.unwrap_or_else(|e| e.into().raise())
    }
}
