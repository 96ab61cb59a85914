// Calling the vetassist_auth SQL API from Node with pg: one transaction per request, the actor
// named with set_actor, every value a bound parameter, SQLSTATEs mapped to Error subclasses.
import pg from 'pg';

export class VetAssistError extends Error {
  constructor(message, sqlstate, options) {
    super(message, options);
    this.name = new.target.name;
    this.sqlstate = sqlstate;
  }
}
export class KeyNotConfigured extends VetAssistError {}
export class CiphertextInvalid extends VetAssistError {}
export class InvalidArgument extends VetAssistError {}
export class AuthenticationRefused extends VetAssistError {}
export class NotFound extends VetAssistError {}
export class TokenExpired extends VetAssistError {}
export class DuplicateSession extends VetAssistError {}
export class PermissionDenied extends VetAssistError {}

const BY_SQLSTATE = {
  '55000': KeyNotConfigured,
  'XX001': CiphertextInvalid,
  '22023': InvalidArgument,
  '22P02': InvalidArgument,
  '28000': AuthenticationRefused,
  'P0002': NotFound,
  'VA001': TokenExpired,
  '23505': DuplicateSession,
  '42501': PermissionDenied,
};

// Server errors become VetAssistError subclasses carrying the primary message only (DETAIL is
// dropped, and so is the value PostgreSQL quotes at the end of input-syntax errors); the pg
// error stays available as `cause`. Anything else (connection errors, bugs) passes unchanged.
export function translate(err) {
  if (!(err instanceof pg.DatabaseError)) return err;
  const Class = BY_SQLSTATE[err.code] ?? VetAssistError;
  return new Class(err.message.replace(/:\s*".*"$/s, ''), err.code, { cause: err });
}

export function createPool(connectionString) {
  return new pg.Pool({ connectionString, max: 10 });
}

// Runs fn(client) in one transaction with the actor set; commits, or rolls back and throws.
export async function withRequest(pool, { actorUserId = null, clientIp = null } = {}, fn) {
  const client = await pool.connect();
  let broken;
  try {
    await client.query('BEGIN');
    if (actorUserId !== null || clientIp !== null) {
      await client.query('SELECT vetassist_auth.set_actor($1, $2)', [actorUserId, clientIp]);
    }
    const result = await fn(client);
    await client.query('COMMIT');
    return result;
  } catch (err) {
    await client.query('ROLLBACK').catch((e) => { broken = e; });
    throw translate(err);
  } finally {
    client.release(broken);  // a connection that cannot roll back is discarded
  }
}

async function value(client, text, params) {
  const { rows } = await client.query({ text, values: params, rowMode: 'array' });
  return rows[0][0];
}

// After the VA.gov OAuth callback: account, encrypted VA tokens and a session, atomically.
export async function signIn(pool, { icn, veteranStatus = null, email = null, firstName = null, lastName = null,
                                     accessToken, refreshToken = null, tokenExpiresAt, scope = null,
                                     jwtId, sessionExpiresAt, ip = null, userAgent = null }) {
  return withRequest(pool, { clientIp: ip }, async (client) => {
    const userId = await value(client, 'SELECT vetassist_auth.upsert_va_user($1, $2, $3, $4, $5)',
                               [icn, veteranStatus, email, firstName, lastName]);
    await value(client, 'SELECT vetassist_auth.store_va_tokens($1, $2, $3, $4, $5)',
                [userId, accessToken, refreshToken, tokenExpiresAt, scope]);
    const sessionId = await value(client,
      'SELECT vetassist_auth.create_session($1, $2, $3, $4::inet, $5, NULL, NULL)',
      [userId, jwtId, sessionExpiresAt, ip, userAgent]);
    return { userId, sessionId };
  });
}

// Every API request: 'ACTIVE', or why the session is unusable ('EXPIRED', 'TERMINATED', 'LOCKED').
export async function touch(pool, jwtId, actor = {}) {
  return withRequest(pool, actor, (client) =>
    value(client, 'SELECT vetassist_auth.touch_session($1)::text', [jwtId]));
}

// The status without recording activity; ::text because session_status is also a type name.
export async function sessionStatus(pool, jwtId) {
  return withRequest(pool, {}, (client) =>
    value(client, 'SELECT vetassist_auth.session_status($1::text)::text', [jwtId]));
}

// The VA access token (null if none); rejects with TokenExpired once it has expired.
export async function vaAccessToken(pool, userId) {
  return withRequest(pool, { actorUserId: userId }, (client) =>
    value(client, 'SELECT vetassist_auth.va_access_token($1)', [userId]));
}

// Logout: false if the session had already ended.
export async function signOut(pool, jwtId, actor = {}) {
  return withRequest(pool, actor, (client) =>
    value(client, 'SELECT vetassist_auth.end_session($1, $2)', [jwtId, 'logout']));
}
