// enqueue() and results() against the real RabbitMQ and a real Rust worker
// (local executor) that clients/with-fleet.sh starts on a prefix of its own.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import amqp from 'amqplib';
import { Fleet, newTask, EnqueueError, CancelError } from '../dist/index.js';

const url = process.env.SANDFLEET_AMQP_URL;
const prefix = process.env.SANDFLEET_PREFIX;
const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
const python = process.env.SANDFLEET_PYTHON ?? path.join(repo, 'target/clients/venv/bin/python');

let fleet;
before(async () => {
  assert.ok(url && prefix, 'run through clients/with-fleet.sh (npm test does)');
  fleet = await Fleet.connect({ url, prefix });
});
after(async () => {
  await fleet?.close();
});

function echoTask(text, labels = {}) {
  return newTask({
    source: { provider: 'api', repository: 'acme/clients', commit: 'a'.repeat(40) },
    sandbox: { image: 'alpine:3.20', deadline_secs: 60 },
    steps: [{ name: 'say', run: `echo "${text}"`, timeout_secs: 30 }],
    labels,
  });
}

/** The final result of `taskId`, read from `sub` within a bounded time; closes `sub`. */
async function finalResult(sub, taskId, ms = 60_000) {
  const deadline = setTimeout(() => sub.close(), ms);
  try {
    for await (const { result } of sub) {
      if (result.task_id === taskId && result.final) return result;
    }
  } finally {
    clearTimeout(deadline);
    await sub.close();
  }
  throw new Error(`no final result for ${taskId} within ${ms} ms`);
}

test('a task carries the Rust producer properties and headers, confirmed', async () => {
  // A queue of our own on the task exchange sees exactly what the worker's queue gets.
  const conn = await amqp.connect(url);
  const ch = await conn.createChannel();
  const { queue } = await ch.assertQueue('', { exclusive: true });
  await ch.bindQueue(queue, `${prefix}.tasks`, 'task');
  try {
    const task = echoTask('props');
    const traceparent = '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01';
    assert.equal(await fleet.enqueue(task, { traceparent }), task.id);
    let msg = false;
    for (const deadline = Date.now() + 10_000; !msg && Date.now() < deadline; ) {
      msg = await ch.get(queue, { noAck: true });
      if (!msg) await new Promise((r) => setTimeout(r, 50));
    }
    assert.ok(msg, 'the task reached the queue');
    const p = msg.properties;
    assert.equal(p.messageId, task.id);
    assert.equal(p.type, 'sandfleet.task.v1');
    assert.equal(p.contentType, 'application/json');
    assert.equal(p.correlationId, task.id);
    assert.equal(p.deliveryMode, 2);
    assert.ok(Math.abs(p.timestamp - Date.now() / 1000) < 60);
    assert.equal(p.headers['x-sandfleet-attempt'], 1);
    assert.equal(p.headers['x-idempotency-key'], task.idempotency_key);
    assert.equal(p.headers.traceparent, traceparent);
    assert.deepEqual(JSON.parse(msg.content.toString()), task);
  } finally {
    await conn.close();
  }
});

test('an enqueued task is run by the worker and its result read back from a timestamp', async () => {
  const since = new Date();
  const task = echoTask('hello from typescript');
  await fleet.enqueue(task);
  const sub = await fleet.subscribe({ from: since });
  const result = await finalResult(sub, task.id);
  assert.equal(result.outcome, 'succeeded');
  assert.equal(result.attempt, 1);
  assert.match(result.log_tail, /hello from typescript/);
  assert.equal(result.task.id, task.id);
  assert.equal(result.task.steps[0].run, task.steps[0].run);
});

