// Enqueue tasks and follow results over AMQP, with the same exchanges,
// properties and headers as the Rust producer (docs/topology.md).
import { randomBytes, randomUUID } from 'node:crypto';
import amqp from 'amqplib';
import type { Channel, ChannelModel, ConfirmChannel, ConsumeMessage, Options } from 'amqplib';
import type { Task } from './generated/task.js';
import type { TaskResult } from './generated/result.js';
import type { Cancellation } from './generated/cancellation.js';

/** The `type` property of task messages. */
export const TASK_MESSAGE_TYPE = 'sandfleet.task.v1';
/** The `type` property of result messages. */
export const RESULT_MESSAGE_TYPE = 'sandfleet.result.v1';
/** The `type` property of cancellation messages. */
export const CANCELLATION_MESSAGE_TYPE = 'sandfleet.cancellation.v1';
/** Longest `by` or `reason` of a cancellation, in bytes. */
const MAX_CANCEL_TEXT = 512;
/** How long the finished-check of `cancel` reads on after the last result it saw, and at most. */
const LOOKUP_QUIET_MS = 300;
const LOOKUP_BUDGET_MS = 5_000;
/** The contract version this package speaks (`schema_version`). */
export const SCHEMA_VERSION = 1;
const CONTENT_TYPE = 'application/json';
const TASK_ROUTING_KEY = 'task';
const HEADER_ATTEMPT = 'x-sandfleet-attempt';
const HEADER_IDEMPOTENCY_KEY = 'x-idempotency-key';
const HEADER_TRACEPARENT = 'traceparent';
const HEADER_PUBLISHED_AT_MS = 'x-sandfleet-published-at-ms';

export interface FleetOptions {
  /** RabbitMQ URL. Default `amqp://guest:guest@127.0.0.1:5672/%2f`. */
  url?: string;
  /** `topology.prefix` of the fleet. Default `sandfleet`. */
  prefix?: string;
  /** Connection name shown in the management UI. */
  connectionName?: string;
}

export interface EnqueueOptions {
  /** W3C trace context, carried to the Job and the result. */
  traceparent?: string;
}

/** Where a results subscription starts (`x-stream-offset`). */
export type StartAt = 'first' | 'last' | 'next' | Date;

export interface ResultsOptions {
  /** Default `'next'`: only results published after subscribing. */
  from?: StartAt;
  /** Stream credit. Default 500. */
  prefetch?: number;
  /** How many `(task_id, attempt)` keys are remembered to drop repeats. Default 100000. */
  dedupCapacity?: number;
  /** Ends the iteration (the consumer is cancelled). */
  signal?: AbortSignal;
}

/** A result read from the stream. */
export interface Received {
  result: TaskResult;
  /** Its stream offset. */
  offset?: number;
  /** When it was published (millisecond header, else the AMQP timestamp). */
  publishedAt?: Date;
  traceparent?: string;
}

export interface CancelOptions {
  /** Who asks (a user, a token's name). Default `sandfleet-client-ts`. */
  by?: string;
  /** Why, for humans. */
  reason?: string;
}

/** What `cancel` did. */
export type CancelStatus =
  /** The cancel is recorded (confirmed): the task ends with a `cancelled` result unless it finishes first. */
  | { status: 'recorded'; cancelId: string }
  /** The task already had a final result; nothing was recorded. */
  | { status: 'already_finished'; outcome: TaskResult['outcome'] };

/** A cancel that was refused before anything was published (an id that cannot be a task, a text too long). */
export class CancelError extends Error {
  override name = 'CancelError';
}

/** The broker returned or refused a task: it was not enqueued. */
export class EnqueueError extends Error {
  override name = 'EnqueueError';
}

