// SQLSTATE -> Error class for the vetassist_auth SQL API. The class names are the Python
// client's (vetassist_client.errors) where it has one; the SQLSTATEs are the "Error codes"
// table of docs/api.md (test/errors.test.mjs reads that table and checks every row maps here).
//
// Messages are the server's primary message only. The extension's own messages never contain
// argument values; core PostgreSQL input-syntax errors quote the rejected value at the end
// (`invalid input syntax for type inet: "..."`), so that quoted value is cut off. DETAIL and
// the original pg error (kept as `cause`) are left out of the message; the hint is kept (the
// extension's hints name the expected format or the role to grant, never a value).
import pg from 'pg';

export class VetAssistError extends Error {
  /** @type {string | null} */
  static sqlstate = null;

  constructor(message, sqlstate = null, options = undefined) {
    super(message, options);
    this.name = new.target.name;
    /** The server's SQLSTATE; null for a client-side error. */
    this.sqlstate = sqlstate ?? new.target.sqlstate;
    /** The server's HINT, if any (never a value). */
    this.hint = options?.hint ?? null;
  }
}

/** 55000: no usable master key, a data key at its limit, a write on a subscriber or standby, record_disclosure without the preloaded library. */
export class KeyNotConfigured extends VetAssistError { static sqlstate = '55000'; }
/** XX001: a ciphertext or wrapped key fails authentication. */
export class CiphertextInvalid extends VetAssistError { static sqlstate = 'XX001'; }
/** 22023: a well-formed argument the function does not accept. */
export class InvalidArgument extends VetAssistError { static sqlstate = '22023'; }
/** 22P02: malformed typed input (uuid, inet, timestamptz, enum literal); an InvalidArgument, as in Python. */
export class MalformedInput extends InvalidArgument { static sqlstate = '22P02'; }
/** 22007: malformed date/time input (a timestamptz or interval literal Postgres cannot read); a MalformedInput. */
export class MalformedTime extends MalformedInput { static sqlstate = '22007'; }
/** 28000: deactivated account, ended session, MFA lock-out. */
export class AuthenticationRefused extends VetAssistError { static sqlstate = '28000'; }
/** 53000: the audit recorder cannot record a disclosure now; nothing was disclosed (retry later). */
export class RecorderUnavailable extends VetAssistError { static sqlstate = '53000'; }
/** 22021: decrypt_text of a value holding a NUL byte (use decrypt). */
export class NotText extends VetAssistError { static sqlstate = '22021'; }
/** P0002: unknown user or session; a key that is not retired or already destroyed. */
export class NotFound extends VetAssistError { static sqlstate = 'P0002'; }
/** 23505: a session with this jwt_id already exists. */
export class DuplicateSession extends VetAssistError { static sqlstate = '23505'; }
/** 42501: no privilege (the hint names the role to grant), or a change to the append-only audit tables. */
export class PermissionDenied extends VetAssistError { static sqlstate = '42501'; }
/** 40001: a concurrent change of one account during upsert_va_user; retry the request. */
export class ConcurrentChange extends VetAssistError { static sqlstate = '40001'; }
/** VA001: the VA access token has expired (refresh it and store_va_tokens). */
export class TokenExpired extends VetAssistError { static sqlstate = 'VA001'; }

/** Request-level misuse detected by the client (a call after the request ended); sqlstate null. */
export class RequestClosed extends VetAssistError {}

/**
 * The request's transaction was rolled back instead of committed: a call inside it failed and
 * the error was caught, so PostgreSQL aborted the transaction and COMMIT answered ROLLBACK.
 * Nothing the request wrote was kept; sqlstate null, `cause` the failure the client saw (if any).
 */
export class TransactionAborted extends VetAssistError {}

const CLASSES = [KeyNotConfigured, CiphertextInvalid, InvalidArgument, MalformedInput, MalformedTime, AuthenticationRefused,
  RecorderUnavailable, NotText, NotFound, DuplicateSession, PermissionDenied, ConcurrentChange, TokenExpired];

/** Every documented SQLSTATE and its class. */
export const ERROR_CLASSES = Object.freeze(Object.fromEntries(CLASSES.map((c) => [c.sqlstate, c])));

/** The class a SQLSTATE maps to (VetAssistError for an undocumented one). */
export function errorClassFor(sqlstate) {
  return Object.hasOwn(ERROR_CLASSES, sqlstate ?? '') ? ERROR_CLASSES[sqlstate] : VetAssistError;
}

const QUOTED_VALUE = /:\s*".*"$/s;

/**
 * A server error (pg.DatabaseError) as the VetAssistError of its SQLSTATE, the pg error as
 * `cause`; anything else (connection errors, bugs, VetAssistErrors) is returned unchanged.
 */
export function translate(err) {
  if (!(err instanceof pg.DatabaseError)) return err;
  const Class = errorClassFor(err.code);
  const message = (err.message || err.code || 'database error').replace(QUOTED_VALUE, '');
  return new Class(message, err.code ?? null, { cause: err, hint: err.hint ?? null });
}