test('results are deduplicated by (task_id, attempt) from the first offset', async () => {
  const task = echoTask('dedup');
  const sub = await fleet.subscribe({ from: 'next' });
  await fleet.enqueue(task);
  const result = await finalResult(sub, task.id);
  await sub.close();
  // Deliver the same result again (at-least-once), then a marker to stop at.
  const conn = await amqp.connect(url);
  const ch = await conn.createConfirmChannel();
  const marker = { ...result, task_id: echoTask('marker').id };
  for (const r of [result, result, marker]) {
    ch.publish(`${prefix}.results`, 'succeeded.final', Buffer.from(JSON.stringify(r)), { type: 'sandfleet.result.v1' });
  }
  await ch.waitForConfirms();
  await conn.close();
  let seen = 0;
  const all = await fleet.subscribe({ from: 'first' });
  await finalResult(
    {
      close: () => all.close(),
      async *[Symbol.asyncIterator]() {
        for await (const r of all) {
          if (r.result.task_id === task.id) seen++;
          yield r;
        }
      },
    },
    marker.task_id,
  );
  await all.close();
  assert.equal(seen, 1, 'one delivery per (task_id, attempt)');
});

test("'next' skips what was published before subscribing; 'last' starts at the newest chunk", async () => {
  const before = echoTask('before');
  await fleet.enqueue(before);
  const first = await fleet.subscribe({ from: since(-5_000) });
  await finalResult(first, before.id);
  await first.close();

  const next = await fleet.subscribe({ from: 'next' });
  const after = echoTask('after');
  await fleet.enqueue(after);
  const got = [];
  const deadline = setTimeout(() => next.close(), 60_000);
  for await (const { result } of next) {
    got.push(result.task_id);
    if (result.task_id === after.id && result.final) break;
  }
  clearTimeout(deadline);
  await next.close();
  assert.ok(got.includes(after.id));
  assert.ok(!got.includes(before.id), 'an earlier result came through next');

  // The newest result is in the last chunk, without anything new being published.
  const last = await fleet.subscribe({ from: 'last' });
  await finalResult(last, after.id, 10_000);
  await last.close();
});

function since(ms) {
  return new Date(Date.now() + ms);
}

test('a task no queue is bound for is an error, not a silent success', async () => {
  const lonely = await Fleet.connect({ url, prefix: `${prefix}-unbound` });
  const conn = await amqp.connect(url);
  const ch = await conn.createChannel();
  await ch.assertExchange(`${prefix}-unbound.tasks`, 'direct', { autoDelete: true });
  try {
    await assert.rejects(lonely.enqueue(echoTask('nowhere')), (e) => e instanceof EnqueueError && /returned/.test(e.message));
  } finally {
    await ch.deleteExchange(`${prefix}-unbound.tasks`).catch(() => {});
    await conn.close();
    await lonely.close();
  }
});

test('a task enqueued from Python is run by the worker and read back here', async () => {
  assert.ok(existsSync(python), `the Python client's venv is missing at ${python} (scripts/test.sh clients creates it)`);
  const since = new Date();
  const script = `
import asyncio, os
from sandfleet_client import Fleet, new_task

async def main():
    async with Fleet(os.environ["SANDFLEET_AMQP_URL"], prefix=os.environ["SANDFLEET_PREFIX"]) as fleet:
        task = new_task(
            source={"provider": "api", "repository": "acme/clients", "commit": "b" * 40},
            sandbox={"image": "alpine:3.20", "deadline_secs": 60},
            steps=[{"name": "say", "run": "echo hello from python", "timeout_secs": 30}],
        )
        print(await fleet.enqueue(task))

asyncio.run(main())
`;
  const { stdout } = await promisify(execFile)(python, ['-c', script], { timeout: 60_000 });
  const id = stdout.trim();
  assert.match(id, /^[0-9a-f-]{36}$/);
  const result = await finalResult(await fleet.subscribe({ from: since }), id);
  assert.equal(result.outcome, 'succeeded');
  assert.match(result.log_tail, /hello from python/);
});