/** A UUIDv7 (time-ordered), the id format of sandfleet tasks. */
export function uuidv7(now: number = Date.now()): string {
  const b = randomBytes(16);
  b.writeUIntBE(now, 0, 6);
  b[6] = ((b[6] ?? 0) & 0x0f) | 0x70;
  b[8] = ((b[8] ?? 0) & 0x3f) | 0x80;
  const h = b.toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** The fields of a task a caller must choose; the rest get their defaults. */
export type NewTask = Omit<Task, 'schema_version' | 'id' | 'created_at' | 'kind' | 'idempotency_key'> &
  Partial<Pick<Task, 'id' | 'created_at' | 'idempotency_key'>>;

/** A complete v1 task: a fresh UUIDv7 id, `created_at` now, `kind: fix_attempt`. */
export function newTask(fields: NewTask): Task {
  const id = fields.id ?? uuidv7();
  return {
    ...fields,
    schema_version: 1,
    id,
    kind: 'fix_attempt',
    created_at: fields.created_at ?? new Date().toISOString(),
    idempotency_key: fields.idempotency_key ?? `api:${id}`,
  };
}

/**
 * A connection to a sandfleet fleet's broker. `await Fleet.connect()`, then
 * `enqueue`, `results`, and `close` at the end.
 */
export class Fleet {
  readonly prefix: string;
  readonly #url: string;
  readonly #connectionName: string;
  #conn: ChannelModel;
  #confirm: ConfirmChannel;
  #connected = true;
  #closed = false;
  /** Message ids the broker returned as unroutable (basic.return comes before the ack). */
  readonly #returned = new Set<string>();

  private constructor(url: string, connectionName: string, prefix: string, link: Link) {
    this.#url = url;
    this.#connectionName = connectionName;
    this.prefix = prefix;
    this.#conn = link.conn;
    this.#confirm = link.confirm;
    this.#watch(link.confirm);
  }

  static async connect(opts: FleetOptions = {}): Promise<Fleet> {
    const url = opts.url ?? 'amqp://guest:guest@127.0.0.1:5672/%2f';
    const name = opts.connectionName ?? 'sandfleet-client-ts';
    return new Fleet(url, name, opts.prefix ?? 'sandfleet', await openLink(url, name));
  }

  /** Publishes with a confirm; a returned message (no queue bound) is an error too. */
  async #publish(exchange: string, routingKey: string, body: Buffer, props: Options.Publish): Promise<void> {
    if (this.#closed) throw new Error('the fleet connection is closed');
    // A connection lost since the last publish is replaced: this publish gets
    // a fresh one. (One lost while waiting for the confirm is an error.)
    if (!this.#connected) {
      await this.#conn.close().catch(() => {});
      const link = await openLink(this.#url, this.#connectionName);
      this.#conn = link.conn;
      this.#confirm = link.confirm;
      this.#connected = true;
      this.#watch(link.confirm);
    }
    const id = props.messageId ?? '';
    await new Promise<void>((resolve, reject) => {
      this.#confirm.publish(exchange, routingKey, body, props, (err: unknown) => {
        const returned = this.#returned.delete(id);
        if (err) reject(new Error(`not confirmed: ${String(err)}`));
        else if (returned) reject(new Error(`returned: no queue is bound to ${exchange}`));
        else resolve();
      });
    });
  }

  #watch(confirm: ConfirmChannel): void {
    confirm.on('return', (msg: ConsumeMessage) => {
      const id = msg.properties.messageId as string | undefined;
      if (id) this.#returned.add(id);
    });
    confirm.on('close', () => {
      if (confirm === this.#confirm) this.#connected = false;
    });
  }

  /** True while the publishing connection is open; `enqueue` replaces a lost one. */
  get isConnected(): boolean {
    return this.#connected;
  }

  get tasksExchange(): string {
    return `${this.prefix}.tasks`;
  }
  get resultsStream(): string {
    return `${this.prefix}.results.stream`;
  }

  /**
   * Publishes a task (mandatory, persistent) and resolves once the broker
   * confirmed it; rejects when it was returned (no queue bound), nacked (a
   * full task queue) or the connection was lost first.
   */
  async enqueue(task: Task, opts: EnqueueOptions = {}): Promise<string> {
    if (task.schema_version !== SCHEMA_VERSION) {
      throw new EnqueueError(`schema_version ${String(task.schema_version)}: this client speaks ${SCHEMA_VERSION}`);
    }
    const headers: Record<string, unknown> = {
      [HEADER_ATTEMPT]: { '!': 'long', value: 1 },
      [HEADER_IDEMPOTENCY_KEY]: task.idempotency_key,
    };
    if (opts.traceparent) headers[HEADER_TRACEPARENT] = opts.traceparent;
    const props: Options.Publish = {
      messageId: task.id,
      type: TASK_MESSAGE_TYPE,
      contentType: CONTENT_TYPE,
      correlationId: task.replay_of ?? task.id,
      timestamp: Math.floor(Date.now() / 1000),
      persistent: true,
      mandatory: true,
      headers,
    };
    try {
      await this.#publish(this.tasksExchange, TASK_ROUTING_KEY, Buffer.from(JSON.stringify(task)), props);
    } catch (e) {
      throw new EnqueueError(`task ${task.id}: ${e instanceof Error ? e.message : String(e)}`);
    }
    return task.id;
  }

  /**
   * Results from the stream, deduplicated by `(task_id, attempt)`:
   * `for await (const { result } of fleet.results({ from: 'first' })) ...`.
   * The consumer starts at the first iteration; use `subscribe` to start it
   * before publishing (with `from: 'next'`). Leaving the loop cancels it.
   */
  async *results(opts: ResultsOptions = {}): AsyncGenerator<Received, void, undefined> {
    const sub = await this.subscribe(opts);
    try {
      yield* sub;
    } finally {
      await sub.close();
    }
  }

  /**
   * Starts a results consumer now, on a connection of its own; iterate it
   * with `for await`, end it with `close()`. A lost connection is replaced and
   * the consumer resumes after the last offset it delivered.
   */
  subscribe(opts: ResultsOptions = {}): Promise<Subscription> {
    return Subscription.start(this.#url, `${this.#connectionName}-results`, this.resultsStream, opts);
  }

  /**
   * Cancels one task, as `Producer::cancel` does: unless the results stream
   * already holds the task's final result, records a cancellation (confirmed)
   * on `<prefix>.cancellations`, which every worker reads. The finished check
   * reads the stream from the task's creation time (its UUIDv7 timestamp)
   * until it is quiet: a final result published meanwhile may be missed,
   * which is harmless — the worker holding the task decides.
   */
  async cancel(taskId: string, opts: CancelOptions = {}): Promise<CancelStatus> {
    const created = createdAt(taskId);
    const by = opts.by ?? 'sandfleet-client-ts';
    const reason = opts.reason ?? '';
    for (const [field, text] of [['by', by], ['reason', reason]] as const) {
      const len = Buffer.byteLength(text);
      if (len > MAX_CANCEL_TEXT) throw new CancelError(`${field} is ${len} bytes, over ${MAX_CANCEL_TEXT}`);
    }
    const outcome = await this.#finalOutcome(taskId, created);
    if (outcome !== undefined) return { status: 'already_finished', outcome };
    const cancel: Cancellation = {
      schema_version: 1,
      id: uuidv7(),
      target: { kind: 'task', task_id: taskId },
      by,
      reason,
      requested_at: new Date().toISOString(),
    };
    await this.#publish(`${this.prefix}.cancellations`, '', Buffer.from(JSON.stringify(cancel)), {
      messageId: cancel.id,
      type: CANCELLATION_MESSAGE_TYPE,
      contentType: CONTENT_TYPE,
      timestamp: Math.floor(Date.now() / 1000),
      persistent: true,
      mandatory: true,
    });
    return { status: 'recorded', cancelId: cancel.id };
  }

  async #finalOutcome(taskId: string, created: Date): Promise<TaskResult['outcome'] | undefined> {
    const sub = await Subscription.start(this.#url, `${this.#connectionName}-cancel-lookup`, this.resultsStream, {
      from: new Date(created.getTime() - 1_000),
    });
    const giveUp = Date.now() + LOOKUP_BUDGET_MS;
    try {
      for (;;) {
        let timer: NodeJS.Timeout | undefined;
        const quiet = new Promise<'quiet'>((r) => (timer = setTimeout(() => r('quiet'), Math.min(LOOKUP_QUIET_MS, giveUp - Date.now()))));
        const next = await Promise.race([sub.next(), quiet]);
        clearTimeout(timer);
        if (next === 'quiet' || next === undefined) return undefined;
        if (next.result.task_id === taskId && next.result.final) return next.result.outcome;
      }
    } finally {
      await sub.close();
    }
  }

  async close(): Promise<void> {
    this.#closed = true;
    await this.#confirm.close().catch(() => {});
    await this.#conn.close().catch(() => {});
  }
}

