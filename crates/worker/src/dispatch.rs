//! The dispatch loop: delivery → decode → validate → run → publish result → ack.
//!
//! [`Dispatcher`] is generic over the [`Broker`], the sandbox [`Executor`] and
//! the [`ResultSink`], so the same loop runs against RabbitMQ and Kubernetes in
//! production and against [`crate::InMemoryBroker`] in tests and the demo.
//!
//! Invariants it keeps (the guarantees table of `docs/worker.md`):
//! - A delivery is acked only after the attempt's result (and, for a retry,
//!   the next attempt's message) was confirmed by the broker. If a publish
//!   fails, the delivery is released for redelivery instead.
//! - "Try again later" (API unavailable, 401/403, a failed publish) releases
//!   the delivery without spending its delivery budget ([`Delivery::release`]),
//!   and nothing reaches the dead-letter queue without a final result that
//!   says why: the last delivery the broker's limit allows is dead-lettered
//!   by the worker itself, with a result, instead of being run.
//! - The sandbox of an attempt is never deleted because the worker lost the
//!   delivery or is shutting down: the run is dropped (not cancelled) and the
//!   redelivery adopts the Job by its deterministic name.
//! - A message that cannot be decoded or validated goes to the dead-letter
//!   queue with its reason (and a `rejected` result when its id is readable);
//!   it is never requeued in a loop.
//! - At most `concurrency` tasks run at once (a semaphore, matching the
//!   consumer prefetch).

use std::sync::Arc;
use std::time::Duration;

use std::collections::HashMap;

use sandfleet_proto::{Limits, Outcome, Task, TaskId, TaskResult, decode_task};
use sandfleet_sandbox::{Clearance, ExecError, Execution, Executor, RunContext};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::broker::{Broker, BrokerError, Delivery, RetryMessage};
use crate::cancel::{self, Cancels};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::retry::{AttemptEnd, Decision, RetryConfig, decide};
use crate::sink::ResultSink;
use crate::trace;

/// Reason code of a task whose deadline does not fit in the broker's
/// consumer timeout (shared with the intakes, which refuse such a task first).
pub use sandfleet_proto::DEADLINE_TOO_LONG_CODE;
/// Reason code of a task dead-lettered after its last allowed attempt.
pub const MAX_ATTEMPTS_CODE: &str = "max_attempts";
/// Reason code of a task the sandbox refused (invalid spec).
pub const SANDBOX_REJECTED_CODE: &str = "sandbox_rejected";
/// Reason code of a task whose deliveries kept ending without being settled
/// (workers crashing or losing their connection while holding it) until the
/// queue's delivery limit: RabbitMQ's own death reason for the same case.
pub const DELIVERY_LIMIT_CODE: &str = "delivery_limit";

/// Time kept free inside the broker's consumer timeout for what follows the
/// sandbox: reading logs, publishing the result, acking.
pub use sandfleet_proto::CONSUMER_TIMEOUT_MARGIN;

/// How long a delivery is held before it is released because the API is
/// unavailable; keeps a paused-too-late consumer from spinning on it.
const UNAVAILABLE_HOLD: Duration = Duration::from_secs(1);

/// How long a delivery is held after a failed publish before it is
/// released: the redelivery would likely come straight back to this worker,
/// and an unroutable or refused result must not turn into a hot loop.
const PUBLISH_FAILURE_HOLD: Duration = Duration::from_secs(2);

/// How often a cancelled attempt's sandbox is deleted again while its run
/// has not ended: a cancel that lands while the executor is still creating
/// the Job can delete before the create; the next delete catches it.
const RECANCEL_EVERY: Duration = Duration::from_millis(500);

tokio::task_local! {
    /// When the delivery the current task handles reached the dispatch loop;
    /// taken by [`dispatch_elapsed`].
    static RECEIVED: std::cell::Cell<Option<Instant>>;
}

