// Compiled by `tsc --noEmit` (npm test), never run: the hand-written declarations must accept
// the documented usage and reject misuse (each @ts-expect-error must be an error).
import Fastify from 'fastify';
import pg from 'pg';
import {
  type AuthResult, type ChainVerification, type Disclosure, type Profile, InvalidArgument, MalformedInput,
  MalformedTime, TransactionAborted, VetAssistClient, VetAssistError,
} from 'vetassist-client';
import vetassist from 'vetassist-client/fastify';

const client = new VetAssistClient('postgresql://app@/db', { warn: (m: string) => void m });
const wrapped = VetAssistClient.fromPool(new pg.Pool());

export async function usage(): Promise<void> {
  const status: string | null = await client.authenticated('jti', '203.0.113.7', async (req, auth: AuthResult) => {
    if (auth.status !== 'ACTIVE' || auth.userId === null) return auth.reason;
    const profile: Profile | null = await req.userProfile(auth.userId);
    const id: number = await req.auditEvent('phi', 'chart_viewed', 'success', { chart: 17 }, auth.userId);
    const mine: Disclosure[] = await req.myDisclosures('jti');
    const expires: Date | null = auth.absoluteExpiresAt;
    void profile; void id; void mine; void expires;
    // @ts-expect-error outcome is one of success, failure, denied, info
    await req.auditEvent('phi', 'x', 'ok');
    return auth.status;
  });
  const uid: string = await client.request(null, undefined, (req) => req.upsertVaUser('1012667985V123456', 'veteran',
    null, null, null));
  const report: ChainVerification = await client.auditor((a) => a.verifyAuditChain({ seq: 1, hash: Buffer.alloc(32) }));
  const sealed: number = await client.admin((a) => a.sealAuditLog(1000));
  // @ts-expect-error sealAuditLog is an admin function, not an auditor one
  await client.auditor((a) => a.sealAuditLog());
  // @ts-expect-error record_disclosure is the app's, not the admin's
  await client.admin((a) => a.recordDisclosure(uid, 'r', 'd', 'treatment'));
  const err: unknown = new MalformedInput('m', '22P02');
  if (err instanceof InvalidArgument && err instanceof VetAssistError) void err.sqlstate;
  const time: MalformedInput = new MalformedTime('m', '22007');
  const aborted: VetAssistError = new TransactionAborted('rolled back');
  void time; void aborted;
  void status; void report; void sealed; void wrapped;

  const app = Fastify();
  await app.register(vetassist, { client, jwtId: (request) => request.headers['x-jti'] as string | undefined });
  app.get('/me', async (request) => {
    const ctx = request.vetassist!;
    return ctx.request.userProfile(ctx.auth!.userId!);
  });
  app.post('/login', { config: { vetassist: 'anonymous' } }, async () => ({}));
  // @ts-expect-error not a mode
  app.post('/bad', { config: { vetassist: 'public' } }, async () => ({}));
}
