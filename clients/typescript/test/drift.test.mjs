// The generated types are checked against the schemas: a schema change the
// types do not follow fails `npm run check:types`.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { cp, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

const pkg = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const run = (env) =>
  promisify(execFile)(process.execPath, ['scripts/gen-types.mjs', '--check'], { cwd: pkg, env: { ...process.env, ...env } });

test('check:types passes on the committed schemas and fails on a changed one', async () => {
  const { stdout } = await run({});
  assert.match(stdout, /matches/);
  const dir = await mkdtemp(path.join(os.tmpdir(), 'sandfleet-schemas-'));
  try {
    await cp(process.env.SANDFLEET_SCHEMAS_DIR ?? path.join(pkg, '../../schemas'), dir, { recursive: true });
    const file = path.join(dir, 'task.v1.schema.json');
    const schema = JSON.parse(await readFile(file, 'utf8'));
    schema.properties.priority = { type: 'integer', description: 'A field the types do not know.' };
    await writeFile(file, JSON.stringify(schema));
    await assert.rejects(run({ SANDFLEET_SCHEMAS_DIR: dir }), (e) => e.code === 1 && /task\.ts differs/.test(e.stderr));
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});
