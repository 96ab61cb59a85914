// node --test; needs `npm install` and VETASSIST_PG_CONNINFO (a database with the extension,
// user in role vetassist_app), e.g. postgresql://app_user@/vetassist?host=/path/to/socket/dir&port=28870
import { randomInt, randomUUID } from 'node:crypto';
import assert from 'node:assert/strict';
import test from 'node:test';

const conninfo = process.env.VETASSIST_PG_CONNINFO;
let pgMissing = false;
try {
  await import('pg');
} catch {
  pgMissing = true;
}

const skip = pgMissing ? 'pg is not installed (run npm install)'
  : !conninfo ? 'VETASSIST_PG_CONNINFO is not set' : false;

test('sign-in, session touch and sign-out', { skip }, async () => {
  const ex = await import('./example.mjs');
  const pool = ex.createPool(conninfo);
  try {
    const inOneHour = new Date(Date.now() + 3600_000);
    const jwtId = `jwt-${randomUUID()}`;
    const signIn = {
      icn: `10${randomInt(1e8)}V${randomInt(1e6)}`, veteranStatus: 'veteran', email: 'pat@example.org',
      accessToken: 'va-access', refreshToken: 'va-refresh', tokenExpiresAt: inOneHour,
      jwtId, sessionExpiresAt: inOneHour, ip: '203.0.113.5', userAgent: 'node-test',
    };
    const { userId, sessionId } = await ex.signIn(pool, signIn);
    assert.match(userId, /^[0-9a-f-]{36}$/);
    assert.match(sessionId, /^[0-9a-f-]{36}$/);

    assert.equal(await ex.touch(pool, jwtId, { actorUserId: userId }), 'ACTIVE');
    assert.equal(await ex.sessionStatus(pool, jwtId), 'ACTIVE');
    assert.equal(await ex.vaAccessToken(pool, userId), 'va-access');
    assert.equal(await ex.signOut(pool, jwtId), true);
    assert.equal(await ex.signOut(pool, jwtId), false);
    assert.equal(await ex.touch(pool, jwtId), 'TERMINATED');

    await assert.rejects(ex.touch(pool, 'no-such-jwt'),
      (err) => err instanceof ex.NotFound && err.sqlstate === 'P0002');
    await assert.rejects(ex.signIn(pool, signIn),
      (err) => err instanceof ex.DuplicateSession && !err.message.includes(jwtId));
    await assert.rejects(ex.signIn(pool, { ...signIn, jwtId: `jwt-${randomUUID()}`, ip: 'secret-not-an-ip' }),
      (err) => err instanceof ex.InvalidArgument && !err.message.includes('secret-not-an-ip'));
  } finally {
    await pool.end();
  }
});
