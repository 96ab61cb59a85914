// vetassist-client: a typed client for the vetassist_auth SQL API on pg (node-postgres).
//
// One application request is one transaction on one pooled connection. `authenticated()` opens
// it with vetassist_auth.authenticate(jwt_id, client_ip), which validates and touches the
// session and, for an ACTIVE one, names the actor, session and client address on every audit
// row the request writes; `request()` opens it with set_actor for calls not tied to a session
// (the sign-in callback). Commit at the end, roll back on a throw; a COMMIT the server answers
// with ROLLBACK (a failed call the caller caught aborted the transaction) is TransactionAborted. The auditor's and the
// administrator's functions are on scopes of their own (`auditor()`, `admin()`), for pools
// connected as members of vetassist_auditor and vetassist_admin.
//
// Every call names its SQL signature with casts, positionally (test/coverage.test.mjs checks
// each against the catalog), except session_status, called as session_status(jwt_id => $1)
// because it shares its name with the enum type.
import { isIP } from 'node:net';
import pg from 'pg';
import { RequestClosed, TransactionAborted, translate } from './errors.js';

export * from './errors.js';

// bigint results (audit ids, counts, seqs) as numbers; a value past 2^53 would be an error,
// never a silently rounded id. Only this client's queries use these parsers, not the pool's.
const INT8_OID = 20;
const parseInt8 = (text) => {
  const n = Number(text);
  if (!Number.isSafeInteger(n)) throw new RangeError('vetassist-client: a bigint result is beyond 2^53');
  return n;
};
const TYPES = {
  getTypeParser(oid, format) {
    return oid === INT8_OID && format !== 'binary' ? parseInt8 : pg.types.getTypeParser(oid, format);
  },
};

const camel = (name) => name.replace(/_([a-z])/g, (_, c) => c.toUpperCase());
function camelRow(row) {
  const out = {};
  for (const [k, v] of Object.entries(row)) out[camel(k)] = v;
  return out;
}
const json = (value, fallback) => JSON.stringify(value ?? fallback);

/**
 * The client address for set_actor/authenticate/create_session: a valid IPv4 or IPv6 address
 * (an IPv6 zone index, which PostgreSQL's inet does not take, is dropped), otherwise null and a
 * warning that does not contain the value. A bad address never fails a request.
 */
export function normalizeClientIp(ip, warn = defaultWarn) {
  if (ip === null || ip === undefined || ip === '') return null;
  if (typeof ip === 'string') {
    const bare = ip.includes('%') ? ip.slice(0, ip.indexOf('%')) : ip;
    if (isIP(bare) !== 0) return bare;
  }
  warn('vetassist-client: the client IP address is not a valid IPv4 or IPv6 address; it is recorded as unknown (null)');
  return null;
}

function defaultWarn(message) {
  process.emitWarning(message, { code: 'VETASSIST_CLIENT_IP' });
}

// One open transaction on one pooled connection.
class Transaction {
  #conn;
  #pool;
  #done = false;
  /** @type {Error | undefined} */
  #abortedBy = undefined;

  constructor(pool, conn) {
    this.#pool = pool;
    this.#conn = conn;
  }

