// A call that failed inside a request aborts its transaction even when the handler catches the
// error; COMMIT then answers ROLLBACK. authenticated()/request() and the Fastify plugin must
// throw TransactionAborted (500 in Fastify), never report a success that was rolled back.
import assert from 'node:assert/strict';
import test from 'node:test';
import Fastify from 'fastify';
import { NotFound, TransactionAborted, VetAssistClient, VetAssistError } from 'vetassist-client';
import vetassist from 'vetassist-client/fastify';
import { auditorConninfo, conninfo, icn, inHours, jti } from './support.mjs';

const NIL = '00000000-0000-0000-0000-000000000000';
const client = new VetAssistClient(conninfo(), { warn: () => {} });
const auditors = new VetAssistClient(auditorConninfo());
test.after(async () => { await client.end(); await auditors.end(); });

async function session() {
  const jwtId = jti();
  const userId = await client.request(null, null, async (r) => {
    const id = await r.upsertVaUser(icn(), 'veteran', null, null, null);
    await r.createSession(id, jwtId, inHours(1));
    return id;
  });
  return { jwtId, userId };
}

const eventTypes = async (userId) => (await auditors.auditor((a) => a.phiDisclosures(userId, '-infinity', 'infinity')))
  .map((r) => r.eventType);

test('authenticated(): a caught NotFound aborts the transaction, and it throws TransactionAborted', async () => {
  const { jwtId, userId } = await session();
  let caught = null;
  await assert.rejects(client.authenticated(jwtId, null, async (req, auth) => {
    assert.equal(auth.status, 'ACTIVE');
    await req.auditEvent('phi', 'aborted_plain', 'success', {}, userId);
    try {
      await req.userProfile(NIL);
    } catch (err) {
      caught = err;  // swallowed by the handler
    }
    return 'looks fine';
  }), (err) => {
    assert.ok(err instanceof TransactionAborted, `TransactionAborted expected, got ${err?.name}: ${err?.message}`);
    assert.ok(err instanceof VetAssistError);
    assert.equal(err.sqlstate, null);
    assert.equal(err.cause, caught, 'the error that aborted the transaction is the cause');
    return true;
  });
  assert.ok(caught instanceof NotFound, `userProfile of the nil uuid: ${caught?.name}`);
  assert.ok(!(await eventTypes(userId)).includes('aborted_plain'), 'the audit row was rolled back');
  assert.equal(client.pool.totalCount, client.pool.idleCount, 'the connection went back to the pool');
});

test('request(): an error caught on the raw connection is detected by COMMIT answering ROLLBACK', async () => {
  const { userId } = await session();
  await assert.rejects(client.request(userId, null, async (req) => {
    await req.auditEvent('phi', 'aborted_raw', 'success', {}, userId);
    await req.connection.query('SELECT 1/0').catch(() => {});
    return 'looks fine';
  }), TransactionAborted);
  assert.ok(!(await eventTypes(userId)).includes('aborted_raw'));
});

test('a savepoint the handler rolled back to leaves a committable transaction', async () => {
  const { userId } = await session();
  const out = await client.request(userId, null, async (req) => {
    await req.auditEvent('phi', 'kept_after_savepoint', 'success', {}, userId);
    await req.connection.query('SAVEPOINT s');
    await req.connection.query('SELECT 1/0').catch(() => {});
    await req.connection.query('ROLLBACK TO SAVEPOINT s');
    return 'committed';
  });
  assert.equal(out, 'committed');
  assert.ok((await eventTypes(userId)).includes('kept_after_savepoint'));
});

test('plugin: a handler that catches NotFound and returns 200 is answered 500, nothing committed', async () => {
  const { jwtId, userId } = await session();
  const f = Fastify();
  await f.register(vetassist, { client, jwtId: (request) => request.headers['x-jti'] ?? null });
  let caught = null;
  f.post('/swallow', async (request, reply) => {
    const req = request.vetassist.request;
    await req.auditEvent('phi', 'aborted_fastify', 'success', {}, userId);
    try {
      await req.userProfile(NIL);
    } catch (err) {
      caught = err;
    }
    return reply.code(200).send({ saved: true });
  });
  await f.ready();
  try {
    const res = await f.inject({ method: 'POST', url: '/swallow', headers: { 'x-jti': jwtId } });
    assert.ok(caught instanceof NotFound);
    assert.equal(res.statusCode, 500, res.body);
    assert.ok(!res.body.includes('saved'), res.body);
    assert.ok(!(await eventTypes(userId)).includes('aborted_fastify'), 'nothing was committed');
    assert.equal(client.pool.totalCount, client.pool.idleCount, 'the connection went back to the pool');
  } finally {
    await f.close();
  }
});
