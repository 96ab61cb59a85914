// The example app (examples/app.mjs) and the Fastify plugin, through Fastify's inject against
// the real cluster: sign-in callback, a PHI page writing audit_event with a subject, the
// veteran's own accounting, logout, 401s, commit before the response and rollback on errors.
import assert from 'node:assert/strict';
import test from 'node:test';
import Fastify from 'fastify';
import { VetAssistClient } from 'vetassist-client';
import vetassist from 'vetassist-client/fastify';
import { buildApp, signJwt } from '../examples/app.mjs';
import { auditorConninfo, conninfo, icn, inHours, jti } from './support.mjs';

const secret = 'test-secret';
const client = new VetAssistClient(conninfo(), { warn: () => {} });
const auditors = new VetAssistClient(auditorConninfo());
const app = buildApp({ client, secret });
test.after(async () => { await app.close(); await client.end(); await auditors.end(); });

const callback = (body = {}) => app.inject({ method: 'POST', url: '/auth/callback', payload: {
  icn: icn(), email: 'sam@example.org', firstName: 'Sam', lastName: 'Roe', vaAccessToken: 'va-a',
  vaRefreshToken: 'va-r', vaTokenExpiresAt: inHours(1).toISOString(), ...body } });
const get = (url, token) => app.inject({ method: 'GET', url, headers: token ? { authorization: `Bearer ${token}` } : {} });

test('example app: sign in, view the PHI page, see it in my disclosures, log out', async () => {
  const res = await callback();
  assert.equal(res.statusCode, 200, res.body);
  const { token, userId } = res.json();
  const page = await get(`/veterans/${userId}/summary`, token);
  assert.equal(page.statusCode, 200, page.body);
  assert.deepEqual(page.json(), { firstName: 'Sam', veteranStatus: 'veteran', mfaEnabled: false });
  const mine = await get('/me/disclosures', token);
  assert.equal(mine.statusCode, 200);
  const views = mine.json().filter((d) => d.description === 'summary_viewed');
  assert.equal(views.length, 1, 'the page view was committed with the veteran as subject');
  assert.equal(views[0].actorUserId, userId);
  const out = await app.inject({ method: 'POST', url: '/auth/logout', headers: { authorization: `Bearer ${token}` } });
  assert.deepEqual(out.json(), { ok: true });
  const after = await get(`/veterans/${userId}/summary`, token);
  assert.equal(after.statusCode, 401);
  assert.deepEqual(after.json(), { error: 'unauthorized', reason: 'logout' });
  assert.equal(await client.request(null, null, (r) => r.vaAccessToken(userId)), null, 'logout deleted the VA tokens');
});

test('example app: 401 without a token, with a forged one, for an unknown session', async () => {
  assert.deepEqual((await get('/me/disclosures')).json(), { error: 'unauthorized', reason: 'missing' });
  assert.equal((await get('/me/disclosures', 'x.y.z')).statusCode, 401);
  const unknown = signJwt(secret, { jti: jti(), exp: Math.floor(Date.now() / 1000) + 60 });
  const res = await get('/me/disclosures', unknown);
  assert.equal(res.statusCode, 401);
  assert.deepEqual(res.json(), { error: 'unauthorized', reason: 'unknown' });
});

test('example app: another veteran\'s page is 403, and the refusal is committed about that veteran', async () => {
  const a = (await callback()).json();
  const b = (await callback()).json();
  const res = await get(`/veterans/${b.userId}/summary`, a.token);
  assert.equal(res.statusCode, 403);
  const rows = await auditors.auditor((x) => x.phiDisclosures(b.userId, '-infinity', 'infinity'));
  const denied = rows.filter((r) => r.eventType === 'summary_viewed');
  assert.deepEqual(denied.map((r) => [r.outcome, r.actorUserId]), [['denied', a.userId]]);
});

test('example app: a bad client IP is recorded as null, the sign-in still succeeds', async () => {
  const res = await app.inject({ method: 'POST', url: '/auth/callback', remoteAddress: 'not-an-address',
    payload: { icn: icn(), email: 'x@example.org', vaAccessToken: 'a', vaTokenExpiresAt: inHours(1).toISOString() } });
  assert.equal(res.statusCode, 200, res.body);
});