/** A live results consumer: an async iterable of deduplicated results. */
export class Subscription implements AsyncIterable<Received> {
  /** How long a lost connection is retried before `next()` rejects. */
  reconnectTimeoutMs = 60_000;
  readonly #url: string;
  readonly #connectionName: string;
  readonly #stream: string;
  readonly #prefetch: number;
  readonly #firstOffset: unknown;
  readonly #notBeforeMs: number | undefined;
  readonly #dedup: Dedup;
  readonly #queue: ConsumeMessage[] = [];
  #conn: ChannelModel | undefined;
  #channel: Channel | undefined;
  #lastOffset: number | undefined;
  #lost: Error | undefined;
  #closed = false;
  #wake: (() => void) | undefined;

  private constructor(url: string, connectionName: string, stream: string, opts: ResultsOptions) {
    this.#url = url;
    this.#connectionName = connectionName;
    this.#stream = stream;
    this.#prefetch = opts.prefetch ?? 500;
    this.#dedup = new Dedup(opts.dedupCapacity ?? 100_000);
    const from = opts.from ?? 'next';
    if (from instanceof Date) {
      // The broker seeks timestamps by whole seconds and chunks: start a
      // second early and drop what was published before the asked time.
      this.#notBeforeMs = from.getTime();
      this.#firstOffset = { '!': 'timestamp', value: Math.max(0, Math.floor(from.getTime() / 1000) - 1) };
    } else {
      this.#firstOffset = from;
    }
  }

