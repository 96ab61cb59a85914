// The vetassist_app side through real SQL: one request per transaction opened by authenticate,
// rollback on a throw, the client IP rule, and the app's calls.
import assert from 'node:assert/strict';
import test from 'node:test';
import { randomUUID } from 'node:crypto';
import { AuthenticationRefused, RequestClosed, VetAssistClient } from '../index.js';
import { auditorConninfo, conninfo, icn, inHours, jti, signIn, totp } from './support.mjs';

const warnings = [];
const client = new VetAssistClient(conninfo(), { warn: (m) => warnings.push(m) });
const auditors = new VetAssistClient(auditorConninfo());
test.after(async () => { await client.end(); await auditors.end(); });

test('authenticated: an ACTIVE session, its actor and session on the request\'s audit rows', async () => {
  const who = await signIn(client);
  const { auth, auditId } = await client.authenticated(who.jwtId, '198.51.100.7', async (req, auth) => ({
    auth, auditId: await req.auditEvent('phi', 'chart_viewed', 'success', { chart: 17 }, who.userId),
  }));
  assert.equal(auth.status, 'ACTIVE');
  assert.equal(auth.reason, null);
  assert.equal(auth.userId, who.userId);
  assert.equal(auth.sessionId, who.sessionId);
  assert.equal(auth.mfaRequired, false);
  assert.ok(auth.idleExpiresAt instanceof Date && auth.idleExpiresAt > new Date());
  assert.ok(auth.absoluteExpiresAt instanceof Date && auth.absoluteExpiresAt >= auth.idleExpiresAt);
  assert.equal(typeof auditId, 'number');
  // The auditor sees the committed row, naming the veteran as actor, in that session.
  const rows = await auditors.auditor((a) => a.phiDisclosures(who.userId, '-infinity', 'infinity'));
  const row = rows.find((r) => r.auditId === auditId);
  assert.ok(row, 'the audit_event row was committed');
  assert.equal(row.actorUserId, who.userId);
  assert.equal(row.sessionId, who.sessionId);
  assert.equal(row.recordedBy, 'application');
  assert.equal(row.outcome, 'success');
  assert.deepEqual(row.details, { chart: 17 });
});

test('authenticated: an unknown jwt_id is status null, reason unknown, and fn still runs', async () => {
  const auth = await client.authenticated(jti(), null, (req, auth) => auth);
  assert.deepEqual({ status: auth.status, reason: auth.reason, userId: auth.userId, sessionId: auth.sessionId },
    { status: null, reason: 'unknown', userId: null, sessionId: null });
});

test('authenticated: an ended session: its status and why, no user', async () => {
  const who = await signIn(client);
  assert.equal(await client.authenticated(who.jwtId, null, (r) => r.endSession(who.jwtId)), true);
  const auth = await client.authenticated(who.jwtId, null, (r, a) => a);
  assert.equal(auth.status, 'TERMINATED');
  assert.equal(auth.reason, 'logout');
  assert.equal(auth.userId, null);
});

test('a throw rolls the request back; the request object is closed after it', async () => {
  const jwtId = jti();
  let kept;
  await assert.rejects(client.request(null, null, async (r) => {
    kept = r;
    const userId = await r.upsertVaUser(icn(), 'veteran', null, null, null);
    await r.createSession(userId, jwtId, inHours(1));
    throw new Error('handler failed');
  }), /handler failed/);
  assert.equal((await client.authenticated(jwtId, null, (r, a) => a)).reason, 'unknown', 'the session was rolled back');
  await assert.rejects(kept.nodeRole(), RequestClosed);
});

test('an invalid client IP never fails a request: null, and a warning without the value', async () => {
  const who = await signIn(client);
  warnings.length = 0;
  const secret = 'not-an-ip-10.0.0.1x';
  const auth = await client.authenticated(who.jwtId, secret, (r, a) => a);
  assert.equal(auth.status, 'ACTIVE');
  await client.request(who.userId, secret, (r) => r.createSession(who.userId, jti(), inHours(1), { ip: secret }));
  assert.equal(warnings.length, 3);  // authenticate, set_actor, create_session
  for (const w of warnings) assert.ok(!w.includes(secret) && !w.includes('10.0.0.1'), w);
  warnings.length = 0;
  await client.authenticated(who.jwtId, 'fe80::1%eth0', (r, a) => a);  // zone index dropped, accepted
  await client.authenticated(who.jwtId, '2001:db8::1', (r, a) => a);
  assert.deepEqual(warnings, []);
});