/// Time since the delivery the current task handles reached the dispatch
/// loop, once per delivery (later calls, and calls outside a delivery's
/// task, get `None`). The Kubernetes gate takes it when the attempt's create
/// request goes out: `sandfleet_dispatch_duration_seconds`.
pub(crate) fn dispatch_elapsed() -> Option<Duration> {
    RECEIVED
        .try_with(std::cell::Cell::take)
        .ok()
        .flatten()
        .map(|at| at.elapsed())
}

/// The dispatch loop's settings.
#[derive(Debug, Clone)]
pub struct DispatchConfig {
    /// Tasks run at once (also the prefetch).
    pub concurrency: usize,
    /// Bounds a task must respect.
    pub limits: Limits,
    /// The broker's consumer timeout; tasks whose deadline plus pending
    /// timeout do not fit inside it (minus [`CONSUMER_TIMEOUT_MARGIN`]) are
    /// refused.
    pub consumer_timeout: Duration,
    /// How long shutdown waits for in-flight tasks.
    pub drain_timeout: Duration,
    /// This worker's name, in results.
    pub worker: String,
    /// The retry policy's tuning.
    pub retry: RetryConfig,
}

/// What the drain at shutdown did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DrainReport {
    /// Tasks still running at the drain deadline, released to the broker
    /// with their sandboxes left running.
    pub released: usize,
}

/// Why the dispatch loop stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    /// The broker was shut down under the loop.
    #[error("broker closed")]
    BrokerClosed,
}

impl DispatchError {
    /// Whether restarting the loop may help.
    pub fn is_transient(&self) -> bool {
        false
    }
}

/// The dispatch loop over one broker, executor and result sink.
pub struct Dispatcher<B, E, S> {
    inner: Arc<Inner<B, E, S>>,
}

/// One lock per (task, attempt) this process is working on.
type AttemptLocks = std::sync::Mutex<HashMap<(TaskId, u32), Arc<tokio::sync::Mutex<()>>>>;

struct Inner<B, E, S> {
    /// Serialises work on the same attempt inside this process. A redelivery
    /// can arrive before the worker has noticed that the channel of the first
    /// delivery died (or a producer published a task twice); the second
    /// handler waits for the first to finish or be forgotten, then adopts.
    attempts: AttemptLocks,
    /// Delete each attempt's sandbox (`Executor::cancel`) once its delivery
    /// is settled, for executors that keep finished sandboxes so that a
    /// redelivery adopts the finished one instead of running it again.
    delete_after_settle: bool,
    /// The cancellations this worker knows, and the read barrier.
    cancels: Arc<Cancels>,
    broker: Arc<B>,
    executor: Arc<E>,
    sink: S,
    config: DispatchConfig,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

impl<B, E, S> Dispatcher<B, E, S>
where
    B: Broker,
    E: Executor,
    S: ResultSink,
{
    /// A dispatcher; nothing runs until [`Dispatcher::run`].
    pub fn new(
        broker: Arc<B>,
        executor: Arc<E>,
        sink: S,
        config: DispatchConfig,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> Self {
        Dispatcher {
            inner: Arc::new(Inner {
                attempts: AttemptLocks::default(),
                delete_after_settle: false,
                cancels: Cancels::new(),
                broker,
                executor,
                sink,
                config,
                metrics,
                health,
            }),
        }
    }

    /// With `true`, the sandbox of an attempt is deleted (through
    /// `Executor::cancel`) only after its delivery was acked or
    /// dead-lettered — for an executor that keeps finished sandboxes, so a
    /// worker that dies between publishing a result and acking leaves the
    /// finished sandbox for the redelivery to adopt instead of re-running the
    /// attempt. Skipped while another delivery of the same attempt waits in
    /// this process (it adopts, then deletes).
    pub fn delete_sandboxes_after_settle(mut self, on: bool) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.delete_after_settle = on;
        }
        self
    }