  static async start(url: string, connectionName: string, stream: string, opts: ResultsOptions = {}): Promise<Subscription> {
    const sub = new Subscription(url, connectionName, stream, opts);
    opts.signal?.addEventListener('abort', () => void sub.close(), { once: true });
    try {
      await sub.#open();
    } catch (e) {
      await sub.close();
      throw e;
    }
    return sub;
  }

  async #open(): Promise<void> {
    const conn = await amqp.connect(this.#url, { clientProperties: { connection_name: this.#connectionName } });
    conn.on('error', () => {});
    this.#conn = conn;
    const channel = await conn.createChannel();
    channel.on('error', () => {});
    channel.on('close', () => {
      if (channel === this.#channel && !this.#closed) {
        this.#lost = new Error(`the results subscription to ${this.#stream} lost its connection`);
        this.#notify();
      }
    });
    this.#channel = channel;
    await channel.prefetch(this.#prefetch);
    const offset = this.#lastOffset === undefined ? this.#firstOffset : this.#lastOffset + 1;
    await channel.consume(
      this.#stream,
      (msg) => {
        if (msg === null) {
          // The broker cancelled the consumer (the stream was deleted).
          this.#lost = new Error(`the broker cancelled the consumer of ${this.#stream}`);
        } else if (channel === this.#channel) {
          this.#queue.push(msg);
        }
        this.#notify();
      },
      { noAck: false, arguments: { 'x-stream-offset': offset }, consumerTag: `sandfleet-client-ts-${randomUUID()}` },
    );
  }

  async #drop(): Promise<void> {
    const conn = this.#conn;
    this.#conn = undefined;
    this.#channel = undefined;
    await conn?.close().catch(() => {});
  }

  /** Reconnects with backoff until `reconnectTimeoutMs`, then rethrows. */
  async #reopen(): Promise<void> {
    const cause = this.#lost;
    this.#lost = undefined;
    await this.#drop();
    const deadline = Date.now() + this.reconnectTimeoutMs;
    for (let delay = 100; ; delay = Math.min(delay * 2, 2_000)) {
      if (this.#closed) return;
      try {
        await this.#open();
        return;
      } catch (e) {
        await this.#drop();
        if (Date.now() + delay > deadline) {
          throw new Error(`${cause?.message ?? 'the results subscription lost its connection'}; reconnecting failed: ${String(e)}`);
        }
        await new Promise((r) => setTimeout(r, delay));
      }
    }
  }

