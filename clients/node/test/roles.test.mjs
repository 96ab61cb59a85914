// The auditor's and the administrator's scopes through real SQL, as members of
// vetassist_auditor (VETASSIST_PG_AUDITOR_CONNINFO) and vetassist_admin (VETASSIST_PG_ADMIN_CONNINFO).
import assert from 'node:assert/strict';
import test from 'node:test';
import { InvalidArgument, KeyNotConfigured, NotFound, PermissionDenied, VetAssistClient } from '../index.js';
import { adminConninfo, auditorConninfo, conninfo, signIn } from './support.mjs';

const app = new VetAssistClient(conninfo());
const auditors = new VetAssistClient(auditorConninfo());
const admins = new VetAssistClient(adminConninfo());
test.after(async () => { await Promise.all([app.end(), auditors.end(), admins.end()]); });

test('admin seals the log; the auditor verifies the chain and an anchor', async () => {
  const who = await signIn(app);
  await app.authenticated(who.jwtId, null, (r) => r.auditEvent('phi', 'chart_viewed', 'success', {}, who.userId));
  let sealed = 0;
  for (let n = await admins.admin((a) => a.sealAuditLog(1000)); n > 0; n = await admins.admin((a) => a.sealAuditLog(1000))) sealed += n;
  assert.ok(sealed > 0);
  const head = await admins.admin((a) => a.auditChainHead());
  assert.ok(Number.isSafeInteger(head.seq) && Buffer.isBuffer(head.hash) && head.hash.length === 32);
  await auditors.auditor(async (a) => {
    assert.deepEqual(await a.auditChainHead(), head);
    const report = await a.verifyAuditChain();
    assert.equal(report.ok, true, report.problem ?? '');
    assert.ok(report.checked >= head.seq);
    assert.equal((await a.verifyAuditChain({ seq: head.seq, hash: head.hash })).ok, true);
    const forged = Buffer.from(head.hash); forged[0] ^= 1;
    const bad = await a.verifyAuditChain({ seq: head.seq, hash: forged });
    assert.equal(bad.ok, false);
    assert.equal(typeof bad.problem, 'string');
    assert.equal((await a.verifyAuditChain({ seq: head.seq, hash: head.hash, timeline: 1, lsn: '0/1' })).ok, true);
    const status = await a.auditSealStatus();
    assert.equal(status.headSeq, head.seq);
    const heads = await a.auditChainHeads();  // this node only: no Citus workers
    assert.deepEqual(heads.map((h) => [h.seq, h.hash]), [[head.seq, head.hash]]);
    assert.equal(typeof heads[0].node, 'string');
    assert.ok((await a.protectedColumns()).some((c) => c.tableName === 'users' && c.columnName === 'email_encrypted'));
    const checks = await a.verifyInstallation();
    assert.ok(checks.length > 5 && checks.every((c) => typeof c.checkName === 'string' && typeof c.ok === 'boolean'));
    assert.equal(await a.nodeRole(), 'primary');
  });
  // A failed call aborts its transaction: one call per scope here.
  await assert.rejects(auditors.auditor((a) => a.verifyAuditChainAt('no-such-node', head.seq, head.hash)),
    InvalidArgument);
});