    /// The cancellations index to honour (fed from the cancellations stream
    /// in production; see [`crate::cancel`]). Without it, an empty index
    /// whose barrier passes at once.
    pub fn with_cancels(mut self, cancels: Arc<Cancels>) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.cancels = cancels;
        }
        self
    }

    /// Consumes until `shutdown` fires, then drains: no new deliveries,
    /// in-flight tasks get `drain_timeout` to finish, and what still runs
    /// after that is released to the broker with its sandbox left running.
    pub async fn run(self, shutdown: CancellationToken) -> Result<DrainReport, DispatchError> {
        let inner = self.inner;
        let permits = Arc::new(Semaphore::new(inner.config.concurrency.max(1)));
        let tracker = TaskTracker::new();
        // Fires at the drain deadline: in-flight runs are dropped and their
        // deliveries released; sandboxes keep running for the next worker.
        let abandon = CancellationToken::new();
        let released = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut result = Ok(());

        if !inner.cancels.is_caught_up() {
            inner.health.set_cancels_syncing(true);
            info!("reading the cancellations stream before taking tasks");
        }

        loop {
            // A permit first, so no delivery is taken that cannot run now;
            // and no task before the cancellations stream has been read up
            // to its tail: a delivery meeting a feed that is still
            // subscribing could not pass its barrier and would only be
            // released again. Both waits are cancel-safe.
            let permit = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                p = async {
                    inner.cancels.caught_up().await;
                    permits.clone().acquire_owned().await
                } => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            inner.health.set_cancels_syncing(false);
            // `next_delivery` is cancel-safe (Broker contract), so losing the
            // race against shutdown loses no message.
            let delivery = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                d = inner.broker.next_delivery() => d,
            };
            match delivery {
                Ok(delivery) => {
                    let received = std::cell::Cell::new(Some(Instant::now()));
                    let inner = inner.clone();
                    let abandon = abandon.clone();
                    let released = released.clone();
                    tracker.spawn(RECEIVED.scope(received, async move {
                        let _permit = permit;
                        if inner.handle(delivery, abandon).await == Handled::Abandoned {
                            released.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }));
                }
                Err(BrokerError::Closed) => {
                    result = Err(DispatchError::BrokerClosed);
                    break;
                }
                Err(e) => {
                    // The broker reconnects on its own; don't spin meanwhile.
                    warn!(error = %e, "no delivery; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }

        inner.health.set_draining();
        if let Err(e) = inner.broker.pause().await {
            debug!(error = %e, "pause at shutdown");
        }
        tracker.close();
        let in_flight = tracker.len();
        if in_flight > 0 {
            info!(
                in_flight,
                timeout_secs = inner.config.drain_timeout.as_secs(),
                "draining in-flight tasks"
            );
        }
        if tokio::time::timeout(inner.config.drain_timeout, tracker.wait())
            .await
            .is_err()
        {
            warn!(
                still_running = tracker.len(),
                "drain timeout: releasing unfinished tasks; their sandboxes keep running"
            );
            abandon.cancel();
            tracker.wait().await;
        }
        if let Err(e) = inner.broker.close().await {
            debug!(error = %e, "closing the broker at shutdown");
        }
        result.map(|()| DrainReport {
            released: released.load(std::sync::atomic::Ordering::Relaxed),
        })
    }
}

/// How waiting for the executor ended.
enum RunEnd {
    /// The delivery's channel closed.
    Lost,
    /// The drain deadline passed.
    Abandoned,
    /// The executor returned.
    Done(Result<Execution, ExecError>),
    /// The attempt was not cleared to start: nothing of it ran.
    Refused,
}

/// Why the cancellation barrier did not clear an attempt to start.
enum Refusal {
    /// A cancel of the task was read.
    Cancelled(sandfleet_proto::CancelInfo),
    /// The cancellations stream could not be read up to now.
    Unreadable(String),
}

/// How the handling of one delivery ended (for the drain report).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handled {
    /// Acked or dead-lettered; `sandbox` when the executor ran (or adopted)
    /// a sandbox that ended, which may now be deleted.
    Settled {
        /// A finished sandbox exists for this attempt.
        sandbox: bool,
    },
    /// Handed back for redelivery (publish failed, API unavailable).
    Released,
    /// Handed back at the drain deadline with its sandbox still running.
    Abandoned,
    /// Lost with its channel; the broker redelivers it.
    Lost,
}

impl<B, E, S> Inner<B, E, S>
where
    B: Broker,
    E: Executor,
    S: ResultSink,
{
    async fn handle(&self, delivery: B::Delivery, abandon: CancellationToken) -> Handled {
        let attempt = delivery.attempt();
        let span = info_span!(
            "task",
            task_id = tracing::field::Empty,
            attempt,
            redelivered = delivery.redelivered(),
            outcome = tracing::field::Empty,
        );
        trace::set_parent(&span, delivery.traceparent());
        self.handle_in_span(delivery, attempt, abandon, span.clone())
            .instrument(span)
            .await
    }

    async fn handle_in_span(
        &self,
        delivery: B::Delivery,
        attempt: u32,
        abandon: CancellationToken,
        span: tracing::Span,
    ) -> Handled {
        let task = match decode_task(delivery.body(), &self.config.limits) {
            Ok(task) => task,
            Err(reason) => {
                warn!(code = reason.code(), %reason, "rejecting task message");
                let result = reason
                    .task_id()
                    .map(|id| TaskResult::rejected(id, &reason, self.config.worker.clone()));
                return self
                    .reject(delivery, reason.code(), &reason.to_string(), result)
                    .await;
            }
        };
        span.record("task_id", tracing::field::display(task.id));
        // The trace context handed on: this task's span, or the message's own.
        let traceparent =
            trace::current_traceparent(&span).or_else(|| delivery.traceparent().map(str::to_owned));

        if let Some(reason) = self.deadline_refusal(&task) {
            warn!(%reason, "refusing task");
            let mut result = TaskResult::from_task(
                &task,
                attempt,
                Outcome::Rejected,
                self.config.worker.clone(),
            );
            result.is_final = true;
            result.error = Some(format!("{DEADLINE_TOO_LONG_CODE}: {reason}"));
            return self
                .reject(delivery, DEADLINE_TOO_LONG_CODE, &reason, Some(result))
                .await;
        }

        if let Some(limit) = self.broker.delivery_limit()
            && delivery.delivery_count() >= limit
        {
            // The broker dead-letters this message, without a word, the next
            // time a delivery of it ends unsettled: it has killed (or lost)
            // `limit` workers already. Running it once more would most likely
            // end the same way, so end it here, with a result that says why.
            let reason = format!(
                "the task was delivered {} times without finishing: the workers holding it \
                 crashed or lost their broker connection each time (delivery limit {limit}); \
                 not run again",
                delivery.delivery_count() + 1
            );
            warn!(%reason, "dead-lettering a crash-looping task");
            let mut result = TaskResult::from_task(
                &task,
                attempt,
                Outcome::InfraError,
                self.config.worker.clone(),
            );
            result.is_final = true;
            result.error = Some(format!("{DELIVERY_LIMIT_CODE}: {reason}"));
            return self
                .reject(delivery, DELIVERY_LIMIT_CODE, &reason, Some(result))
                .await;
        }

        // Another handler in this process works on the same attempt (see
        // `Inner::attempts`): wait for it, unless this delivery is lost or
        // abandoned meanwhile.
        let key = (task.id, attempt);
        let lock = self.attempt_lock(key);
        let lost = delivery.lost();
        let _attempt_guard = tokio::select! {
            biased;
            _ = lost.cancelled() => {
                self.forget_attempt_lock(key, lock);
                return Handled::Lost;
            }
            _ = abandon.cancelled() => {
                self.forget_attempt_lock(key, lock);
                return match release(delivery).await {
                    Handled::Released => Handled::Abandoned,
                    other => other,
                };
            }
            g = lock.clone().lock_owned() => g,
        };
        let handled = self
            .run_attempt(delivery, task, attempt, traceparent, abandon, span)
            .await;
        if matches!(handled, Handled::Released | Handled::Abandoned) {
            self.metrics.task_released();
        }
        // The map, this handler and its guard hold the lock; more means a
        // duplicate waits and will adopt the sandbox, so it must stay.
        if handled == (Handled::Settled { sandbox: true })
            && self.delete_after_settle
            && Arc::strong_count(&lock) <= 3
            && let Err(e) = self.executor.cancel(key.0, key.1).await
        {
            // The Job's TTL and the orphan GC remove it later.
            warn!(error = %e, "could not delete the finished sandbox");
        }
        drop(_attempt_guard);
        self.forget_attempt_lock(key, lock);
        handled
    }

    fn attempt_lock(&self, key: (TaskId, u32)) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(key).or_default().clone()
    }

    fn forget_attempt_lock(&self, key: (TaskId, u32), lock: Arc<tokio::sync::Mutex<()>>) {
        let mut map = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
        drop(lock);
        // Only the map holds it: nobody else works on or waits for this attempt.
        if map.get(&key).is_some_and(|l| Arc::strong_count(l) == 1) {
            map.remove(&key);
        }
    }

    async fn run_attempt(
        &self,
        delivery: B::Delivery,
        task: Task,
        attempt: u32,
        traceparent: Option<String>,
        abandon: CancellationToken,
        span: tracing::Span,
    ) -> Handled {
        let lost = delivery.lost();
        // Watch first, then the barrier: a cancel read after the barrier
        // fires the watch; one confirmed before it is in the index.
        let guard = self.cancels.watch(&task);
        let watch = guard.watch.clone();
        // The barrier clears the attempt to start. The executor may ready its
        // sandbox meanwhile (nothing of the task runs before the clearance):
        // the barrier's broker round trip and the sandbox's start overlap.
        let refused: std::sync::Mutex<Option<Refusal>> = std::sync::Mutex::new(None);
        let cleared_at: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        let clearance: Clearance<'_> = Box::pin(async {
            let refuse = |why| {
                *refused.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
                None
            };
            let cancels_read_to = match self.cancels.barrier().await {
                Ok(read_to) => read_to,
                Err(e) => return refuse(Refusal::Unreadable(e.to_string())),
            };
            self.metrics.set_cancels_recorded(self.cancels.recorded());
            if let Some(info) = watch.info().cloned() {
                return refuse(Refusal::Cancelled(info));
            }
            let _ = cleared_at.set(Instant::now());
            Some(RunContext {
                traceparent: traceparent.clone(),
                worker: self.config.worker.clone(),
                cancels_read_to,
            })
        });
        self.metrics.in_flight().inc();
        let _running = self.health.track_running(&task, attempt);
        // Neither branch but `run` is a completion: dropping the run future
        // (lost delivery, drain deadline) leaves the sandbox running, which is
        // the point — the redelivery adopts it. A cancel does not drop it:
        // the sandbox is deleted and the run ends with what it saw (partial
        // logs), which the cancelled result keeps.
        // (Boxed by the trait, so it can be dropped once it is done with:
        // it borrows the task, which moves on to `conclude`.)
        let mut run_fut = self.executor.run_when_cleared(&task, attempt, clearance);
        let mut stopping = false;
        let run = loop {
            tokio::select! {
                biased;
                _ = lost.cancelled() => break RunEnd::Lost,
                _ = abandon.cancelled() => break RunEnd::Abandoned,
                r = &mut run_fut => break match r {
                    Some(r) => RunEnd::Done(r),
                    None => RunEnd::Refused,
                },
                () = watch.fired(), if !stopping => {
                    stopping = true;
                    self.stop_sandbox(&task, attempt).await;
                }
                () = tokio::time::sleep(RECANCEL_EVERY), if stopping => {
                    self.stop_sandbox(&task, attempt).await;
                }
            }
        };
        drop(run_fut);
        self.metrics.in_flight().dec();
        let run = match run {
            RunEnd::Lost => {
                info!(
                    "delivery lost (channel closed); forgetting it, the sandbox stays for the redelivery"
                );
                return Handled::Lost;
            }
            RunEnd::Abandoned => {
                info!("drain deadline: releasing the task; its sandbox keeps running");
                return match delivery.release().await {
                    Ok(()) => Handled::Abandoned,
                    Err(e) => {
                        debug!(error = %e, "release at drain");
                        Handled::Lost
                    }
                };
            }
            RunEnd::Refused => {
                let why = refused.lock().unwrap_or_else(|p| p.into_inner()).take();
                return match why {
                    Some(Refusal::Cancelled(info)) => {
                        info!(by = %info.by, reason = %info.reason, "task cancelled before it started");
                        // A redelivery may find the Job a dead worker left running for
                        // this attempt: delete it too (a missing Job is not an error).
                        self.stop_sandbox(&task, attempt).await;
                        let result = self.cancelled_result(&task, attempt, None, &info);
                        // Boxed like `conclude`: not part of a running attempt's future.
                        Box::pin(self.finish_cancelled(
                            delivery,
                            result,
                            traceparent.as_deref(),
                            "before_start",
                            Duration::ZERO,
                        ))
                        .await
                    }
                    Some(Refusal::Unreadable(e)) => {
                        warn!(error = %e, "cancellations not readable; releasing the task for later");
                        tokio::time::sleep(UNAVAILABLE_HOLD).await;
                        release(delivery).await
                    }
                    None => {
                        // Only the clearance above refuses, and it says why first.
                        error!("the attempt was refused a start without a reason; releasing it");
                        release(delivery).await
                    }
                };
            }
            RunEnd::Done(run) => run,
        };
        let elapsed = cleared_at.get().map_or(Duration::ZERO, |at| at.elapsed());
        // Boxed: what follows the run (results, retry messages, the ack) is
        // most of this future's size, and inline it would be held for the
        // whole run, by every task in flight.
        Box::pin(self.conclude(
            delivery,
            task,
            attempt,
            traceparent,
            span,
            run,
            elapsed,
            (guard, stopping),
        ))
        .await
    }

    /// Publishes the attempt's result (or the next attempt) and settles
    /// its delivery, once the run has ended. `cancel_watch` is the attempt's
    /// cancel watch and whether its sandbox is being stopped for it.
    #[allow(clippy::too_many_arguments)]
    async fn conclude(
        &self,
        delivery: B::Delivery,
        task: Task,
        attempt: u32,
        traceparent: Option<String>,
        span: tracing::Span,
        run: Result<Execution, ExecError>,
        elapsed: Duration,
        cancel_watch: (cancel::WatchGuard, bool),
    ) -> Handled {
        let (guard, stopping) = cancel_watch;
        let watch = &guard.watch;

        // Exactly one final result: this worker holds the delivery, so it
        // alone decides. A cancel known before the result is published wins,
        // unless the attempt succeeded on its own first: a failure may be
        // the cancel's own doing (another worker that held this attempt
        // before dying deleted the Job, and the pod died with code 137).
        if let Some(info) = watch.info().cloned() {
            let succeeded = run.as_ref().is_ok_and(|e| e.outcome.is_success());
            if stopping || !succeeded {
                info!(by = %info.by, reason = %info.reason, "task cancelled while it ran");
                if !stopping {
                    self.stop_sandbox(&task, attempt).await;
                }
                let result = self.cancelled_result(&task, attempt, run.as_ref().ok(), &info);
                let stage = if run.is_ok() {
                    "running"
                } else {
                    "before_start"
                };
                return match self
                    .finish_cancelled(delivery, result, traceparent.as_deref(), stage, elapsed)
                    .await
                {
                    Handled::Settled { .. } => Handled::Settled {
                        sandbox: run.is_ok(),
                    },
                    other => other,
                };
            }
        }
        drop(guard);

        let end = match &run {
            Ok(exec) => AttemptEnd::Finished(exec.outcome),
            Err(e) => attempt_end(e),
        };
        let decision = {
            let mut rng = rand::rng();
            decide(
                task.retry.max_attempts,
                attempt,
                &end,
                &self.config.retry,
                &mut rng,
            )
        };
        let mut result = build_result(&task, attempt, &run, &self.config.worker);
        span.record("outcome", result.outcome.as_str());
        let had_sandbox = run.is_ok();
        let handled = match decision {
            Decision::PublishFinal => {
                result.is_final = true;
                if !self.publish(&result, traceparent.as_deref()).await {
                    return release(delivery).await;
                }
                self.metrics.task_finished(result.outcome, elapsed);
                info!(outcome = %result.outcome, adopted = run.as_ref().is_ok_and(|e| e.adopted), "task finished");
                settle(delivery.ack().await)
            }
            Decision::Retry {
                delay,
                next_attempt,
                tier,
            } => {
                result.is_final = false;
                let msg = RetryMessage {
                    task_id: task.id,
                    body: delivery.body().to_vec(),
                    attempt: next_attempt,
                    delay,
                    tier,
                    traceparent: traceparent.clone(),
                };
                if let Err(e) = self.broker.publish_retry(msg).await {
                    warn!(error = %e, "retry not published; releasing the delivery");
                    tokio::time::sleep(PUBLISH_FAILURE_HOLD).await;
                    return release(delivery).await;
                }
                // The next attempt is safely queued; a lost non-final result
                // is only a gap in the history, so it does not hold the ack.
                self.publish(&result, traceparent.as_deref()).await;
                self.metrics.observe_duration(result.outcome, elapsed);
                self.metrics.task_retried();
                info!(
                    outcome = %result.outcome,
                    next_attempt,
                    delay_ms = delay.as_millis() as u64,
                    "attempt failed on infrastructure; retrying"
                );
                settle(delivery.ack().await)
            }
            Decision::DeadLetter { reason } => {
                result.is_final = true;
                result.error = Some(reason.clone());
                if !self.publish(&result, traceparent.as_deref()).await {
                    return release(delivery).await;
                }
                let code = match end {
                    AttemptEnd::Fatal { .. } => SANDBOX_REJECTED_CODE,
                    _ => MAX_ATTEMPTS_CODE,
                };
                self.metrics.task_finished(result.outcome, elapsed);
                self.metrics.task_dead_lettered();
                warn!(%reason, "dead-lettering task");
                settle(delivery.dead_letter(code, &reason).await)
            }
            Decision::Release { reason } => {
                info!(%reason, "releasing the task for later");
                tokio::time::sleep(UNAVAILABLE_HOLD).await;
                release(delivery).await
            }
        };
        match handled {
            Handled::Settled { .. } => Handled::Settled {
                sandbox: had_sandbox,
            },
            other => other,
        }
    }

    /// Deletes the attempt's sandbox (a cancel); failures are logged, the
    /// caller tries again while the run has not ended.
    async fn stop_sandbox(&self, task: &Task, attempt: u32) {
        if let Err(e) = self.executor.cancel(task.id, attempt).await {
            warn!(error = %e, "could not delete the cancelled sandbox yet");
        }
    }

    /// The final `cancelled` result, with what the run saw when it ran.
    fn cancelled_result(
        &self,
        task: &Task,
        attempt: u32,
        exec: Option<&Execution>,
        info: &sandfleet_proto::CancelInfo,
    ) -> TaskResult {
        let mut result = match exec {
            Some(exec) => build_result(task, attempt, &Ok(exec.clone()), &self.config.worker),
            None => TaskResult::from_task(task, attempt, Outcome::Cancelled, &self.config.worker),
        };
        result.outcome = Outcome::Cancelled;
        result.is_final = true;
        result.exit_code = None;
        result.error = Some(cancel::describe(info));
        result.cancellation = Some(info.clone());
        result
    }

    /// Publishes a cancelled result and acks; releases when the publish
    /// fails (the redelivery meets the same cancel).
    async fn finish_cancelled(
        &self,
        delivery: B::Delivery,
        result: TaskResult,
        traceparent: Option<&str>,
        stage: &'static str,
        elapsed: Duration,
    ) -> Handled {
        if !self.publish(&result, traceparent).await {
            return release(delivery).await;
        }
        self.metrics.task_finished(Outcome::Cancelled, elapsed);
        self.metrics.task_cancelled(stage);
        settle(delivery.ack().await)
    }

    /// Dead-letters an unrunnable message, after publishing its `rejected`
    /// result when there is one.
    async fn reject(
        &self,
        delivery: B::Delivery,
        code: &str,
        reason: &str,
        result: Option<TaskResult>,
    ) -> Handled {
        self.metrics.task_rejected(code);
        if let Some(result) = result {
            if !self.publish(&result, delivery.traceparent()).await {
                return release(delivery).await;
            }
            self.metrics.count_final(result.outcome);
        }
        self.metrics.task_dead_lettered();
        settle(delivery.dead_letter(code, reason).await)
    }

    /// The shared budget check (the intakes run the same one), so the
    /// worker and the gateway give the same reason.
    fn deadline_refusal(&self, task: &Task) -> Option<String> {
        sandfleet_proto::check_consumer_timeout(task, self.config.consumer_timeout)
            .err()
            .map(|e| e.to_string())
    }

    async fn publish(&self, result: &TaskResult, traceparent: Option<&str>) -> bool {
        match self.sink.publish(result, traceparent).await {
            Ok(()) => true,
            Err(e) => {
                error!(error = %e, "result publish failed; the delivery will be released");
                tokio::time::sleep(PUBLISH_FAILURE_HOLD).await;
                false
            }
        }
    }
}

