// Enqueue tasks and follow results over AMQP, with the same exchanges,
// properties and headers as the Rust producer (docs/topology.md).
import { randomBytes, randomUUID } from 'node:crypto';
import amqp from 'amqplib';
import type { Channel, ChannelModel, ConfirmChannel, ConsumeMessage, Options } from 'amqplib';
import type { Task } from './generated/task.js';
import type { TaskResult } from './generated/result.js';

/** The `type` property of task messages. */
export const TASK_MESSAGE_TYPE = 'sandfleet.task.v1';
/** The `type` property of result messages. */
export const RESULT_MESSAGE_TYPE = 'sandfleet.result.v1';
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
  readonly #conn: ChannelModel;
  readonly #confirm: ConfirmChannel;
  /** Message ids the broker returned as unroutable (basic.return comes before the ack). */
  readonly #returned = new Set<string>();

  private constructor(conn: ChannelModel, confirm: ConfirmChannel, prefix: string) {
    this.#conn = conn;
    this.#confirm = confirm;
    this.prefix = prefix;
    confirm.on('return', (msg: ConsumeMessage) => {
      const id = msg.properties.messageId as string | undefined;
      if (id) this.#returned.add(id);
    });
    // Errors also reject the pending publishes; without a listener they would crash the process.
    conn.on('error', () => {});
    confirm.on('error', () => {});
  }

  static async connect(opts: FleetOptions = {}): Promise<Fleet> {
    const url = opts.url ?? 'amqp://guest:guest@127.0.0.1:5672/%2f';
    const conn = await amqp.connect(url, {
      clientProperties: { connection_name: opts.connectionName ?? 'sandfleet-client-ts' },
    });
    try {
      const confirm = await conn.createConfirmChannel();
      return new Fleet(conn, confirm, opts.prefix ?? 'sandfleet');
    } catch (e) {
      await conn.close().catch(() => {});
      throw e;
    }
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
    const body = Buffer.from(JSON.stringify(task));
    await new Promise<void>((resolve, reject) => {
      this.#confirm.publish(this.tasksExchange, TASK_ROUTING_KEY, body, props, (err: unknown) => {
        const returned = this.#returned.delete(task.id);
        if (err) reject(new EnqueueError(`task ${task.id} not confirmed: ${String(err)}`));
        else if (returned) reject(new EnqueueError(`task ${task.id} was returned: no queue is bound to ${this.tasksExchange}`));
        else resolve();
      });
    });
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

  /** Starts a results consumer now; iterate it with `for await`, end it with `close()`. */
  async subscribe(opts: ResultsOptions = {}): Promise<Subscription> {
    const channel = await this.#conn.createChannel();
    try {
      return await Subscription.start(channel, this.resultsStream, opts);
    } catch (e) {
      await channel.close().catch(() => {});
      throw e;
    }
  }

  async close(): Promise<void> {
    await this.#confirm.close().catch(() => {});
    await this.#conn.close().catch(() => {});
  }
}

/** A live results consumer: an async iterable of deduplicated results. */
export class Subscription implements AsyncIterable<Received> {
  readonly #channel: Channel;
  readonly #consumerTag: string;
  readonly #queue: ConsumeMessage[] = [];
  readonly #dedup: Dedup;
  readonly #notBeforeMs: number | undefined;
  readonly #signal: AbortSignal | undefined;
  #wake: (() => void) | undefined;
  #ended: Error | 'done' | undefined;
  #closed = false;

  private constructor(channel: Channel, consumerTag: string, opts: ResultsOptions, notBeforeMs: number | undefined) {
    this.#channel = channel;
    this.#consumerTag = consumerTag;
    this.#dedup = new Dedup(opts.dedupCapacity ?? 100_000);
    this.#notBeforeMs = notBeforeMs;
    this.#signal = opts.signal;
  }

  static async start(channel: Channel, stream: string, opts: ResultsOptions): Promise<Subscription> {
    const from = opts.from ?? 'next';
    // The broker seeks timestamps by whole seconds and chunks: start a second
    // early and drop what was published before the asked time.
    let offset: unknown = from;
    let notBeforeMs: number | undefined;
    if (from instanceof Date) {
      notBeforeMs = from.getTime();
      offset = { '!': 'timestamp', value: Math.max(0, Math.floor(notBeforeMs / 1000) - 1) };
    }
    channel.on('error', () => {});
    await channel.prefetch(opts.prefetch ?? 500);
    const consumerTag = `sandfleet-client-ts-${randomUUID()}`;
    const sub = new Subscription(channel, consumerTag, opts, notBeforeMs);
    channel.on('close', () => sub.#end(new Error('the results channel closed')));
    opts.signal?.addEventListener('abort', () => sub.#end('done'), { once: true });
    await channel.consume(
      stream,
      (msg) => {
        if (msg === null) sub.#end(new Error('the results consumer was cancelled by the broker'));
        else {
          sub.#queue.push(msg);
          sub.#notify();
        }
      },
      { noAck: false, arguments: { 'x-stream-offset': offset }, consumerTag },
    );
    return sub;
  }

  #notify(): void {
    this.#wake?.();
    this.#wake = undefined;
  }

  #end(why: Error | 'done'): void {
    this.#ended ??= why;
    this.#notify();
  }

  /** The next result, or `undefined` once closed or aborted. */
  async next(): Promise<Received | undefined> {
    for (;;) {
      if (this.#ended === 'done') return undefined;
      const msg = this.#queue.shift();
      if (msg === undefined) {
        if (this.#ended) throw this.#ended;
        await new Promise<void>((r) => (this.#wake = r));
        continue;
      }
      // Stream acks only grant credit.
      this.#channel.ack(msg);
      const headers = msg.properties.headers ?? {};
      const publishedMs = numberOf(headers[HEADER_PUBLISHED_AT_MS]) ?? secondsToMs(msg.properties.timestamp);
      if (this.#notBeforeMs !== undefined && publishedMs !== undefined && publishedMs < this.#notBeforeMs) continue;
      const result = JSON.parse(msg.content.toString('utf8')) as TaskResult;
      if (!this.#dedup.firstTime(result)) continue;
      const offset = numberOf(headers['x-stream-offset']);
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

  /** Cancels the consumer. Idempotent. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#end('done');
    await this.#channel.cancel(this.#consumerTag).catch(() => {});
    await this.#channel.close().catch(() => {});
  }
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