async function pluginApp(routes) {
  const f = Fastify();
  await f.register(vetassist, { client, jwtId: (request) => request.headers['x-jti'] ?? null });
  routes(f);
  await f.ready();
  return f;
}

async function session() {
  const jwtId = jti();
  const userId = await client.request(null, null, async (r) => {
    const id = await r.upsertVaUser(icn(), 'veteran', null, null, null);
    await r.createSession(id, jwtId, inHours(1));
    return id;
  });
  return { jwtId, userId };
}

test('plugin: a handler that throws rolls back; 5xx rolls back; success commits before the response', async () => {
  const { jwtId, userId } = await session();
  const f = await pluginApp((f) => {
    f.post('/ok', async (request) => request.vetassist.request.auditEvent('phi', 'ok', 'success', {}, userId));
    f.post('/throw', async (request) => {
      await request.vetassist.request.auditEvent('phi', 'thrown', 'success', {}, userId);
      throw new Error('boom');
    });
    f.post('/503', async (request, reply) => {
      await request.vetassist.request.auditEvent('phi', 'unavailable', 'success', {}, userId);
      return reply.code(503).send({ later: true });
    });
    f.post('/commit-fails', async (request) => {
      // A deferred constraint fails at COMMIT: the answer must not be a success.
      const q = (sql) => request.vetassist.request.connection.query(sql);
      await q('CREATE TEMP TABLE p (id integer PRIMARY KEY)');
      await q('CREATE TEMP TABLE c (id integer REFERENCES p DEFERRABLE INITIALLY DEFERRED)');
      await q('INSERT INTO c VALUES (1)');
      await request.vetassist.request.auditEvent('phi', 'commit_failed', 'success', {}, userId);
      return { saved: true };
    });
  });
  try {
    const h = { 'x-jti': jwtId };
    const ok = await f.inject({ method: 'POST', url: '/ok', headers: h });
    assert.equal(ok.statusCode, 200);
    assert.equal((await f.inject({ method: 'POST', url: '/throw', headers: h })).statusCode, 500);
    assert.equal((await f.inject({ method: 'POST', url: '/503', headers: h })).statusCode, 503);
    const failed = await f.inject({ method: 'POST', url: '/commit-fails', headers: h });
    assert.equal(failed.statusCode, 500, failed.body);
    const types = (await auditors.auditor((a) => a.phiDisclosures(userId, '-infinity', 'infinity')))
      .map((r) => r.eventType);
    assert.deepEqual(types.filter((t) => ['ok', 'thrown', 'unavailable', 'commit_failed'].includes(t)), ['ok']);
  } finally {
    await f.close();
  }
});

test('plugin: MFA pending is 401 on session routes, allowed on mfa-pending routes; idle pool after', async () => {
  const { jwtId, userId } = await session();
  const uri = await client.authenticated(jwtId, null, (r) => r.mfaEnrollTotp(userId));
  const { totp } = await import('./support.mjs');
  await client.request(null, null, (r) => r.mfaConfirmTotp(userId, totp(uri)));  // enabled; this session not verified
  const f = await pluginApp((f) => {
    f.get('/page', async () => ({ ok: true }));
    f.get('/verify', { config: { vetassist: 'mfa-pending' } }, async (request) => ({ mfa: request.vetassist.auth.mfaRequired }));
    f.get('/off', { config: { vetassist: 'off' } }, async (request) => ({ ctx: request.vetassist }));
  });
  try {
    const page = await f.inject({ url: '/page', headers: { 'x-jti': jwtId } });
    assert.equal(page.statusCode, 401);
    assert.deepEqual(page.json(), { error: 'unauthorized', reason: 'mfa_required' });
    assert.deepEqual((await f.inject({ url: '/verify', headers: { 'x-jti': jwtId } })).json(), { mfa: true });
    assert.deepEqual((await f.inject({ url: '/off' })).json(), { ctx: null });
    assert.equal(client.pool.totalCount, client.pool.idleCount, 'every connection went back to the pool');
  } finally {
    await f.close();
  }
});