async fn release<D: Delivery>(delivery: D) -> Handled {
    match delivery.release().await {
        Ok(()) => Handled::Released,
        Err(e) => {
            debug!(error = %e, "release failed; the broker requeues it when the channel closes");
            Handled::Lost
        }
    }
}

fn settle(r: Result<(), BrokerError>) -> Handled {
    match r {
        Ok(()) => Handled::Settled { sandbox: false },
        Err(e) => {
            // The channel closed after the result was confirmed: the broker
            // redelivers, the redelivery adopts the finished Job and
            // republishes the same (task, attempt) result. Consumers dedup.
            warn!(error = %e, "could not settle the delivery; it will be redelivered");
            Handled::Lost
        }
    }
}

/// Maps an executor error to what the retry policy needs to know.
pub fn attempt_end(e: &ExecError) -> AttemptEnd {
    match e {
        ExecError::Unavailable | ExecError::Cancelled => AttemptEnd::Unavailable,
        // Misconfiguration (RBAC revoked, bad kubeconfig) is not the task's
        // fault: never dead-letter because of it, hand it back.
        ExecError::Api {
            status: Some(401 | 403),
            ..
        }
        | ExecError::Config(_) => AttemptEnd::Unavailable,
        ExecError::Rejected(reason) => AttemptEnd::Fatal {
            outcome: Outcome::Rejected,
            error: format!("sandbox rejected the task: {reason}"),
        },
        ExecError::Api { .. } if !e.is_transient() => AttemptEnd::Fatal {
            outcome: Outcome::Rejected,
            error: e.to_string(),
        },
        _ => AttemptEnd::InfraError {
            error: e.to_string(),
            retry_after: e.retry_after(),
        },
    }
}

