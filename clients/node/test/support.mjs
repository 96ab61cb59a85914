// Shared by the tests: the connection strings (required: a missing one fails the run, it is
// not a skip), fresh veterans, and RFC 6238 codes for the MFA tests.
import { createHmac, randomInt, randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';

function required(name) {
  const value = process.env[name];
  if (!value) {
    throw new Error(`${name} is not set: the Node client's tests run against a real cluster (see clients/node/README.md)`);
  }
  return value;
}

export const conninfo = () => required('VETASSIST_PG_CONNINFO');
export const auditorConninfo = () => required('VETASSIST_PG_AUDITOR_CONNINFO');
export const adminConninfo = () => required('VETASSIST_PG_ADMIN_CONNINFO');

/** docs/api.md: the one source of the grants table and the error codes. */
export const apiDoc = () => readFileSync(new URL('../../../docs/api.md', import.meta.url), 'utf8');

/** The rows of the markdown table that follows the heading `## title`. */
export function docTable(markdown, title) {
  const start = markdown.indexOf(`\n## ${title}\n`);
  if (start < 0) throw new Error(`docs/api.md has no section "${title}"`);
  const lines = markdown.slice(start).split('\n');
  const first = lines.findIndex((l) => l.startsWith('|'));
  const rows = [];
  for (const line of lines.slice(first)) {
    if (!line.startsWith('|')) break;
    rows.push(line.slice(1, -1).split('|').map((c) => c.trim()));
  }
  if (rows.length < 3) throw new Error(`the table of "${title}" is empty`);
  return { header: rows[0], rows: rows.slice(2) };
}

export const icn = () => `10${String(randomInt(1e8)).padStart(8, '0')}V${String(randomInt(1e6)).padStart(6, '0')}`;
export const jti = () => `jwt-${randomUUID()}`;
export const inHours = (h) => new Date(Date.now() + h * 3600_000);

/** Signs in a new veteran in one request: user, VA tokens, session. */
export async function signIn(client, { ip = '203.0.113.5', email = 'pat@example.org' } = {}) {
  const jwtId = jti();
  const vaIcn = icn();
  const { userId, sessionId } = await client.request(null, ip, async (r) => {
    const userId = await r.upsertVaUser(vaIcn, 'veteran', email, 'Pat', 'Doe');
    await r.storeVaTokens(userId, 'va-access', 'va-refresh', inHours(1), 'openid');
    const sessionId = await r.createSession(userId, jwtId, inHours(2), { ip, userAgent: 'node-test' });
    return { userId, sessionId };
  });
  return { userId, sessionId, jwtId, vaIcn, email };
}

function base32(text) {
  const alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZ234567';
  let bits = '';
  for (const c of text.replace(/=+$/, '').toUpperCase()) bits += alphabet.indexOf(c).toString(2).padStart(5, '0');
  const bytes = [];
  for (let i = 0; i + 8 <= bits.length; i += 8) bytes.push(parseInt(bits.slice(i, i + 8), 2));
  return Buffer.from(bytes);
}

/** The RFC 6238 code of an otpauth:// URI's secret at time `at` (ms). */
export function totp(otpauth, at = Date.now()) {
  const secret = base32(new URL(otpauth).searchParams.get('secret'));
  const counter = Buffer.alloc(8);
  counter.writeBigUInt64BE(BigInt(Math.floor(at / 30_000)));
  const mac = createHmac('sha1', secret).update(counter).digest();
  const offset = mac[mac.length - 1] & 0xf;
  return String((mac.readUInt32BE(offset) & 0x7fffffff) % 1_000_000).padStart(6, '0');
}
