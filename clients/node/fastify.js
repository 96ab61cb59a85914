// A Fastify plugin: one vetassist_auth transaction per HTTP request.
//
// onRequest opens the request's transaction with vetassist_auth.authenticate(jwt_id, client_ip)
// and keeps it open for the handler (request.vetassist.request, request.vetassist.auth). A
// session that is not ACTIVE (unknown, ended, expired, locked), or that still needs MFA on a
// route that requires it, is answered 401 after committing what authenticate recorded (an
// expiry found on the spot, say). onSend, before the response leaves, commits: a handler's
// response is only sent once its audit rows are durable, and a failed COMMIT becomes an error
// response instead of a success that did not happen. So does a COMMIT the server answered with
// ROLLBACK (a call failed and the handler caught the error, which aborted the transaction):
// commit() throws TransactionAborted and the answer is 500, never the handler's 2xx. It rolls back instead when the handler
// threw (onError) or the status is 5xx. onResponse rolls back whatever is still open.
//
// Route option `config: { vetassist: MODE }`:
//   'session'      (default) an ACTIVE session that needs no more MFA, else 401
//   'mfa-pending'  an ACTIVE session, MFA done or not (the route that verifies the code)
//   'anonymous'    no session: a transaction with set_actor(null, client_ip) (sign-in callback)
//   'off'          no transaction at all
const kTx = Symbol('vetassist.transaction');
const kFailed = Symbol('vetassist.failed');

const MODES = new Set(['session', 'mfa-pending', 'anonymous', 'off']);

function routeMode(request, fallback) {
  const config = request.routeOptions?.config ?? request.routeConfig ?? {};
  const mode = config.vetassist ?? fallback;
  if (!MODES.has(mode)) throw new Error(`vetassist: unknown route mode ${JSON.stringify(mode)}`);
  return mode;
}

async function finish(request, reply) {
  const tx = request[kTx];
  if (!tx) return;
  request[kTx] = undefined;
  if (request[kFailed] || reply.statusCode >= 500) {
    await tx.rollback();
  } else {
    await tx.commit();
  }
}

/**
 * @param {import('fastify').FastifyInstance} fastify
 * @param {{ client: import('./index.js').VetAssistClient,
 *           jwtId: (request: any) => string | null | undefined | Promise<string | null | undefined>,
 *           clientIp?: (request: any) => string | null | undefined,
 *           defaultMode?: 'session' | 'mfa-pending' | 'anonymous' | 'off',
 *           unauthorized?: (request: any, reply: any, why: string) => unknown }} options
 */
async function vetassistPlugin(fastify, options) {
  const { client, jwtId } = options;
  if (!client || typeof jwtId !== 'function') {
    throw new Error('vetassist: the plugin needs { client, jwtId(request) }');
  }
  const clientIp = options.clientIp ?? ((request) => request.ip);
  const defaultMode = options.defaultMode ?? 'session';
  const unauthorized = options.unauthorized ?? ((request, reply, why) => ({ error: 'unauthorized', reason: why }));

  fastify.decorateRequest('vetassist', null);
  fastify.decorateRequest(kTx, null);
  fastify.decorateRequest(kFailed, false);

  fastify.addHook('onRequest', async (request, reply) => {
    const mode = routeMode(request, defaultMode);
    if (mode === 'off') return;
    const ip = clientIp(request) ?? null;
    if (mode === 'anonymous') {
      const tx = await client.beginRequest(null, ip);
      request[kTx] = tx;
      request.vetassist = { request: tx.request, auth: null };
      return;
    }
    const jti = await jwtId(request);
    if (!jti) {
      reply.code(401);
      return reply.send(unauthorized(request, reply, 'missing'));
    }
    const tx = await client.beginAuthenticated(jti, ip);
    const { auth } = tx;
    const refused = auth.status !== 'ACTIVE' ? (auth.reason ?? String(auth.status).toLowerCase())
      : auth.mfaRequired && mode === 'session' ? 'mfa_required' : null;
    if (refused !== null) {
      await tx.commit();  // keep what authenticate found (a time-out it ended on the spot)
      reply.code(401);
      return reply.send(unauthorized(request, reply, refused));
    }
    request[kTx] = tx;
    request.vetassist = { request: tx.request, auth };
  });

  fastify.addHook('onError', async (request) => {
    request[kFailed] = true;
  });

  fastify.addHook('onSend', async (request, reply, payload) => {
    await finish(request, reply);
    return payload;
  });

  fastify.addHook('onResponse', async (request) => {
    // Normally finished in onSend; a request that never got there (aborted) is rolled back.
    const tx = request[kTx];
    if (tx) {
      request[kTx] = undefined;
      await tx.rollback();
    }
  });
}

// Not encapsulated: the hooks apply to the routes of the instance that registers it.
vetassistPlugin[Symbol.for('skip-override')] = true;
vetassistPlugin[Symbol.for('fastify.display-name')] = 'vetassist-client';
vetassistPlugin[Symbol.for('plugin-meta')] = { name: 'vetassist-client', fastify: '>=4.21' };

export default vetassistPlugin;
export { vetassistPlugin };
