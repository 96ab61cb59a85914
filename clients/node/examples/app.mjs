// A runnable Fastify app on vetassist-client: the VA.gov sign-in callback creates the user and
// the session, a PHI page records who viewed whose chart, the veteran sees their accesses,
// logout ends the session. Every request is one transaction opened by authenticate.
//
//   VETASSIST_PG_CONNINFO=postgresql://app_user@/vetassist?host=/run/postgresql \
//   JWT_SECRET=... PORT=3000 node examples/app.mjs
//
// The app signs its own session JWT (HS256 with node:crypto, to keep the example free of
// dependencies; use a JWT library in production): the token's `jti` is the session's jwt_id.
import { createHmac, randomUUID, timingSafeEqual } from 'node:crypto';
import { pathToFileURL } from 'node:url';
import Fastify from 'fastify';
import { VetAssistClient, VetAssistError } from 'vetassist-client';
import vetassist from 'vetassist-client/fastify';

const SESSION_SECONDS = 12 * 3600;
const b64url = (buf) => Buffer.from(buf).toString('base64url');

export function signJwt(secret, claims) {
  const head = b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const body = b64url(JSON.stringify(claims));
  const sig = createHmac('sha256', secret).update(`${head}.${body}`).digest('base64url');
  return `${head}.${body}.${sig}`;
}

/** The claims of a token this app signed and that has not expired, else null. */
export function verifyJwt(secret, token) {
  const [head, body, sig] = String(token).split('.');
  if (!head || !body || !sig) return null;
  const expected = Buffer.from(createHmac('sha256', secret).update(`${head}.${body}`).digest('base64url'));
  const given = Buffer.from(sig);
  if (given.length !== expected.length || !timingSafeEqual(given, expected)) return null;
  const claims = JSON.parse(Buffer.from(body, 'base64url').toString());
  return typeof claims.exp === 'number' && claims.exp * 1000 > Date.now() ? claims : null;
}

function bearer(request) {
  const header = request.headers.authorization ?? '';
  return header.startsWith('Bearer ') ? header.slice(7) : null;
}

/** @param {{ client: VetAssistClient, secret: string, logger?: boolean }} options */
export function buildApp({ client, secret, logger = false }) {
  const app = Fastify({ logger });

  app.register(vetassist, {
    client,
    // The session is the token's jti, once the signature and expiry check out.
    jwtId: (request) => verifyJwt(secret, bearer(request))?.jti ?? null,
  });

  // Errors of the SQL API: the class says what happened; messages carry no PHI.
  app.setErrorHandler((err, request, reply) => {
    if (err instanceof VetAssistError && ['InvalidArgument', 'MalformedInput'].includes(err.name)) {
      return reply.code(400).send({ error: err.name });
    }
    if (err instanceof VetAssistError && err.name === 'AuthenticationRefused') {
      return reply.code(403).send({ error: err.name });
    }
    request.log.error({ name: err.name, sqlstate: err.sqlstate }, 'request failed');
    return reply.code(500).send({ error: 'internal' });
  });

  // After the VA.gov OAuth callback (the token exchange is the app's): the account, its VA
  // tokens and a session, in one transaction; the response carries the app's session JWT.
  app.post('/auth/callback', { config: { vetassist: 'anonymous' } }, async (request) => {
    const { request: r } = request.vetassist;
    const p = request.body;
    const userId = await r.upsertVaUser(p.icn, p.veteranStatus ?? 'veteran', p.email, p.firstName, p.lastName);
    await r.storeVaTokens(userId, p.vaAccessToken, p.vaRefreshToken ?? null, new Date(p.vaTokenExpiresAt),
      'openid profile');
    const jwtId = randomUUID();
    const exp = Math.floor(Date.now() / 1000) + SESSION_SECONDS;
    await r.createSession(userId, jwtId, new Date(exp * 1000),
      { ip: request.ip, userAgent: request.headers['user-agent'] ?? null });
    return { token: signJwt(secret, { sub: userId, jti: jwtId, exp }), userId };
  });

  // A PHI page: a veteran's summary. The veteran's own page only; anyone else's is refused
  // and that refusal is itself an audit row about that veteran (committed: a 4xx commits).
  app.get('/veterans/:id/summary', async (request, reply) => {
    const { request: r, auth } = request.vetassist;
    const subject = request.params.id;
    if (subject !== auth.userId) {
      await r.auditEvent('phi', 'summary_viewed', 'denied', { page: 'summary' }, subject);
      return reply.code(403).send({ error: 'forbidden' });
    }
    const profile = await r.userProfile(subject);  // decrypted; recorded by the extension
    await r.auditEvent('phi', 'summary_viewed', 'success', { page: 'summary' }, subject);
    return { firstName: profile.firstName, veteranStatus: profile.veteranStatus, mfaEnabled: profile.mfaEnabled };
  });

  // The veteran's own accounting: every access to their PHI, this page's views included.
  app.get('/me/disclosures', async (request) => {
    const { request: r } = request.vetassist;
    const jti = verifyJwt(secret, bearer(request)).jti;
    const rows = await r.myDisclosures(jti);
    return rows.map((d) => ({ occurredAt: d.occurredAt, description: d.description, recordedBy: d.recordedBy,
      actorUserId: d.actorUserId }));
  });

  // Logout: the session ends and the VA tokens go, in the request's transaction.
  app.post('/auth/logout', { config: { vetassist: 'mfa-pending' } }, async (request) => {
    const { request: r, auth } = request.vetassist;
    const jti = verifyJwt(secret, bearer(request)).jti;
    await r.endSession(jti, 'logout');
    await r.deleteVaTokens(auth.userId);
    return { ok: true };
  });

  return app;
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  const client = new VetAssistClient(process.env.VETASSIST_PG_CONNINFO);
  const app = buildApp({ client, secret: process.env.JWT_SECRET ?? randomUUID(), logger: true });
  app.addHook('onClose', () => client.end());
  await app.listen({ port: Number(process.env.PORT ?? 3000), host: '127.0.0.1' });
}