test('identity, VA tokens, session status and refresh tokens', async () => {
  const who = await signIn(client, { email: `Pat.${randomUUID()}@Example.org` });
  await client.authenticated(who.jwtId, null, async (r, auth) => {
    assert.equal(await r.findUserByIcn(who.vaIcn), who.userId);
    assert.deepEqual(await r.findUsersByEmail(who.email.toLowerCase()), [who.userId]);
    const p = await r.userProfile(who.userId);
    assert.deepEqual({ id: p.id, vaIcn: p.vaIcn, email: p.email, firstName: p.firstName, isActive: p.isActive },
      { id: who.userId, vaIcn: who.vaIcn, email: who.email, firstName: 'Pat', isActive: true });
    assert.ok(p.createdAt instanceof Date);
    assert.equal(await r.vaAccessToken(who.userId), 'va-access');
    assert.equal(await r.vaRefreshToken(who.userId), 'va-refresh');
    assert.ok((await r.vaTokensDue('2 hours')).includes(who.userId));
    assert.equal(await r.storeVaTokens(who.userId, 'va-access-2', null, inHours(1)), 2);
    assert.equal(await r.vaRefreshToken(who.userId), 'va-refresh', 'a null refresh token keeps the stored one');
    assert.equal(await r.touchSession(who.jwtId), 'ACTIVE');
    assert.equal(await r.sessionStatus(who.jwtId), 'ACTIVE');
    assert.deepEqual(await r.refreshSessionToken(who.jwtId, null, 'rt1'), { generation: 1, refreshToken: 'rt1' });
    assert.equal(await r.rotateSessionRefreshToken(who.jwtId, 'rt1', 'rt2'), 2);
    assert.equal(await r.nodeRole(), 'primary');
    assert.ok((await r.disclosurePurposes()).some((p) => p.purpose === 'public_health' && p.accountable));
    assert.equal(auth.status, 'ACTIVE');
  });
  // A token never issued is reuse: the session ends.
  assert.equal(await client.authenticated(who.jwtId, null, (r) => r.refreshSessionToken(who.jwtId, 'forged', 'rt3')), null);
  assert.equal((await client.authenticated(who.jwtId, null, (r, a) => a)).reason, 'refresh_token_reuse');
  assert.equal(await client.request(null, null, (r) => r.deleteVaTokens(who.userId)), true);
  assert.equal(await client.request(null, null, (r) => r.vaAccessToken(who.userId)), null);
});

test('primitives: encrypt, decrypt, field hashes', async () => {
  await client.request(null, null, async (r) => {
    const sealed = await r.encrypt(Buffer.from('note'), 'notes:42');
    assert.ok(Buffer.isBuffer(sealed) && sealed[0] === 1);
    assert.deepEqual(await r.decrypt(sealed, 'notes:42'), Buffer.from('note'));
    assert.equal(await r.decryptText(await r.encryptText('héllo', 'notes:43'), 'notes:43'), 'héllo');
    const h = await r.fieldHash(' Maria@Example.org ', 'email');
    assert.equal(h.length, 36);
    assert.deepEqual(await r.fieldHash('maria@example.org', 'email'), h);
    const hs = await r.fieldHashes('maria@example.org', 'email');
    assert.ok(Array.isArray(hs) && hs.some((x) => Buffer.isBuffer(x) && x.equals(h)));
  });
});