  #notify(): void {
    this.#wake?.();
    this.#wake = undefined;
  }

  /** The next result, or `undefined` once closed or aborted. */
  async next(): Promise<Received | undefined> {
    for (;;) {
      if (this.#closed) return undefined;
      const msg = this.#queue.shift();
      if (msg === undefined) {
        if (this.#lost) {
          await this.#reopen();
          continue;
        }
        await new Promise<void>((r) => (this.#wake = r));
        continue;
      }
      try {
        // Stream acks only grant credit; one on a lost channel costs nothing.
        this.#channel?.ack(msg);
      } catch {
        // The channel closed under us: the resumed consumer has its own credit.
      }
      const headers = msg.properties.headers ?? {};
      const offset = numberOf(headers['x-stream-offset']);
      if (offset !== undefined) {
        if (this.#lastOffset !== undefined && offset <= this.#lastOffset) continue;
        this.#lastOffset = offset;
      }
      const publishedMs = numberOf(headers[HEADER_PUBLISHED_AT_MS]) ?? secondsToMs(msg.properties.timestamp);
      if (this.#notBeforeMs !== undefined && publishedMs !== undefined && publishedMs < this.#notBeforeMs) continue;
      const result = JSON.parse(msg.content.toString('utf8')) as TaskResult;
      if (!this.#dedup.firstTime(result)) continue;
      const tp = headers[HEADER_TRACEPARENT];
      return {
        result,
        ...(offset !== undefined ? { offset } : {}),
        ...(publishedMs !== undefined ? { publishedAt: new Date(publishedMs) } : {}),
        ...(typeof tp === 'string' ? { traceparent: tp } : {}),
      };
    }
  }

  async *[Symbol.asyncIterator](): AsyncGenerator<Received, void, undefined> {
    for (;;) {
      const r = await this.next();
      if (r === undefined) return;
      yield r;
    }
  }

  /** Cancels the consumer and closes its connection. Idempotent. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#notify();
    await this.#drop();
  }
}

interface Link {
  conn: ChannelModel;
  confirm: ConfirmChannel;
}

async function openLink(url: string, connectionName: string): Promise<Link> {
  const conn = await amqp.connect(url, { clientProperties: { connection_name: connectionName } });
  // Errors also close the channels and reject pending publishes; without a
  // listener they would crash the process.
  conn.on('error', () => {});
  try {
    const confirm = await conn.createConfirmChannel();
    confirm.on('error', () => {});
    return { conn, confirm };
  } catch (e) {
    await conn.close().catch(() => {});
    throw e;
  }
}

/** The creation time of a task: the timestamp of its UUIDv7 id. */
function createdAt(taskId: string): Date {
  const hex = taskId.replace(/-/g, '');
  if (!/^[0-9a-f]{32}$/i.test(hex) || hex[12] !== '7') {
    throw new CancelError(`${taskId} is not a task id of this fleet (a UUIDv7)`);
  }
  const ms = parseInt(hex.slice(0, 12), 16);
  if (ms > Date.now() + 5 * 60_000) throw new CancelError(`${taskId}: its timestamp is in the future`);
  return new Date(ms);
}

/** Remembers recent `(task_id, attempt)` keys (results come at least once). */
export class Dedup {
  readonly #seen = new Set<string>();
  readonly #capacity: number;
  constructor(capacity: number) {
    this.#capacity = Math.max(1, capacity);
  }
  /** True the first time this result's `(task_id, attempt)` is seen. */
  firstTime(result: Pick<TaskResult, 'task_id' | 'attempt'>): boolean {
    const key = `${result.task_id}:${result.attempt}`;
    if (this.#seen.has(key)) return false;
    this.#seen.add(key);
    // A Set iterates in insertion order: the first key is the oldest.
    if (this.#seen.size > this.#capacity) {
      const oldest = this.#seen.values().next().value;
      if (oldest !== undefined) this.#seen.delete(oldest);
    }
    return true;
  }
}

function numberOf(v: unknown): number | undefined {
  if (typeof v === 'number') return v;
  if (typeof v === 'bigint') return Number(v);
  if (v && typeof v === 'object' && 'value' in v) return numberOf((v as { value: unknown }).value);
  return undefined;
}

function secondsToMs(s: unknown): number | undefined {
  const n = numberOf(s);
  return n === undefined ? undefined : n * 1000;
}