test('auditor: the accounting, PHI accesses, crisis and session events of one veteran', async () => {
  const who = await signIn(app);
  const since = new Date(Date.now() - 60_000);
  await app.request(who.userId, null, (r) => r.recordDisclosure(who.userId, 'County health department', 'Lab result',
    'public_health'));
  await app.request(who.userId, null, (r) => r.recordDisclosure(who.userId, 'Dr. Lee', 'Chart', 'treatment'));
  const eventId = await app.authenticated(who.jwtId, null, (r) => r.logSessionEvent(who.jwtId, 'phq9_item9_positive',
    'crisis', { score: 3 }));
  await auditors.auditor(async (a) => {
    const accounting = await a.accountingOfDisclosures(who.userId);
    assert.deepEqual(accounting.map((e) => [e.recipient, e.description]), [['County health department', 'Lab result']]);
    assert.ok(accounting[0].disclosedAt instanceof Date && /164\.512/.test(accounting[0].purpose));
    const all = await a.phiDisclosures(who.userId, since, new Date(Date.now() + 60_000));
    assert.deepEqual(all.filter((d) => d.eventType === 'phi_disclosed').map((d) => [d.purpose, d.accountable]),
      [['public_health', true], ['treatment', false]]);
    const crisis = await a.crisisEvents(since);
    const mine = crisis.find((e) => e.eventId === eventId);
    assert.deepEqual({ user: mine.userId, type: mine.eventType, details: mine.details },
      { user: who.userId, type: 'phq9_item9_positive', details: { score: 3 } });
    const events = await a.sessionEventsOf(who.userId, '-infinity');
    assert.deepEqual(events.map((e) => [e.eventId, e.severity, e.sessionId]), [[eventId, 'crisis', who.sessionId]]);
    assert.ok((await a.disclosurePurposes()).length >= 20);
  });
});

test('admin: keys, row audit, retention, sessions of a user, replication', async () => {
  const who = await signIn(app);
  const rotated = await admins.admin(async (a) => {
    const rotated = await a.rotateKey('phi');
    assert.ok(Number.isInteger(rotated));
    assert.ok((await a.keyUsageSummary()).every((k) => Number.isInteger(k.keyId) && Number.isSafeInteger(k.storedValues)));
    assert.equal(typeof await a.reencrypt(100), 'number');
    return rotated;
  });
  // In a transaction of its own: a failed call aborts its transaction (TransactionAborted at COMMIT).
  await assert.rejects(admins.admin((a) => a.destroyKey(rotated)), NotFound);  // not retired
  await assert.rejects(admins.admin((a) => a.unretireKey(-1)), NotFound);  // no retired key -1
  await admins.admin(async (a) => {
    await a.connection.query('CREATE TEMP TABLE notes (id integer PRIMARY KEY, diagnosis text, viewed_at timestamptz)');
    await a.enableRowAudit('pg_temp.notes', { redact: ['diagnosis'], ignore: ['viewed_at'] });
    assert.equal(await a.disableRowAudit('pg_temp.notes'), true);
    assert.equal(await a.disableRowAudit('pg_temp.notes'), false);
  });
  assert.equal(await admins.admin((a) => a.purgeAuditLog('6 years')), 0);
  await assert.rejects(admins.admin((a) => a.purgeAuditLog('1 day')), InvalidArgument);
  await admins.admin(async (a) => {
    assert.equal(typeof await a.auditEvent('ops', 'sessions_reviewed', 'info', { n: 1 }, who.userId), 'number');
    assert.equal(await a.endUserSessions(who.userId, 'admin reset'), 1);
    assert.equal(typeof await a.expireSessions(), 'number');
    assert.equal(await a.mfaDisable(who.userId), false);
    await a.deactivateUser(who.userId, 'account closed');
    assert.ok((await a.promote()).some((p) => typeof p.action === 'string'));
    assert.ok(Array.isArray(await a.resyncSequences()));
    assert.deepEqual(await a.veteranPlacement(who.userId), []);  // not distributed
    assert.equal(await a.sealWorkerAuditLogs(10), 0);
    assert.equal(await a.nodeRole(), 'primary');
  }, { actorUserId: who.userId });
  await assert.rejects(admins.admin((a) => a.distribute()), KeyNotConfigured);  // 55000: Citus is not installed
  await assert.rejects(admins.admin((a) => a.rewrapKeys('/etc/old.key')), (err) => err instanceof PermissionDenied && /pg_read_server_files/.test(err.hint));
});

test('each role is refused what it is not granted', async () => {
  await assert.rejects(auditors.admin((a) => a.sealAuditLog(1)), PermissionDenied);
  await assert.rejects(admins.auditor((a) => a.crisisEvents('-infinity')), PermissionDenied);
  await assert.rejects(auditors.request(null, null, (r) => r.userProfile('00000000-0000-0000-0000-000000000000')),
    PermissionDenied);
  await assert.rejects(app.auditor((a) => a.verifyAuditChain()), PermissionDenied);
});
