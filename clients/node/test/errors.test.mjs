// The SQLSTATEs of docs/api.md's "Error codes" table (the one source) each map to a class, and
// the errors the server raises arrive as those classes, messages without the values.
import assert from 'node:assert/strict';
import test from 'node:test';
import pg from 'pg';
import * as client from '../index.js';
import { apiDoc, docTable, signIn } from './support.mjs';

const { ERROR_CLASSES, VetAssistError, errorClassFor, translate } = client;

function documentedSqlstates(markdown = apiDoc()) {
  const { header, rows } = docTable(markdown, 'Error codes');
  assert.equal(header[0], 'SQLSTATE');
  const codes = rows.map((r) => /^`([0-9A-Z]{5})`$/.exec(r[0])?.[1]);
  assert.ok(codes.every(Boolean), `unreadable SQLSTATE cells: ${rows.map((r) => r[0])}`);
  assert.ok(codes.length >= 12, `only ${codes.length} codes in the table`);
  return codes;
}

function checkCoverage(codes) {
  for (const code of codes) {
    const Class = errorClassFor(code);
    assert.notEqual(Class, VetAssistError, `${code} has no class`);
    assert.ok(Class.prototype instanceof VetAssistError, `${code}: ${Class.name}`);
    assert.equal(Class.sqlstate, code);
    assert.equal(client[Class.name], Class, `${Class.name} is not exported`);
  }
  const extra = Object.keys(ERROR_CLASSES).filter((c) => !codes.includes(c));
  assert.deepEqual(extra, [], 'classes for codes the docs do not list');
}

test('every documented SQLSTATE maps to its own error class, and nothing else is mapped', () => {
  checkCoverage(documentedSqlstates());
});

test('the Python client\'s class names are kept for the codes it maps', () => {
  const python = { '55000': 'KeyNotConfigured', XX001: 'CiphertextInvalid', '22023': 'InvalidArgument',
    '28000': 'AuthenticationRefused', P0002: 'NotFound', VA001: 'TokenExpired', '23505': 'DuplicateSession',
    '42501': 'PermissionDenied' };
  for (const [code, name] of Object.entries(python)) assert.equal(errorClassFor(code).name, name);
  assert.ok(new client.MalformedInput('m') instanceof client.InvalidArgument, '22P02 is an InvalidArgument, as in Python');
});

test('translate keeps the primary message, drops a quoted value, keeps cause and hint', () => {
  const raw = Object.assign(new pg.DatabaseError('invalid input syntax for type inet: "10.0.0.999"', 0, 'error'),
    { code: '22P02', hint: 'an IPv4 or IPv6 address' });
  const err = translate(raw);
  assert.ok(err instanceof client.MalformedInput && err instanceof client.InvalidArgument);
  assert.equal(err.message, 'invalid input syntax for type inet');
  assert.equal(err.sqlstate, '22P02');
  assert.equal(err.hint, 'an IPv4 or IPv6 address');
  assert.equal(err.cause, raw);
  const other = new Error('not a server error');
  assert.equal(translate(other), other);
  const unknown = translate(Object.assign(new pg.DatabaseError('x', 0, 'error'), { code: '12345' }));
  assert.equal(unknown.constructor, VetAssistError);
  assert.equal(unknown.sqlstate, '12345');
});

test('server errors arrive as their classes (real SQL as vetassist_app)', async () => {
  const { conninfo } = await import('./support.mjs');
  const c = new client.VetAssistClient(conninfo());
  try {
    const who = await signIn(c);
    const cases = [
      [client.MalformedInput, (r) => r.userProfile('not-a-uuid'), 'not-a-uuid'],
      [client.MalformedTime, (r) => r.storeVaTokens(who.userId, 'a', 'r', 'not-a-time-xyz'), 'not-a-time-xyz'],
      [client.InvalidArgument, (r) => r.auditEvent('auth', 'x', 'success'), null],  // the extension's own category
      [client.NotFound, (r) => r.touchSession('no-such-jwt-id'), 'no-such-jwt-id'],
      [client.DuplicateSession, (r) => r.createSession(who.userId, who.jwtId, new Date(Date.now() + 3600_000)), who.jwtId],
      [client.CiphertextInvalid, async (r) => r.decrypt(await r.encrypt(Buffer.from('x'), 'notes:1'), 'notes:2'), null],
      [client.NotText, async (r) => r.decryptText(await r.encrypt(Buffer.from([0x61, 0, 0x62]), 'notes:3'), 'notes:3'), null],
      [client.PermissionDenied, (r) => r.connection.query('SELECT vetassist_auth.seal_audit_log(1)').catch((e) => { throw translate(e); }), null],
    ];
    for (const [Class, call, secret] of cases) {
      await assert.rejects(c.request(null, null, call), (err) => {
        assert.ok(err instanceof Class, `${Class.name} expected, got ${err.name}: ${err.message}`);
        assert.equal(err.sqlstate, Class.sqlstate);
        if (secret) assert.ok(!err.message.includes(secret), err.message);
        return true;
      });
    }
    // 42501's hint names the role to grant.
    await assert.rejects(c.request(null, null, (r) => r.connection.query('SELECT vetassist_auth.seal_audit_log(1)')
      .catch((e) => { throw translate(e); })), (err) => /vetassist_admin/.test(err.hint ?? ''));
    // 22007 for an interval too (purge_audit_log as vetassist_admin).
    const { adminConninfo } = await import('./support.mjs');
    const admins = new client.VetAssistClient(adminConninfo());
    try {
      await assert.rejects(admins.admin((a) => a.purgeAuditLog('forever-ish')), (err) => {
        assert.ok(err instanceof client.MalformedTime, `${err.name}: ${err.message}`);
        assert.equal(err.sqlstate, '22007');
        assert.ok(!err.message.includes('forever-ish'), err.message);
        return true;
      });
    } finally {
      await admins.end();
    }
    // 28000: my_disclosures of an ended session.
    await c.authenticated(who.jwtId, null, (r) => r.endSession(who.jwtId, 'logout'));
    await assert.rejects(c.request(null, null, (r) => r.myDisclosures(who.jwtId)), client.AuthenticationRefused);
  } finally {
    await c.end();
  }
});
