// The session scenario of docs/sessions.md, through the TypeScript client
// against a real `sandfleet sessions` (clients/with-fleet.sh starts it).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { Sandbox, SessionsClient, SessionsError } from '../dist/index.js';

let sb;
before(async () => {
  sb = new Sandbox({ image: 'alpine:3.20', env: { GREETING: 'hello from env' }, workingDir: 'src', idleTimeout: 120 });
  await sb.init();
});
after(async () => {
  await sb?.teardown();
});

test('a written file is read by a command, stdout and stderr apart', async () => {
  await sb.writeFile('notes/plan.txt', 'step one\nstep two\n');
  const r = await sb.runCommand('cat notes/plan.txt; echo to-stderr >&2', { timeout: 10_000 });
  assert.equal(r.exitCode, 0);
  assert.equal(r.stdout, 'step one\nstep two\n');
  assert.equal(r.stderr, 'to-stderr\n');
  assert.equal(r.timedOut, false);
});

test('a binary file with all 256 byte values comes back exactly', async () => {
  const bytes = Buffer.from(Array.from({ length: 256 }, (_, i) => i));
  await sb.writeFile('blob.bin', bytes);
  assert.deepEqual(await sb.readFile('blob.bin'), bytes);
  const r = await sb.runCommand('wc -c < blob.bin');
  assert.equal(r.stdout.trim(), '256');
});

test('env and working dir are honoured', async () => {
  const r = await sb.runCommand('echo "$GREETING"; basename "$PWD"');
  assert.equal(r.stdout, 'hello from env\nsrc\n');
});

test('a failing command is an exit code, not an error', async () => {
  const r = await sb.runCommand('echo failing >&2; exit 3');
  assert.equal(r.exitCode, 3);
  assert.equal(r.stderr, 'failing\n');
});

test('past its timeout a command is killed with its children and the next command works', async () => {
  const started = Date.now();
  const r = await sb.runCommand('sleep 300 & echo $! > child.pid; echo started; sleep 300', { timeout: 1_000 });
  assert.equal(r.timedOut, true);
  assert.equal(r.stdout, 'started\n');
  assert.ok(Date.now() - started < 30_000, 'the command did not run to its end');
  // A killed child may linger as a zombie where PID 1 does not reap: look at its state.
  const next = await sb.runCommand(
    `s=$(sed 's/.*) //' /proc/"$(cat child.pid)"/stat 2>/dev/null | cut -c1); case "$s" in ''|Z|X) echo gone ;; *) echo alive ;; esac`,
  );
  assert.equal(next.exitCode, 0);
  assert.equal(next.stdout, 'gone\n');
});

test('a missing file is refused with the code file', async () => {
  await assert.rejects(sb.readFile('no/such/file'), (e) => e instanceof SessionsError && e.status === 422 && e.code === 'file');
});

test('teardown ends the session and is idempotent', async () => {
  const other = new Sandbox({ image: 'alpine:3.20' });
  await other.init();
  const id = other.id;
  const client = new SessionsClient();
  assert.ok((await client.list()).some((s) => s.id === id));
  await other.teardown();
  await other.teardown();
  assert.ok(!(await client.list()).some((s) => s.id === id && !s.ended));
  await assert.rejects(other.runCommand('true'), /not initialised/);
});
