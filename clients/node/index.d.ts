// Types of vetassist-client (hand-written; `npm test` checks them with tsc --noEmit against
// test/types-check.ts). UUIDs are strings, timestamps Dates, bytea Buffers, bigint numbers.
import type { Pool, PoolClient, PoolConfig } from 'pg';

export type Uuid = string;
/** A timestamptz argument: a Date, or text PostgreSQL reads ('2026-01-01T00:00:00Z'). */
export type TimestampInput = Date | string;
/** An interval argument as PostgreSQL text: '5 minutes', '6 years'. */
export type IntervalInput = string;
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };
export type JsonObject = { [key: string]: Json };

/** Stored statuses, plus IDLE (reported by session_status inside the idle warning window). */
export type SessionStatus = 'ACTIVE' | 'IDLE' | 'EXPIRED' | 'TERMINATED' | 'LOCKED';
export type AuditOutcome = 'success' | 'failure' | 'denied' | 'info';
export type EventSeverity = 'info' | 'warning' | 'critical' | 'crisis';
export type KeyPurpose = 'phi' | 'hash' | 'token' | 'mfa' | 'audit' | (string & {});

// ---- errors ----------------------------------------------------------------------------------

export class VetAssistError extends Error {
  static readonly sqlstate: string | null;
  /** The server's SQLSTATE; null for a client-side error. */
  readonly sqlstate: string | null;
  /** The server's HINT (names a format or a role, never a value). */
  readonly hint: string | null;
  constructor(message: string, sqlstate?: string | null, options?: { cause?: unknown; hint?: string | null });
}
/** 55000 */ export class KeyNotConfigured extends VetAssistError {}
/** XX001 */ export class CiphertextInvalid extends VetAssistError {}
/** 22023 */ export class InvalidArgument extends VetAssistError {}
/** 22P02 (also an InvalidArgument) */ export class MalformedInput extends InvalidArgument {}
/** 22007: a timestamptz or interval literal Postgres cannot read (also a MalformedInput) */ export class MalformedTime extends MalformedInput {}
/** 28000 */ export class AuthenticationRefused extends VetAssistError {}
/** 53000 */ export class RecorderUnavailable extends VetAssistError {}
/** 22021 */ export class NotText extends VetAssistError {}
/** P0002 */ export class NotFound extends VetAssistError {}
/** 23505 */ export class DuplicateSession extends VetAssistError {}
/** 42501 */ export class PermissionDenied extends VetAssistError {}
/** 40001 */ export class ConcurrentChange extends VetAssistError {}
/** VA001 */ export class TokenExpired extends VetAssistError {}
/** A call on a request that has already committed or rolled back (client-side). */
export class RequestClosed extends VetAssistError {}
/**
 * The request's transaction was rolled back, not committed: a call in it failed and the error
 * was caught, so COMMIT answered ROLLBACK (client-side, sqlstate null; `cause` the failure the
 * client saw, if any). Thrown by authenticated(), request(), auditor(), admin() and commit().
 */
export class TransactionAborted extends VetAssistError {}

export const ERROR_CLASSES: Readonly<Record<string, typeof VetAssistError>>;
export function errorClassFor(sqlstate: string | null | undefined): typeof VetAssistError;
/** A pg.DatabaseError as its VetAssistError (pg error as `cause`); anything else unchanged. */
export function translate(err: unknown): unknown;
/** A valid IPv4/IPv6 address (zone index dropped), else null and a warning without the value. */
export function normalizeClientIp(ip: unknown, warn?: (message: string) => void): string | null;

// ---- results ---------------------------------------------------------------------------------

/** authenticate(): status null and reason 'unknown' for an unknown jwt_id. */
export interface AuthResult {
  status: SessionStatus | null;
  /** Why the session is not ACTIVE: logout, idle_timeout, absolute_timeout, mfa_lockout, unknown, … */
  reason: string | null;
  userId: Uuid | null;
  sessionId: Uuid | null;
  mfaRequired: boolean | null;
  idleExpiresAt: Date | null;
  absoluteExpiresAt: Date | null;
}

/** user_profile(): decrypted (the read is recorded as a PHI access). */
export interface Profile {
  id: Uuid;
  vaIcn: string;
  veteranStatus: string | null;
  email: string | null;
  firstName: string | null;
  lastName: string | null;
  isActive: boolean;
  mfaEnabled: boolean;
  createdAt: Date;
  lastLoginAt: Date | null;
}

export interface RefreshedToken {
  generation: number;
  refreshToken: string;
}

export interface TrustedDevice {
  deviceId: Uuid;
  createdAt: Date;
  trustedUntil: Date;
  lastUsedAt: Date | null;
}