/// The result of one attempt from what the executor returned.
pub fn build_result(
    task: &Task,
    attempt: u32,
    run: &Result<Execution, ExecError>,
    worker: &str,
) -> TaskResult {
    match run {
        Ok(exec) => {
            let mut r = TaskResult::from_task(task, attempt, exec.outcome, worker);
            r.exit_code = exec.exit_code;
            r.steps = exec.steps.clone();
            r.log_tail = exec.log_tail.clone();
            r.log_truncated = exec.log_truncated;
            r.artifacts = exec.artifacts.clone();
            r.started_at = exec.started_at;
            r.finished_at = exec.finished_at;
            r.sandbox = Some(exec.sandbox.clone());
            r.error = exec.error.clone();
            r.timings = exec.admission_wait.map(|w| sandfleet_proto::Timings {
                admission_wait_ms: Some(u64::try_from(w.as_millis()).unwrap_or(u64::MAX)),
            });
            r
        }
        Err(e) => {
            let outcome = match attempt_end(e) {
                AttemptEnd::Fatal { outcome, .. } => outcome,
                _ => Outcome::InfraError,
            };
            let mut r = TaskResult::from_task(task, attempt, outcome, worker);
            r.error = Some(e.to_string());
            r
        }
    }
}

#[cfg(test)]
mod tests;
