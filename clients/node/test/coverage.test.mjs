// Every function docs/api.md grants to vetassist_app, vetassist_admin or vetassist_auditor has a
// method, on the scope of each role it is granted to, calling it with its exact signature.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import test from 'node:test';
import pg from 'pg';
import { AdminScope, AppRequest, AuditorScope } from '../index.js';
import { apiDoc, conninfo, docTable } from './support.mjs';

const ROLES = { vetassist_app: AppRequest, vetassist_admin: AdminScope, vetassist_auditor: AuditorScope };
const TYPE_NAMES = { 'timestamp with time zone': 'timestamptz', int: 'integer', int4: 'integer', int8: 'bigint' };
const norm = (t) => TYPE_NAMES[t.trim()] ?? t.trim();

function granted() {
  const { header, rows } = docTable(apiDoc(), 'Who may call what');
  const out = [];
  for (const row of rows) {
    const m = /^`([a-z_]+)\(([^)]*)\)`$/.exec(row[0]);
    assert.ok(m, `unreadable function cell ${row[0]}`);
    const types = m[2] === '' ? [] : m[2].split(',').map(norm);
    const roles = header.slice(1).map((h, i) => [h.replace(/`/g, ''), row[i + 1]]).filter(([, c]) => c === '✓')
      .map(([h]) => h);
    out.push({ name: m[1], types, signature: `${m[1]}(${types.join(', ')})`, roles });
  }
  assert.ok(out.length > 60, `only ${out.length} functions in the table`);
  return out;
}

// Calls each method of a scope on a transaction that records the SQL instead of running it.
function callsOf(Scope) {
  const calls = [];  // { method, signature }
  let method;
  const tx = {
    async query(text) {
      for (const m of text.matchAll(/vetassist_auth\.([a-z_]+)\(([^;]*)/g)) {
        let types = [...m[2].matchAll(/\$\d+::([a-z_]+(?:\[\])?)/g)].map((x) => norm(x[1]));
        if (m[1] === 'session_status' && /^jwt_id => \$1\)/.test(m[2])) types = ['text'];  // named: jwt_id text
        calls.push({ method, name: m[1], signature: `${m[1]}(${types.join(', ')})`, text });
      }
      return { rows: [] };
    },
    get connection() { return null; },
  };
  const scope = new Scope(tx, () => {});
  const names = new Set();
  for (let p = Scope.prototype; p && p !== Object.prototype; p = Object.getPrototypeOf(p)) {
    for (const n of Object.getOwnPropertyNames(p)) if (n !== 'constructor' && !n.startsWith('_')) names.add(n);
  }
  const variants = {
    verifyAuditChain: [[], [{ seq: 1, hash: Buffer.alloc(32) }], [{ seq: 1, hash: Buffer.alloc(32), timeline: 1, lsn: '0/0' }]],
  };
  return Promise.all([...names].filter((n) => typeof Object.getOwnPropertyDescriptor(
    Object.getPrototypeOf(scope), n)?.value === 'function' || typeof scope[n] === 'function').map(async (n) => {
    for (const args of variants[n] ?? [['00000000-0000-0000-0000-000000000000', 'x', 'success', {}, null]]) {
      method = n;
      await scope[n](...args).catch(() => {});
    }
  })).then(() => calls);
}

test('every granted function is called as vetassist_auth.<name>( in the package source', () => {
  const source = ['index.js', 'fastify.js'].map((f) => readFileSync(new URL(`../${f}`, import.meta.url), 'utf8')).join('\n');
  const missing = granted().filter((f) => !source.includes(`vetassist_auth.${f.name}(`)).map((f) => f.signature);
  assert.deepEqual(missing, []);
});

test('each role\'s scope has a method for each of its functions, with the exact signature', async (t) => {
  const table = [];
  for (const [role, Scope] of Object.entries(ROLES)) {
    const calls = await callsOf(Scope);
    const wanted = granted().filter((f) => f.roles.includes(role));
    const missing = [];
    for (const f of wanted) {
      const methods = [...new Set(calls.filter((c) => c.signature === f.signature).map((c) => c.method))];
      if (methods.length === 0) missing.push(f.signature);
      table.push(`${role} | ${f.signature} | ${methods.join(', ')}`);
    }
    assert.deepEqual(missing, [], `${role}: no method calls these with their exact signature`);
    // Nothing on a scope calls a function its role may not execute.
    const allowed = new Set(wanted.map((f) => f.signature));
    const extra = [...new Set(calls.filter((c) => !allowed.has(c.signature)).map((c) => `${c.method}: ${c.signature}`))];
    assert.deepEqual(extra, [], `${role}: methods calling functions the role is not granted`);
  }
  t.diagnostic(`function -> method\n${table.join('\n')}`);
  if (process.env.VETASSIST_PRINT_COVERAGE) console.log(table.join('\n'));
});

test('every signature the package calls exists in the catalog', async () => {
  const signatures = new Set();
  for (const Scope of Object.values(ROLES)) for (const c of await callsOf(Scope)) signatures.add(c.signature);
  const db = new pg.Client({ connectionString: conninfo() });
  await db.connect();
  try {
    const { rows } = await db.query(
      "SELECT s FROM unnest($1::text[]) s WHERE to_regprocedure('vetassist_auth.' || s) IS NULL", [[...signatures]]);
    assert.deepEqual(rows.map((r) => r.s), []);
  } finally {
    await db.end();
  }
});