/** my_disclosures(): the signed-in veteran's own view. */
export interface Disclosure {
  occurredAt: Date;
  actorUserId: Uuid | null;
  recipient: string | null;
  description: string | null;
  purpose: string | null;
  accountable: boolean;
  recordedBy: 'extension' | 'application';
}

export interface DisclosurePurpose {
  purpose: string;
  accountable: boolean;
  statement: string;
}

/** phi_disclosures(): every access to and disclosure of one veteran's PHI. */
export interface PhiDisclosure {
  auditId: number;
  occurredAt: Date;
  actorUserId: Uuid | null;
  recipient: string | null;
  description: string | null;
  purpose: string | null;
  accountable: boolean;
  recordedBy: 'extension' | 'application';
  eventType: string;
  outcome: AuditOutcome;
  dbRole: string;
  sessionId: Uuid | null;
  details: Json;
}

/** accounting_of_disclosures(): what 45 CFR 164.528(b)(2) requires. */
export interface AccountingEntry {
  disclosedAt: Date;
  recipient: string;
  description: string;
  /** The purpose's brief statement. */
  purpose: string;
}

export interface CrisisEvent {
  eventId: number;
  occurredAt: Date;
  userId: Uuid;
  sessionId: Uuid;
  eventType: string;
  details: Json;
}

export interface MetricSample {
  metric: string;
  labels: Record<string, string>;
  value: number;
}

export interface MetricDefinition {
  metric: string;
  kind: 'counter' | 'gauge';
  labels: string[];
  help: string;
}

export interface SessionEvent {
  eventId: number;
  occurredAt: Date;
  sessionId: Uuid;
  eventType: string;
  severity: EventSeverity;
  details: Json;
}

export interface CrisisNotice {
  sessionId: Uuid;
  eventId: number;
}

/** audit_chain_head(): an anchor to keep outside the database. */
export interface ChainHead {
  seq: number;
  hash: Buffer;
  sealedAt: Date;
}

export interface NodeChainHead {
  node: string;
  seq: number | null;
  hash: Buffer | null;
  sealedAt: Date | null;
}

export interface SealStatus {
  headSeq: number | null;
  headSealedAt: Date | null;
  sealedThroughId: number | null;
  waitingRows: number | null;
  sealerPid: number | null;
}

export interface ChainVerification {
  ok: boolean;
  checked: number;
  firstBadSeq: number | null;
  problem: string | null;
}

/** An anchor for verify_audit_chain: (seq, hash), with the WAL position of the log line if known. */
export type ChainAnchor =
  | { seq: number; hash: Buffer }
  | { seq: number; hash: Buffer; timeline: number; lsn: string };

export interface ProtectedColumn {
  tableName: string;
  columnName: string;
  purpose: string;
  rowId: string;
  contextName: string | null;
  contextId: string | null;
  hashField: string | null;
  hashOf: string | null;
  decryptIsDisclosure: boolean;
}

export interface InstallationCheck {
  checkName: string;
  ok: boolean;
  detail: string | null;
}

export interface KeyUsage {
  keyId: number;
  purpose: string | null;
  status: string | null;
  usedBy: string;
  storedValues: number;
}

export interface PromoteAction {
  action: string;
  detail: string;
}

export interface SequenceResync {
  sequenceName: string;
  newValue: number;
}

export interface VeteranPlacement {
  shardId: number;
  node: string;
}

export interface SessionOptions {
  /** Stored as a keyed hash; an invalid address is recorded as null (with a warning). */
  ip?: string | null;
  userAgent?: string | null;
  deviceFingerprint?: string | null;
  deviceInfo?: JsonObject | null;
}

// ---- scopes ----------------------------------------------------------------------------------

declare class Scope {
  /** The request's pg client, for the application's own queries in the same transaction. */
  readonly connection: PoolClient;
}

