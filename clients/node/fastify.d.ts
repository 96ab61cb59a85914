// Types of vetassist-client/fastify.
import type { FastifyPluginAsync, FastifyReply, FastifyRequest } from 'fastify';
import type { AppRequest, AuthResult, VetAssistClient } from './index.js';

export type VetAssistMode = 'session' | 'mfa-pending' | 'anonymous' | 'off';

export interface VetAssistPluginOptions {
  client: VetAssistClient;
  /** The session's jwt_id from a token the app has verified; null/undefined: 401. */
  jwtId(request: FastifyRequest): string | null | undefined | Promise<string | null | undefined>;
  /** Default: request.ip (set Fastify's trustProxy behind a proxy). Invalid: recorded as null. */
  clientIp?(request: FastifyRequest): string | null | undefined;
  /** The mode of routes without config.vetassist; default 'session'. */
  defaultMode?: VetAssistMode;
  /** The body of a 401; default { error: 'unauthorized', reason }. */
  unauthorized?(request: FastifyRequest, reply: FastifyReply, reason: string): unknown;
}

export interface VetAssistRequestContext {
  /** The request's vetassist_app calls, in its transaction. */
  request: AppRequest;
  /** authenticate()'s result (ACTIVE); null on 'anonymous' routes. */
  auth: AuthResult | null;
}

declare module 'fastify' {
  interface FastifyRequest {
    /** Set on every route whose mode is not 'off'. */
    vetassist: VetAssistRequestContext | null;
  }
  interface FastifyContextConfig {
    vetassist?: VetAssistMode;
  }
}

export declare const vetassistPlugin: FastifyPluginAsync<VetAssistPluginOptions>;
export default vetassistPlugin;