/** Closes, through the management API, every connection the client named `name`; waits until the API lists one. */
async function closeConnections(name, ms = 30_000) {
  const auth = { authorization: `Basic ${Buffer.from('guest:guest').toString('base64')}` };
  const deadline = Date.now() + ms;
  for (;;) {
    const res = await fetch('http://127.0.0.1:15672/api/connections', { headers: auth });
    const names = (await res.json()).filter((c) => c.client_properties?.connection_name === name).map((c) => c.name);
    if (names.length) {
      for (const n of names) {
        const del = await fetch(`http://127.0.0.1:15672/api/connections/${encodeURIComponent(n)}`, { method: 'DELETE', headers: auth });
        assert.ok(del.ok, `closing ${n}: ${del.status}`);
      }
      return names.length;
    }
    assert.ok(Date.now() < deadline, `the management API lists no connection ${name}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

test('after the broker closes its connections, results resume after the last offset and enqueue reconnects', async () => {
  const name = `sandfleet-client-ts-test-${Math.random().toString(16).slice(2, 10)}`;
  const own = await Fleet.connect({ url, prefix, connectionName: name });
  const sub = await own.subscribe({ from: 'next' });
  try {
    const first = echoTask('before the cut');
    const second = echoTask('after the cut');
    await own.enqueue(first);
    await finalResult({ close: () => {}, [Symbol.asyncIterator]: () => sub[Symbol.asyncIterator]() }, first.id);
    // The subscription's own connection, then the publisher's.
    assert.equal(await closeConnections(`${name}-results`), 1);
    assert.equal(await closeConnections(name), 1);
    for (const deadline = Date.now() + 30_000; own.isConnected; ) {
      assert.ok(Date.now() < deadline, 'the cut went unnoticed');
      await new Promise((r) => setTimeout(r, 50));
    }
    await own.enqueue(second);
    const seen = [];
    const timer = setTimeout(() => sub.close(), 60_000);
    for await (const { result } of sub) {
      seen.push(result.task_id);
      if (result.task_id === second.id && result.final) break;
    }
    clearTimeout(timer);
    assert.ok(seen.includes(second.id), 'the subscription did not read on after the cut');
    assert.ok(!seen.includes(first.id), 'the resumed subscription started over');
  } finally {
    await sub.close();
    await own.close();
  }
});

test('cancel ends a long task with one cancelled result; a second cancel finds it finished', async () => {
  const since = new Date();
  const task = newTask({
    source: { provider: 'api', repository: 'acme/clients', commit: 'e'.repeat(40) },
    sandbox: { image: 'alpine:3.20', deadline_secs: 300 },
    steps: [{ name: 'long', run: 'echo started; sleep 240', timeout_secs: 280 }],
  });
  await fleet.enqueue(task);
  const status = await fleet.cancel(task.id, { by: 'client-test', reason: 'no longer needed' });
  assert.equal(status.status, 'recorded');
  const result = await finalResult(await fleet.subscribe({ from: since }), task.id, 90_000);
  assert.equal(result.outcome, 'cancelled');
  assert.equal(result.cancellation?.by, 'client-test');
  assert.equal(result.cancellation?.reason, 'no longer needed');
  assert.deepEqual(await fleet.cancel(task.id), { status: 'already_finished', outcome: 'cancelled' });
  await assert.rejects(fleet.cancel('not-a-task-id'), CancelError);
  await assert.rejects(fleet.cancel('0193a6d2-5b1e-4c40-9a2f-3e4d5c6b7a01'), CancelError);
});

test('a task the broker nacks (a full task queue) is an error, not a silent success', async () => {
  const full = `${prefix}-full`;
  const conn = await amqp.connect(url);
  const ch = await conn.createChannel();
  await ch.assertExchange(`${full}.tasks`, 'direct', { durable: false });
  await ch.assertQueue(`${full}.tasks`, { durable: false, arguments: { 'x-max-length': 1, 'x-overflow': 'reject-publish' } });
  await ch.bindQueue(`${full}.tasks`, `${full}.tasks`, 'task');
  const producer = await Fleet.connect({ url, prefix: full });
  try {
    await producer.enqueue(echoTask('fits'));
    await assert.rejects(producer.enqueue(echoTask('does not fit')), (e) => e instanceof EnqueueError && /not confirmed/.test(e.message));
  } finally {
    await producer.close();
    await ch.deleteQueue(`${full}.tasks`).catch(() => {});
    await ch.deleteExchange(`${full}.tasks`).catch(() => {});
    await conn.close();
  }
});