/** The vetassist_app functions, in one request's transaction. */
export class AppRequest extends Scope {
  // Identity
  upsertVaUser(vaIcn: string, veteranStatus: string | null, email: string | null, firstName: string | null,
    lastName: string | null): Promise<Uuid>;
  findUserByIcn(vaIcn: string): Promise<Uuid | null>;
  findUsersByEmail(email: string): Promise<Uuid[]>;
  userProfile(userId: Uuid): Promise<Profile | null>;
  deactivateUser(userId: Uuid, reason: string): Promise<void>;
  // VA tokens
  storeVaTokens(userId: Uuid, accessToken: string, refreshToken: string | null, expiresAt: TimestampInput,
    scope?: string | null): Promise<number>;
  /** null when none is stored; TokenExpired once it has expired. */
  vaAccessToken(userId: Uuid): Promise<string | null>;
  vaRefreshToken(userId: Uuid): Promise<string | null>;
  vaTokensDue(within: IntervalInput): Promise<Uuid[]>;
  deleteVaTokens(userId: Uuid): Promise<boolean>;
  // Sessions
  authenticate(jwtId: string, clientIp?: string | null): Promise<AuthResult>;
  createSession(userId: Uuid, jwtId: string, expiresAt: TimestampInput, options?: SessionOptions): Promise<Uuid>;
  touchSession(jwtId: string): Promise<Exclude<SessionStatus, 'IDLE'>>;
  sessionStatus(jwtId: string): Promise<SessionStatus>;
  endSession(jwtId: string, reason?: string): Promise<boolean>;
  endUserSessions(userId: Uuid, reason: string): Promise<number>;
  lockSession(jwtId: string, reason: string): Promise<boolean>;
  expireSessions(batchSize?: number): Promise<number>;
  /** null: a stale token was presented and the session ended. */
  refreshSessionToken(jwtId: string, presented: string | null, replacement: string): Promise<RefreshedToken | null>;
  rotateSessionRefreshToken(jwtId: string, presented: string | null, replacement: string): Promise<number | null>;
  logSessionEvent(jwtId: string, eventType: string, severity: EventSeverity, details?: JsonObject): Promise<number>;
  verifyCrisisNotice(payload: string): Promise<boolean>;
  // MFA
  mfaEnrollTotp(userId: Uuid): Promise<string>;
  mfaConfirmTotp(userId: Uuid, code: string, jwtId?: string | null): Promise<boolean>;
  mfaRequired(jwtId: string): Promise<boolean>;
  mfaVerify(jwtId: string, code: string): Promise<boolean>;
  mfaGenerateBackupCodes(userId: Uuid, n?: number): Promise<string[]>;
  mfaTrustDevice(jwtId: string, days?: number): Promise<Uuid>;
  mfaTrustedDevices(userId: Uuid): Promise<TrustedDevice[]>;
  mfaRevokeDevice(userId: Uuid, deviceId: Uuid): Promise<boolean>;
  mfaDisable(userId: Uuid): Promise<boolean>;
  // Primitives
  encrypt(plaintext: Buffer, context: string): Promise<Buffer>;
  decrypt(ciphertext: Buffer, context: string): Promise<Buffer>;
  encryptText(plaintext: string, context: string): Promise<Buffer>;
  decryptText(ciphertext: Buffer, context: string): Promise<string>;
  fieldHash(value: string, field: string): Promise<Buffer>;
  fieldHashes(value: string, field: string): Promise<Buffer[]>;
  // Audit and disclosures
  setActor(userId: Uuid | null, clientIp?: string | null): Promise<void>;
  auditEvent(category: string, eventType: string, outcome: AuditOutcome, details?: JsonObject,
    subjectUserId?: Uuid | null): Promise<number>;
  recordDisclosure(subjectUserId: Uuid, recipient: string, description: string, purpose: string,
    details?: JsonObject): Promise<number>;
  /** since null: six years back. */
  myDisclosures(jwtId: string, since?: TimestampInput | null): Promise<Disclosure[]>;
  disclosurePurposes(): Promise<DisclosurePurpose[]>;
  nodeRole(): Promise<string>;
}

/** The vetassist_auditor functions. */
export class AuditorScope extends Scope {
  phiDisclosures(userId: Uuid, since: TimestampInput, until: TimestampInput): Promise<PhiDisclosure[]>;
  accountingOfDisclosures(userId: Uuid, since?: TimestampInput | null): Promise<AccountingEntry[]>;
  crisisEvents(since: TimestampInput): Promise<CrisisEvent[]>;
  sessionEventsOf(userId: Uuid, since: TimestampInput): Promise<SessionEvent[]>;
  /** The extension's health as Prometheus series (all, or only `names`). */
  metrics(names?: string[] | null): Promise<MetricSample[]>;
  metricDefinitions(): Promise<MetricDefinition[]>;
  /** The queries file of prometheus-postgres-exporter for these metrics. */
  exporterQueries(): Promise<string>;
  disclosurePurposes(): Promise<DisclosurePurpose[]>;
  auditChainHead(): Promise<ChainHead | null>;
  auditChainHeads(): Promise<NodeChainHead[]>;
  auditSealStatus(): Promise<SealStatus>;
  verifyAuditChain(anchor?: ChainAnchor | null): Promise<ChainVerification>;
  verifyAuditChainAt(node: string, anchorSeq: number, anchorHash: Buffer): Promise<ChainVerification>;
  protectedColumns(): Promise<ProtectedColumn[]>;
  verifyInstallation(): Promise<InstallationCheck[]>;
  nodeRole(): Promise<string>;
}

