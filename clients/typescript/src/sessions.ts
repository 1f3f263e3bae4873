// A client of the sessions service's HTTP API (docs/sessions.md).

export interface SessionsOptions {
  /** Base URL of `sandfleet sessions`. Default: `$SANDFLEET_SESSIONS_URL`. */
  url?: string;
  /** Bearer token. Default: `$SANDFLEET_SESSIONS_TOKEN`. */
  token?: string;
}

export interface SandboxOptions extends SessionsOptions {
  /** Container image of the session pod. */
  image: string;
  /** Environment of every command. */
  env?: Record<string, string>;
  /** Working dir relative to the workspace (created). */
  workingDir?: string;
  /** Seconds without a command before the session ends by itself. */
  idleTimeout?: number;
  /** Seconds the session may live at most. */
  maxLifetime?: number;
  /** Kubernetes-style quantities: `{cpu_limit: "2", memory_limit: "1Gi"}`. */
  resources?: Record<string, string>;
}

export interface RunOptions {
  /** Milliseconds before the command and its process tree are killed. Default 60000; whole seconds, rounded up. */
  timeout?: number;
  /** Bytes kept of each stream (capped by the service). */
  maxOutputBytes?: number;
}

export interface CommandResult {
  stdout: string;
  stderr: string;
  exitCode: number;
  /** The command ran past its timeout and was killed (with its children). */
  timedOut: boolean;
  /** Raw bytes of stdout and stderr (the strings are their UTF-8 decoding). */
  stdoutBytes: Buffer;
  stderrBytes: Buffer;
  stdoutTruncated: boolean;
  stderrTruncated: boolean;
}

export interface SessionInfo {
  id: string;
  image: string;
  working_dir: string;
  idle_timeout_secs: number;
  created: string | null;
  ended: boolean;
}

/** An error answered by the service: `code` is its stable code (`not_found`, `timeout_limit`, `connection_lost`, ...). */
export class SessionsError extends Error {
  override name = 'SessionsError';
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
  ) {
    super(`${code} (${status}): ${message}`);
  }
}

/** The sessions HTTP API, for listing sessions and as the transport of [Sandbox]. */
export class SessionsClient {
  readonly url: string;
  readonly #token: string;

  constructor(opts: SessionsOptions = {}) {
    const url = opts.url ?? process.env.SANDFLEET_SESSIONS_URL;
    const token = opts.token ?? process.env.SANDFLEET_SESSIONS_TOKEN;
    if (!url) throw new Error('sessions URL: pass `url` or set SANDFLEET_SESSIONS_URL');
    if (!token) throw new Error('sessions token: pass `token` or set SANDFLEET_SESSIONS_TOKEN');
    this.url = url.replace(/\/+$/, '');
    this.#token = token;
  }

  async request(method: string, path: string, body?: string | Buffer, contentType?: string): Promise<Response> {
    const headers: Record<string, string> = { authorization: `Bearer ${this.#token}` };
    if (contentType) headers['content-type'] = contentType;
    const res = await fetch(`${this.url}${path}`, { method, headers, ...(body !== undefined ? { body } : {}) });
    if (!res.ok) {
      const text = await res.text();
      let code = 'http_error';
      let message = text;
      try {
        const parsed = JSON.parse(text) as { error?: { code?: string; message?: string } };
        code = parsed.error?.code ?? code;
        message = parsed.error?.message ?? message;
      } catch {
        // Not a JSON error body (a proxy's page): keep the text.
      }
      throw new SessionsError(res.status, code, message);
    }
    return res;
  }

  async json<T>(method: string, path: string, body?: unknown): Promise<T> {
    const res = await this.request(method, path, body === undefined ? undefined : JSON.stringify(body), 'application/json');
    return (await res.json()) as T;
  }

  /** This token's sessions. */
  list(): Promise<SessionInfo[]> {
    return this.json('GET', '/v1/sessions');
  }
}

