// @sandfleet/client: enqueue sandbox tasks, follow their results, drive sessions.
export type * from './generated/task.js';
export type { Cancellation } from './generated/cancellation.js';
export type { TaskResult, Artifact, StepResult } from './generated/result.js';
export * from './fleet.js';
export * from './sessions.js';