/** The vetassist_admin functions. */
export class AdminScope extends Scope {
  // Keys
  rotateKey(purpose: KeyPurpose): Promise<number>;
  rewrapKeys(oldMasterKeyFile?: string | null): Promise<number>;
  reencrypt(batchSize?: number): Promise<number>;
  unretireKey(keyId: number): Promise<boolean>;
  destroyKey(keyId: number): Promise<boolean>;
  keyUsageSummary(): Promise<KeyUsage[]>;
  // Audit
  enableRowAudit(target: string, options?: { redact?: string[]; ignore?: string[] }): Promise<void>;
  disableRowAudit(target: string): Promise<boolean>;
  sealAuditLog(maxRows?: number): Promise<number>;
  sealWorkerAuditLogs(maxRows?: number): Promise<number>;
  purgeAuditLog(olderThan: IntervalInput): Promise<number>;
  auditChainHead(): Promise<ChainHead | null>;
  auditChainHeads(): Promise<NodeChainHead[]>;
  auditSealStatus(): Promise<SealStatus>;
  verifyAuditChain(anchor?: ChainAnchor | null): Promise<ChainVerification>;
  verifyAuditChainAt(node: string, anchorSeq: number, anchorHash: Buffer): Promise<ChainVerification>;
  protectedColumns(): Promise<ProtectedColumn[]>;
  verifyInstallation(): Promise<InstallationCheck[]>;
  setActor(userId: Uuid | null, clientIp?: string | null): Promise<void>;
  auditEvent(category: string, eventType: string, outcome: AuditOutcome, details?: JsonObject,
    subjectUserId?: Uuid | null): Promise<number>;
  // Accounts and sessions
  deactivateUser(userId: Uuid, reason: string): Promise<void>;
  endUserSessions(userId: Uuid, reason: string): Promise<number>;
  expireSessions(batchSize?: number): Promise<number>;
  mfaDisable(userId: Uuid): Promise<boolean>;
  // Replication and Citus
  promote(): Promise<PromoteAction[]>;
  resyncSequences(): Promise<SequenceResync[]>;
  distribute(shardCount?: number | null): Promise<string[]>;
  veteranPlacement(userId: Uuid): Promise<VeteranPlacement[]>;
  nodeRole(): Promise<string>;
}

/** A request's transaction left open (the Fastify plugin's building block). */
export interface OpenRequest {
  request: AppRequest;
  auth: AuthResult | null;
  /** COMMIT; throws TransactionAborted when the server rolled back instead (a caught failure). */
  commit(): Promise<void>;
  rollback(): Promise<void>;
}

export interface ClientOptions {
  /** Receives warnings (an invalid client IP); never given the value. Default: process.emitWarning. */
  warn?: (message: string) => void;
}

export class VetAssistClient {
  /** A connection string, a pg.Pool config, or an existing pg.Pool (end() then leaves it open). */
  constructor(config: string | PoolConfig | Pool, options?: ClientOptions);
  static fromPool(pool: Pool, options?: ClientOptions): VetAssistClient;
  readonly pool: Pool;
  end(): Promise<void>;

  /**
   * BEGIN; authenticate(jwtId, clientIp); fn(req, auth); COMMIT (ROLLBACK when fn throws).
   * Throws TransactionAborted when a call in fn failed and fn caught it (nothing was committed).
   */
  authenticated<T>(jwtId: string, clientIp: string | null | undefined,
    fn: (req: AppRequest, auth: AuthResult) => Promise<T> | T): Promise<T>;
  /** BEGIN; set_actor(actorUserId, clientIp) unless both are null; fn(req); COMMIT (TransactionAborted as above). */
  request<T>(actorUserId: Uuid | null | undefined, clientIp: string | null | undefined,
    fn: (req: AppRequest) => Promise<T> | T): Promise<T>;
  auditor<T>(fn: (scope: AuditorScope) => Promise<T> | T): Promise<T>;
  admin<T>(fn: (scope: AdminScope) => Promise<T> | T, options?: { actorUserId?: Uuid | null }): Promise<T>;

  beginAuthenticated(jwtId: string, clientIp?: string | null): Promise<OpenRequest & { auth: AuthResult }>;
  beginRequest(actorUserId?: Uuid | null, clientIp?: string | null): Promise<OpenRequest & { auth: null }>;

  /** Verified crisis notifications until the returned stop() is called. */
  listenCrisis(onNotice: (notice: CrisisNotice) => void | Promise<void>): Promise<() => Promise<void>>;
}