test('MFA: enrol, confirm with the session, backup codes, trusted devices, disable', async () => {
  const who = await signIn(client);
  const uri = await client.authenticated(who.jwtId, null, (r) => r.mfaEnrollTotp(who.userId));
  assert.match(uri, /^otpauth:\/\/totp\//);
  assert.equal(await client.authenticated(who.jwtId, null, (r) => r.mfaConfirmTotp(who.userId, totp(uri), who.jwtId)), true);
  const codes = await client.authenticated(who.jwtId, null, (r) => r.mfaGenerateBackupCodes(who.userId, 3));
  assert.equal(codes.length, 3);
  // A second session needs the second factor: authenticate says so, a backup code gives it.
  const second = jti();
  await client.request(who.userId, null, (r) => r.createSession(who.userId, second, inHours(1),
    { deviceFingerprint: 'fp-1', deviceInfo: { os: 'iOS' } }));
  const before = await client.authenticated(second, null, async (r, auth) => ({ auth, needed: await r.mfaRequired(second) }));
  assert.equal(before.auth.status, 'ACTIVE');
  assert.equal(before.auth.mfaRequired, true);
  assert.equal(before.needed, true);
  assert.equal(await client.authenticated(second, null, (r) => r.mfaVerify(second, codes[0])), true);
  assert.equal((await client.authenticated(second, null, (r, a) => a)).mfaRequired, false);
  const device = await client.authenticated(second, null, (r) => r.mfaTrustDevice(second, 7));
  const devices = await client.authenticated(second, null, (r) => r.mfaTrustedDevices(who.userId));
  assert.deepEqual(devices.map((d) => d.deviceId), [device]);
  assert.ok(devices[0].trustedUntil > new Date());
  assert.equal(await client.authenticated(second, null, (r) => r.mfaRevokeDevice(who.userId, device)), true);
  assert.equal(await client.authenticated(second, null, (r) => r.mfaDisable(who.userId)), true);
});

test('disclosures: record_disclosure and the veteran\'s own view', async () => {
  const who = await signIn(client);
  const clerk = await signIn(client);
  const id = await client.request(clerk.userId, null, (r) => r.recordDisclosure(who.userId, 'State immunization registry',
    'Immunization history', 'public_health', { batch: 7 }));
  assert.equal(typeof id, 'number');
  const mine = await client.authenticated(who.jwtId, null, (r) => r.myDisclosures(who.jwtId));
  const row = mine.find((d) => d.recipient === 'State immunization registry');
  assert.ok(row);
  assert.deepEqual({ actor: row.actorUserId, purpose: row.purpose, accountable: row.accountable, by: row.recordedBy },
    { actor: clerk.userId, purpose: 'public_health', accountable: true, by: 'application' });
  assert.deepEqual(await client.authenticated(who.jwtId, null, (r) => r.myDisclosures(who.jwtId, inHours(1))), []);
});

test('sessions: lock, end all, expire, deactivate', async () => {
  const who = await signIn(client);
  assert.equal(await client.authenticated(who.jwtId, null, (r) => r.lockSession(who.jwtId, 'suspicious activity')), true);
  assert.equal((await client.authenticated(who.jwtId, null, (r, a) => a)).status, 'LOCKED');
  const other = jti();
  await client.request(who.userId, null, (r) => r.createSession(who.userId, other, inHours(1)));
  assert.equal(await client.request(null, null, (r) => r.endUserSessions(who.userId, 'password reset')), 1);
  assert.equal(typeof await client.request(null, null, (r) => r.expireSessions(100)), 'number');
  await client.request(null, null, (r) => r.deactivateUser(who.userId, 'closed by veteran'));
  await assert.rejects(client.request(null, null, (r) => r.upsertVaUser(who.vaIcn, 'veteran', null, null, null)),
    AuthenticationRefused);
});

test('crisis events: a verified notice after commit; a forged NOTIFY is dropped', async () => {
  const who = await signIn(client);
  let forgedDropped;
  const dropped = new Promise((resolve) => { forgedDropped = resolve; });
  const listening = new VetAssistClient(conninfo(), {
    warn: (m) => { if (/did not send/.test(m)) forgedDropped(m); },
  });
  const notices = [];
  let got;
  const genuine = new Promise((resolve) => { got = resolve; });
  // Other test files may log crisis events at the same time: this session's only.
  const stop = await listening.listenCrisis((n) => {
    if (n.sessionId !== who.sessionId) return;
    notices.push(n);
    got(n);
  });
  try {
    await client.request(null, null, (r) => r.connection.query(
      `NOTIFY vetassist_auth_crisis, '{"session_id": "${who.sessionId}", "event_id": 1, "mac": "00"}'`));
    const eventId = await client.authenticated(who.jwtId, null, (r) =>
      r.logSessionEvent(who.jwtId, 'phq9_item9_positive', 'crisis', { score: 3 }));
    const [notice] = await Promise.all([genuine, dropped]);
    assert.deepEqual(notice, { sessionId: who.sessionId, eventId });
    assert.deepEqual(notices, [notice]);
  } finally {
    await stop();
    await listening.end();
  }
});