interface WireOutput {
  exit_code: number;
  timed_out: boolean;
  stdout: string;
  stderr: string;
  stdout_truncated: boolean;
  stderr_truncated: boolean;
}

/**
 * One sandbox session: `await sb.init()`, then `runCommand`, `writeFile`,
 * `readFile`, and `await sb.teardown()` (idempotent; an abandoned session
 * still ends by itself after its idle timeout).
 */
export class Sandbox {
  readonly client: SessionsClient;
  readonly #opts: SandboxOptions;
  #id: string | undefined;

  constructor(opts: SandboxOptions) {
    this.#opts = opts;
    this.client = new SessionsClient(opts);
  }

  /** The session id, once `init()` resolved. */
  get id(): string | undefined {
    return this.#id;
  }

  /** Creates the session; resolves once commands can run. */
  async init(): Promise<this> {
    if (this.#id) return this;
    const o = this.#opts;
    const spec: Record<string, unknown> = { image: o.image };
    if (o.env) spec.env = o.env;
    if (o.workingDir !== undefined) spec.working_dir = o.workingDir;
    if (o.idleTimeout !== undefined) spec.idle_timeout = o.idleTimeout;
    if (o.maxLifetime !== undefined) spec.max_lifetime = o.maxLifetime;
    if (o.resources) spec.resources = o.resources;
    const info = await this.client.json<SessionInfo>('POST', '/v1/sessions', spec);
    this.#id = info.id;
    return this;
  }

  #path(suffix = ''): string {
    if (!this.#id) throw new Error('the sandbox is not initialised: await init() first');
    return `/v1/sessions/${encodeURIComponent(this.#id)}${suffix}`;
  }

  /** Runs `command` with `/bin/sh -c`. A non-zero exit is data (`exitCode`), not an error. */
  async runCommand(command: string, opts: RunOptions = {}): Promise<CommandResult> {
    const timeoutSecs = Math.max(1, Math.ceil((opts.timeout ?? 60_000) / 1000));
    const body: Record<string, unknown> = { command, timeout_secs: timeoutSecs };
    if (opts.maxOutputBytes !== undefined) body.max_output_bytes = opts.maxOutputBytes;
    const out = await this.client.json<WireOutput>('POST', this.#path('/run'), body);
    const stdoutBytes = Buffer.from(out.stdout, 'base64');
    const stderrBytes = Buffer.from(out.stderr, 'base64');
    return {
      stdout: stdoutBytes.toString('utf8'),
      stderr: stderrBytes.toString('utf8'),
      exitCode: out.exit_code,
      timedOut: out.timed_out,
      stdoutBytes,
      stderrBytes,
      stdoutTruncated: out.stdout_truncated,
      stderrTruncated: out.stderr_truncated,
    };
  }

  /** Writes a file (binary-safe; parents created). `mode` is octal text, default `644`. */
  async writeFile(path: string, content: string | Uint8Array, opts: { mode?: string } = {}): Promise<void> {
    const q = new URLSearchParams({ path, mode: opts.mode ?? '644' });
    await this.client.request('PUT', this.#path(`/files?${q}`), typeof content === 'string' ? content : Buffer.from(content), 'application/octet-stream');
  }

  /** Reads a file's bytes; rejects with `SessionsError` (422, code `file`) when it does not exist. */
  async readFile(path: string, opts: { maxBytes?: number } = {}): Promise<Buffer> {
    const q = new URLSearchParams({ path });
    if (opts.maxBytes !== undefined) q.set('max_bytes', String(opts.maxBytes));
    const res = await this.client.request('GET', this.#path(`/files?${q}`));
    return Buffer.from(await res.arrayBuffer());
  }

  /** Ends the session. Idempotent. */
  async teardown(): Promise<void> {
    if (!this.#id) return;
    try {
      await this.client.request('DELETE', this.#path());
    } catch (e) {
      if (!(e instanceof SessionsError && e.status === 404)) throw e;
    }
    this.#id = undefined;
  }
}