  get connection() {
    if (this.#done) throw new RequestClosed('vetassist-client: this request has ended (committed or rolled back)');
    return this.#conn;
  }

  get done() {
    return this.#done;
  }

  async query(text, values = [], rowMode = undefined) {
    const conn = this.connection;
    try {
      return await conn.query({ text, values, rowMode, types: TYPES });
    } catch (err) {
      const error = translate(err);
      // A server error aborts the transaction, caught or not: the first one is the cause of the
      // TransactionAborted that commit() throws.
      if (err instanceof pg.DatabaseError) this.#abortedBy ??= error;
      throw error;
    }
  }

  async commit() {
    if (this.#done) return;
    this.#done = true;
    let result;
    try {
      result = await this.#conn.query('COMMIT');
    } catch (err) {
      // A failed COMMIT ends the transaction (rolled back); the connection may be unusable.
      this.#conn.release(err);
      throw translate(err);
    }
    this.#conn.release();
    // COMMIT of an aborted transaction (a failed statement the caller caught, through this
    // client or on req.connection) succeeds with the command tag ROLLBACK: nothing was kept.
    if (result?.command !== 'COMMIT') {
      throw new TransactionAborted('vetassist-client: the transaction was rolled back, not committed: a statement'
        + ' in it failed (the error was caught) and aborted it', null, this.#abortedBy ? { cause: this.#abortedBy } : undefined);
    }
  }

  async rollback() {
    if (this.#done) return;
    this.#done = true;
    let broken;
    await this.#conn.query('ROLLBACK').catch((e) => { broken = e; });
    this.#conn.release(broken);  // a connection that cannot roll back is discarded
  }
}

class Scope {
  /** @param {Transaction} tx */
  constructor(tx) {
    this._tx = tx;
  }

  /** The request's pg client, for the application's own queries in the same transaction. */
  get connection() {
    return this._tx.connection;
  }

  async _rows(text, values) {
    return (await this._tx.query(text, values)).rows.map(camelRow);
  }

  async _row(text, values) {
    const rows = await this._rows(text, values);
    return rows[0] ?? null;
  }

  async _value(text, values) {
    const { rows } = await this._tx.query(text, values, 'array');
    return rows.length ? rows[0][0] : null;
  }

  async _column(text, values) {
    const { rows } = await this._tx.query(text, values, 'array');
    return rows.map((r) => r[0]);
  }
}

// Functions granted to more than one role, shared by the scopes that may call them.
const shared = {
  // app, admin
  async setActor(userId, clientIp = null) {
    await this._value('SELECT vetassist_auth.set_actor($1::uuid, $2::text)',
      [userId ?? null, normalizeClientIp(clientIp, this._warn)]);
  },
  async auditEvent(category, eventType, outcome, details = {}, subjectUserId = null) {
    return this._value('SELECT vetassist_auth.audit_event($1::text, $2::text, $3::text, $4::jsonb, $5::uuid)',
      [category, eventType, outcome, json(details, {}), subjectUserId]);
  },
  async deactivateUser(userId, reason) {
    await this._value('SELECT vetassist_auth.deactivate_user($1::uuid, $2::text)', [userId, reason]);
  },
  async endUserSessions(userId, reason) {
    return this._value('SELECT vetassist_auth.end_user_sessions($1::uuid, $2::text)', [userId, reason]);
  },
  async expireSessions(batchSize = 10000) {
    return this._value('SELECT vetassist_auth.expire_sessions($1::integer)', [batchSize]);
  },
  async mfaDisable(userId) {
    return this._value('SELECT vetassist_auth.mfa_disable($1::uuid)', [userId]);
  },
  // app, admin, auditor
  async nodeRole() {
    return this._value('SELECT vetassist_auth.node_role()', []);
  },
  // app, auditor
  async disclosurePurposes() {
    return this._rows('SELECT purpose, accountable, statement FROM vetassist_auth.disclosure_purposes()', []);
  },
  // admin, auditor
  async auditChainHead() {
    return this._row('SELECT seq, hash, sealed_at FROM vetassist_auth.audit_chain_head()', []);
  },
  async auditChainHeads() {
    return this._rows('SELECT node, seq, hash, sealed_at FROM vetassist_auth.audit_chain_heads()', []);
  },
  async auditSealStatus() {
    return this._row('SELECT head_seq, head_sealed_at, sealed_through_id, waiting_rows, sealer_pid'
      + ' FROM vetassist_auth.audit_seal_status()', []);
  },
  async protectedColumns() {
    return this._rows('SELECT table_name, column_name, purpose, row_id, context_name, context_id, hash_field,'
      + ' hash_of, decrypt_is_disclosure FROM vetassist_auth.protected_columns()', []);
  },
  async verifyAuditChain(anchor = undefined) {
    const cols = 'SELECT ok, checked, first_bad_seq, problem';
    if (anchor === undefined || anchor === null) {
      return this._row(`${cols} FROM vetassist_auth.verify_audit_chain()`, []);
    }
    if (anchor.timeline === undefined && anchor.lsn === undefined) {
      return this._row(`${cols} FROM vetassist_auth.verify_audit_chain($1::bigint, $2::bytea)`,
        [anchor.seq, anchor.hash]);
    }
    return this._row(`${cols} FROM vetassist_auth.verify_audit_chain($1::bigint, $2::bytea, $3::integer, $4::text)`,
      [anchor.seq, anchor.hash, anchor.timeline, anchor.lsn]);
  },
  async verifyAuditChainAt(node, anchorSeq, anchorHash) {
    return this._row('SELECT ok, checked, first_bad_seq, problem'
      + ' FROM vetassist_auth.verify_audit_chain_at($1::text, $2::bigint, $3::bytea)', [node, anchorSeq, anchorHash]);
  },
  async verifyInstallation() {
    return this._rows('SELECT check_name, ok, detail FROM vetassist_auth.verify_installation()', []);
  },
};

function mixin(Class, names) {
  for (const name of names) Class.prototype[name] = shared[name];
}

/** The vetassist_app calls of one application request, all in its transaction. */
export class AppRequest extends Scope {
  constructor(tx, warn) {
    super(tx);
    this._warn = warn;
  }

  // Identity
  async upsertVaUser(vaIcn, veteranStatus, email, firstName, lastName) {
    return this._value('SELECT vetassist_auth.upsert_va_user($1::text, $2::text, $3::text, $4::text, $5::text)',
      [vaIcn, veteranStatus ?? null, email ?? null, firstName ?? null, lastName ?? null]);
  }
  async findUserByIcn(vaIcn) {
    return this._value('SELECT vetassist_auth.find_user_by_icn($1::text)', [vaIcn]);
  }
  async findUsersByEmail(email) {
    return this._column('SELECT * FROM vetassist_auth.find_users_by_email($1::text)', [email]);
  }
  async userProfile(userId) {
    return this._row('SELECT id, va_icn, veteran_status, email, first_name, last_name, is_active, mfa_enabled,'
      + ' created_at, last_login_at FROM vetassist_auth.user_profile($1::uuid)', [userId]);
  }

  // VA tokens
  async storeVaTokens(userId, accessToken, refreshToken, expiresAt, scope = null) {
    return this._value('SELECT vetassist_auth.store_va_tokens($1::uuid, $2::text, $3::text, $4::timestamptz, $5::text)',
      [userId, accessToken, refreshToken ?? null, expiresAt, scope]);
  }
  async vaAccessToken(userId) {
    return this._value('SELECT vetassist_auth.va_access_token($1::uuid)', [userId]);
  }
  async vaRefreshToken(userId) {
    return this._value('SELECT vetassist_auth.va_refresh_token($1::uuid)', [userId]);
  }
  async vaTokensDue(within) {
    return this._column('SELECT * FROM vetassist_auth.va_tokens_due($1::interval)', [within]);
  }
  async deleteVaTokens(userId) {
    return this._value('SELECT vetassist_auth.delete_va_tokens($1::uuid)', [userId]);
  }

  // Sessions
  async authenticate(jwtId, clientIp = null) {
    return authRow(await this._row('SELECT status::text, reason, user_id, session_id, mfa_required, idle_expires_at,'
      + ' absolute_expires_at FROM vetassist_auth.authenticate($1::text, $2::inet)',
    [jwtId, normalizeClientIp(clientIp, this._warn)]));
  }
  async createSession(userId, jwtId, expiresAt, { ip = null, userAgent = null, deviceFingerprint = null,
    deviceInfo = null } = {}) {
    return this._value('SELECT vetassist_auth.create_session($1::uuid, $2::text, $3::timestamptz, $4::inet, $5::text,'
      + ' $6::text, $7::jsonb)', [userId, jwtId, expiresAt, normalizeClientIp(ip, this._warn), userAgent,
      deviceFingerprint, deviceInfo === null ? null : json(deviceInfo)]);
  }
  async touchSession(jwtId) {
    return this._value('SELECT vetassist_auth.touch_session($1::text)::text', [jwtId]);
  }
  async sessionStatus(jwtId) {
    // Named: session_status('x') would be read as a cast to the enum type session_status.
    return this._value('SELECT vetassist_auth.session_status(jwt_id => $1)::text', [jwtId]);
  }
  async endSession(jwtId, reason = 'logout') {
    return this._value('SELECT vetassist_auth.end_session($1::text, $2::text)', [jwtId, reason]);
  }
  async lockSession(jwtId, reason) {
    return this._value('SELECT vetassist_auth.lock_session($1::text, $2::text)', [jwtId, reason]);
  }
  async refreshSessionToken(jwtId, presented, replacement) {
    const row = await this._row('SELECT generation, refresh_token'
      + ' FROM vetassist_auth.refresh_session_token($1::text, $2::text, $3::text)', [jwtId, presented ?? null, replacement]);
    return row === null || row.generation === null ? null : row;
  }
  async rotateSessionRefreshToken(jwtId, presented, replacement) {
    return this._value('SELECT vetassist_auth.rotate_session_refresh_token($1::text, $2::text, $3::text)',
      [jwtId, presented ?? null, replacement]);
  }
  async logSessionEvent(jwtId, eventType, severity, details = {}) {
    return this._value('SELECT vetassist_auth.log_session_event($1::text, $2::text, $3::text, $4::jsonb)',
      [jwtId, eventType, severity, json(details, {})]);
  }
  async verifyCrisisNotice(payload) {
    return this._value('SELECT vetassist_auth.verify_crisis_notice($1::text)', [payload]);
  }

  // MFA
  async mfaEnrollTotp(userId) {
    return this._value('SELECT vetassist_auth.mfa_enroll_totp($1::uuid)', [userId]);
  }
  async mfaConfirmTotp(userId, code, jwtId = null) {
    return this._value('SELECT vetassist_auth.mfa_confirm_totp($1::uuid, $2::text, $3::text)', [userId, code, jwtId]);
  }
  async mfaRequired(jwtId) {
    return this._value('SELECT vetassist_auth.mfa_required($1::text)', [jwtId]);
  }
  async mfaVerify(jwtId, code) {
    return this._value('SELECT vetassist_auth.mfa_verify($1::text, $2::text)', [jwtId, code]);
  }
  async mfaGenerateBackupCodes(userId, n = 10) {
    return this._value('SELECT vetassist_auth.mfa_generate_backup_codes($1::uuid, $2::integer)', [userId, n]);
  }
  async mfaTrustDevice(jwtId, days = 30) {
    return this._value('SELECT vetassist_auth.mfa_trust_device($1::text, $2::integer)', [jwtId, days]);
  }
  async mfaTrustedDevices(userId) {
    return this._rows('SELECT device_id, created_at, trusted_until, last_used_at'
      + ' FROM vetassist_auth.mfa_trusted_devices($1::uuid)', [userId]);
  }
  async mfaRevokeDevice(userId, deviceId) {
    return this._value('SELECT vetassist_auth.mfa_revoke_device($1::uuid, $2::uuid)', [userId, deviceId]);
  }

  // Primitives
  async encrypt(plaintext, context) {
    return this._value('SELECT vetassist_auth.encrypt($1::bytea, $2::text)', [plaintext, context]);
  }
  async decrypt(ciphertext, context) {
    return this._value('SELECT vetassist_auth.decrypt($1::bytea, $2::text)', [ciphertext, context]);
  }
  async encryptText(plaintext, context) {
    return this._value('SELECT vetassist_auth.encrypt_text($1::text, $2::text)', [plaintext, context]);
  }
  async decryptText(ciphertext, context) {
    return this._value('SELECT vetassist_auth.decrypt_text($1::bytea, $2::text)', [ciphertext, context]);
  }
  async fieldHash(value, field) {
    return this._value('SELECT vetassist_auth.field_hash($1::text, $2::text)', [value, field]);
  }
  async fieldHashes(value, field) {
    return this._value('SELECT vetassist_auth.field_hashes($1::text, $2::text)', [value, field]);
  }

  // Disclosures (45 CFR 164.528)
  async recordDisclosure(subjectUserId, recipient, description, purpose, details = {}) {
    return this._value('SELECT vetassist_auth.record_disclosure($1::uuid, $2::text, $3::text, $4::text, $5::jsonb)',
      [subjectUserId, recipient, description, purpose, json(details, {})]);
  }
  async myDisclosures(jwtId, since = null) {
    // since null: the function's own default, six years back.
    return this._rows('SELECT occurred_at, actor_user_id, recipient, description, purpose, accountable, recorded_by'
      + " FROM vetassist_auth.my_disclosures($1::text, coalesce($2::timestamptz, now() - interval '6 years'))",
    [jwtId, since]);
  }
}
mixin(AppRequest, ['setActor', 'auditEvent', 'deactivateUser', 'endUserSessions', 'expireSessions', 'mfaDisable',
  'nodeRole', 'disclosurePurposes']);

/** The vetassist_auditor functions, in one read transaction. */
export class AuditorScope extends Scope {
  async phiDisclosures(userId, since, until) {
    return this._rows('SELECT audit_id, occurred_at, actor_user_id, recipient, description, purpose, accountable,'
      + ' recorded_by, event_type, outcome, db_role, session_id, details'
      + ' FROM vetassist_auth.phi_disclosures($1::uuid, $2::timestamptz, $3::timestamptz)', [userId, since, until]);
  }
  async accountingOfDisclosures(userId, since = null) {
    return this._rows('SELECT disclosed_at, recipient, description, purpose FROM vetassist_auth.accounting_of_disclosures('
      + "$1::uuid, coalesce($2::timestamptz, now() - interval '6 years'))", [userId, since]);
  }
  async crisisEvents(since) {
    return this._rows('SELECT event_id, occurred_at, user_id, session_id, event_type, details'
      + ' FROM vetassist_auth.crisis_events($1::timestamptz)', [since]);
  }
  async sessionEventsOf(userId, since) {
    return this._rows('SELECT event_id, occurred_at, session_id, event_type, severity, details'
      + ' FROM vetassist_auth.session_events_of($1::uuid, $2::timestamptz)', [userId, since]);
  }

  // Metrics (docs/operations.md, "Metrics")
  async metrics(names = null) {
    return this._rows('SELECT metric, labels, value FROM vetassist_auth.metrics($1::text[])', [names]);
  }
  async metricDefinitions() {
    return this._rows('SELECT metric, kind, labels, help FROM vetassist_auth.metric_definitions()', []);
  }
  async exporterQueries() {
    return this._value('SELECT vetassist_auth.exporter_queries()', []);
  }
}
mixin(AuditorScope, ['nodeRole', 'disclosurePurposes', 'auditChainHead', 'auditChainHeads', 'auditSealStatus',
  'protectedColumns', 'verifyAuditChain', 'verifyAuditChainAt', 'verifyInstallation']);

/** The vetassist_admin functions, in one transaction. */
export class AdminScope extends Scope {
  constructor(tx, warn) {
    super(tx);
    this._warn = warn;
  }

  // Keys
  async rotateKey(purpose) {
    return this._value('SELECT vetassist_auth.rotate_key($1::text)', [purpose]);
  }
  async rewrapKeys(oldMasterKeyFile = null) {
    return this._value('SELECT vetassist_auth.rewrap_keys($1::text)', [oldMasterKeyFile]);
  }
  async reencrypt(batchSize = 1000) {
    return this._value('SELECT vetassist_auth.reencrypt($1::integer)', [batchSize]);
  }
  async unretireKey(keyId) {
    return this._value('SELECT vetassist_auth.unretire_key($1::integer)', [keyId]);
  }
  async destroyKey(keyId) {
    return this._value('SELECT vetassist_auth.destroy_key($1::integer)', [keyId]);
  }
  async keyUsageSummary() {
    return this._rows('SELECT key_id, purpose, status, used_by, stored_values FROM vetassist_auth.key_usage_summary()', []);
  }

  // Audit
  async enableRowAudit(target, { redact = [], ignore = [] } = {}) {
    await this._value('SELECT vetassist_auth.enable_row_audit($1::regclass, $2::text[], $3::text[])',
      [target, redact, ignore]);
  }
  async disableRowAudit(target) {
    return this._value('SELECT vetassist_auth.disable_row_audit($1::regclass)', [target]);
  }
  async sealAuditLog(maxRows = 10000) {
    return this._value('SELECT vetassist_auth.seal_audit_log($1::integer)', [maxRows]);
  }
  async sealWorkerAuditLogs(maxRows = 10000) {
    return this._value('SELECT vetassist_auth.seal_worker_audit_logs($1::integer)', [maxRows]);
  }
  async purgeAuditLog(olderThan) {
    return this._value('SELECT vetassist_auth.purge_audit_log($1::interval)', [olderThan]);
  }

  // Replication and Citus
  async promote() {
    return this._rows('SELECT action, detail FROM vetassist_auth.promote()', []);
  }
  async resyncSequences() {
    return this._rows('SELECT sequence_name, new_value FROM vetassist_auth.resync_sequences()', []);
  }
  async distribute(shardCount = null) {
    return this._column('SELECT t::text FROM vetassist_auth.distribute($1::integer) AS t', [shardCount]);
  }
  async veteranPlacement(userId) {
    return this._rows('SELECT shard_id, node FROM vetassist_auth.veteran_placement($1::uuid)', [userId]);
  }
}
mixin(AdminScope, ['setActor', 'auditEvent', 'deactivateUser', 'endUserSessions', 'expireSessions', 'mfaDisable',
  'nodeRole', 'auditChainHead', 'auditChainHeads', 'auditSealStatus', 'protectedColumns', 'verifyAuditChain',
  'verifyAuditChainAt', 'verifyInstallation']);

function authRow(row) {
  // authenticate returns exactly one row; an unknown jwt_id: status null, reason 'unknown'.
  if (row === null) return { status: null, reason: 'unknown', userId: null, sessionId: null, mfaRequired: null,
    idleExpiresAt: null, absoluteExpiresAt: null };
  return row;
}

/** Owns (or wraps) a pg.Pool; every method runs one request in one transaction. */
export class VetAssistClient {
  #pool;
  #ownsPool;
  #warn;

  /**
   * @param {string | import('pg').PoolConfig | import('pg').Pool} config a connection string, a
   *   pg.Pool config, or an existing pg.Pool (then end() leaves it open)
   * @param {{ warn?: (message: string) => void }} [options]
   */
  constructor(config, options = {}) {
    this.#ownsPool = !(config instanceof pg.Pool);
    this.#pool = !this.#ownsPool ? config
      : new pg.Pool(typeof config === 'string' ? { connectionString: config } : config);
    this.#warn = options.warn ?? defaultWarn;
  }

  /** Wraps an existing pg.Pool; end() leaves it open. */
  static fromPool(pool, options = {}) {
    return new VetAssistClient(pool, options);
  }

  get pool() {
    return this.#pool;
  }

  async end() {
    if (this.#ownsPool) await this.#pool.end();
  }

  async #begin() {
    const conn = await this.#pool.connect();
    const tx = new Transaction(this.#pool, conn);
    try {
      await conn.query('BEGIN');
    } catch (err) {
      conn.release(err);
      throw translate(err);
    }
    return tx;
  }

  async #run(open, fn) {
    const tx = await this.#begin();
    let result;
    try {
      const args = await open(tx);
      result = await fn(...args);
    } catch (err) {
      await tx.rollback();
      throw translate(err);
    }
    await tx.commit();
    return result;
  }

  /**
   * Opens a request's transaction with authenticate and leaves it open: the Fastify plugin's
   * building block. Call commit() or rollback() exactly once.
   */
  async beginAuthenticated(jwtId, clientIp = null) {
    const tx = await this.#begin();
    try {
      const req = new AppRequest(tx, this.#warn);
      const auth = await req.authenticate(jwtId, clientIp);
      return { request: req, auth, commit: () => tx.commit(), rollback: () => tx.rollback() };
    } catch (err) {
      await tx.rollback();
      throw err;
    }
  }

  /** As beginAuthenticated, with set_actor(actorUserId, clientIp) instead (no session). */
  async beginRequest(actorUserId = null, clientIp = null) {
    const tx = await this.#begin();
    try {
      const req = new AppRequest(tx, this.#warn);
      const ip = normalizeClientIp(clientIp, this.#warn);
      if (actorUserId !== null || ip !== null) await req.setActor(actorUserId, ip);
      return { request: req, auth: null, commit: () => tx.commit(), rollback: () => tx.rollback() };
    } catch (err) {
      await tx.rollback();
      throw err;
    }
  }

  /**
   * One request of a signed-in user: BEGIN, authenticate(jwtId, clientIp), fn(req, auth),
   * COMMIT (ROLLBACK when fn throws). fn runs whatever the status: check auth.status.
   */
  async authenticated(jwtId, clientIp, fn) {
    return this.#run(async (tx) => {
      const req = new AppRequest(tx, this.#warn);
      return [req, await req.authenticate(jwtId, clientIp)];
    }, fn);
  }

  /** One request not tied to a session (the sign-in callback): BEGIN, set_actor, fn(req), COMMIT. */
  async request(actorUserId, clientIp, fn) {
    return this.#run(async (tx) => {
      const req = new AppRequest(tx, this.#warn);
      const ip = normalizeClientIp(clientIp, this.#warn);
      // The actor lasts for this transaction only; without one there is nothing to set.
      if ((actorUserId ?? null) !== null || ip !== null) await req.setActor(actorUserId ?? null, ip);
      return [req];
    }, fn);
  }

  /** The auditor's functions in one transaction (a pool connected as a vetassist_auditor member). */
  async auditor(fn) {
    return this.#run(async (tx) => [new AuditorScope(tx)], fn);
  }

  /** The administrator's functions in one transaction (a pool connected as a vetassist_admin member). */
  async admin(fn, { actorUserId = null } = {}) {
    return this.#run(async (tx) => {
      const scope = new AdminScope(tx, this.#warn);
      if (actorUserId !== null) await scope.setActor(actorUserId, null);
      return [scope];
    }, fn);
  }

  /**
   * Crisis notifications (NOTIFY vetassist_auth_crisis) on a dedicated connection, each checked
   * with verify_crisis_notice before onNotice({ sessionId, eventId }) sees it; forged payloads
   * are dropped. A notice is a wake-up, not the record (an auditor reads crisis_events).
   * Resolves to an async stop().
   */
  async listenCrisis(onNotice) {
    const listener = await this.#pool.connect();
    let stopped = false;
    const onNotification = async (msg) => {
      if (msg.channel !== 'vetassist_auth_crisis') return;
      let genuine = false;
      try {
        genuine = await this.#run(async (tx) => [new AppRequest(tx, this.#warn)],
          (req) => req.verifyCrisisNotice(msg.payload ?? ''));
      } catch {
        genuine = false;
      }
      if (!genuine) {
        this.#warn('vetassist-client: dropped a vetassist_auth_crisis notification the extension did not send');
        return;
      }
      const payload = JSON.parse(msg.payload);
      if (!stopped) await onNotice({ sessionId: payload.session_id, eventId: Number(payload.event_id) });
    };
    listener.on('notification', onNotification);
    try {
      await listener.query('LISTEN vetassist_auth_crisis');
    } catch (err) {
      listener.off('notification', onNotification);
      listener.release(err);
      throw translate(err);
    }
    return async () => {
      if (stopped) return;
      stopped = true;
      listener.off('notification', onNotification);
      let broken;
      await listener.query('UNLISTEN vetassist_auth_crisis').catch((e) => { broken = e; });
      listener.release(broken);
    };
  }
}
