//! Topology as code: every exchange, queue and binding sandfleet uses, with
//! their arguments, declared idempotently by [`Topology::apply`] and verified
//! by [`Topology::check`].
//!
//! | name | type | purpose |
//! |---|---|---|
//! | `<p>.tasks` | direct exchange | producers publish tasks here, routing key `task` |
//! | `<p>.tasks` | quorum queue | the work queue; at-least-once dead-lettering to `<p>.dead`, delivery limit |
//! | `<p>.tasks.<n>` | quorum queue per shard | with `task_shards` > 0: task queue shards, routing key `task.<n>`, same arguments (`docs/fairness.md`) |
//! | `<p>.retry.<n>s` | quorum queue per tier | the retry ladder: messages wait `n` s, then dead-letter back to `<p>.tasks` |
//! | `<p>.dead` | fanout exchange | dead letters: rejected, poison, exhausted tasks |
//! | `<p>.dead` | quorum queue | where dead letters wait for an operator (`sandfleet dlq`) |
//! | `<p>.results` | topic exchange | results, routing key `<outcome>.<final\|retrying>` |
//! | `<p>.results.stream` | stream queue | replayable log of all results, age-bounded |
//! | `<p>.cancellations` | fanout exchange | cancel requests and supersedes (`docs/cancellation.md`) |
//! | `<p>.cancellations.stream` | stream queue | every cancel, age-bounded; each worker reads it from the start |
//!
//! RabbitMQ cannot change a queue's arguments in place. When a queue exists
//! with different arguments, [`Topology::apply`] fails with
//! [`TopologyError::Conflict`], which names the argument, both values, and
//! how to migrate, instead of crash-looping on the broker's 406.

use std::fmt;
use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};
use sandfleet_settings::TopologySettings;

use crate::error::{REPLY_NOT_FOUND, REPLY_PRECONDITION_FAILED, reply_code, reply_text};
use crate::management::Management;
use crate::message::amqp_int;
use crate::{Amqp, AmqpError};

/// The routing key of task messages on the task exchange.
pub const TASK_ROUTING_KEY: &str = "task";

/// The names (and declarations) of sandfleet's exchanges and queues.
#[derive(Debug, Clone, PartialEq)]
pub struct Topology {
    /// The prefix every name starts with.
    pub prefix: String,
    /// `<p>.tasks` (direct exchange).
    pub tasks_exchange: String,
    /// `<p>.tasks` (quorum queue).
    pub tasks_queue: String,
    /// `<p>.tasks.<n>` for `n` in `0..task_shards` (quorum queues): the
    /// shards fair sharing spreads tasks over by fairness key; empty when
    /// `task_shards` is 0. `<p>.tasks` stays: retries and producers that do
    /// not pick a shard (routing key `task`) land there.
    pub task_shards: Vec<String>,
    /// The retry ladder, shortest delay first.
    pub retry_tiers: Vec<RetryTier>,
    /// `<p>.dead` (fanout exchange).
    pub dead_exchange: String,
    /// `<p>.dead` (quorum queue).
    pub dead_queue: String,
    /// `<p>.results` (topic exchange).
    pub results_exchange: String,
    /// `<p>.results.stream` (stream queue).
    pub results_stream: String,
    /// `<p>.cancellations` (fanout exchange).
    pub cancellations_exchange: String,
    /// `<p>.cancellations.stream` (stream queue).
    pub cancellations_stream: String,
    settings: TopologySettings,
}

/// One rung of the retry ladder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryTier {
    /// How long messages wait here (the queue's `x-message-ttl`).
    pub delay: Duration,
    /// The queue's name, `<p>.retry.<secs>s`; publish to it through the
    /// default exchange (`""`, routing key = this name).
    pub queue: String,
}

/// What kind of broker object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    /// An exchange.
    Exchange,
    /// A queue.
    Queue,
    /// A binding of a queue to an exchange.
    Binding,
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ObjectKind::Exchange => "exchange",
            ObjectKind::Queue => "queue",
            ObjectKind::Binding => "binding",
        })
    }
}

/// One declared object, for tables and tooling.
#[derive(Debug, Clone, PartialEq)]
pub struct Declaration {
    /// Exchange, queue or binding.
    pub kind: ObjectKind,
    /// Its name (for a binding: `exchange -> queue`).
    pub name: String,
    /// `direct`/`fanout`/`topic`, `quorum`/`stream`, or the routing key of a binding.
    pub type_: String,
    /// Arguments, as the broker shows them.
    pub arguments: Vec<(String, String)>,
    /// Why it exists.
    pub purpose: String,
    args: FieldTable,
}

/// A difference found by [`Topology::check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// The object does not exist.
    Missing {
        /// Exchange, queue or binding.
        kind: ObjectKind,
        /// Its name.
        name: String,
    },
    /// The object exists with a different type or argument.
    Different {
        /// Exchange or queue.
        kind: ObjectKind,
        /// Its name.
        name: String,
        /// The argument (`type` for the exchange or queue type).
        argument: String,
        /// What sandfleet declares (`none` when it sets nothing).
        expected: String,
        /// What the broker has (`none` when unset).
        actual: String,
    },
    /// Something could not be verified (the management API is unreachable).
    Unverified {
        /// What and why.
        what: String,
    },
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Finding::Missing { kind, name } => write!(f, "missing {kind} '{name}'"),
            Finding::Different {
                kind,
                name,
                argument,
                expected,
                actual,
            } => write!(
                f,
                "{kind} '{name}': {argument} is {actual} on the broker, sandfleet expects {expected}"
            ),
            Finding::Unverified { what } => write!(f, "not verified: {what}"),
        }
    }
}

/// The result of [`Topology::check`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Everything missing or different (empty when the topology matches).
    pub findings: Vec<Finding>,
}

impl CheckReport {
    /// True when nothing is missing or different. Unverified items alone
    /// still count as "ok" for existence, but see [`CheckReport::fully_verified`].
    pub fn is_ok(&self) -> bool {
        self.findings
            .iter()
            .all(|f| matches!(f, Finding::Unverified { .. }))
    }

    /// True when arguments and bindings were verified too.
    pub fn fully_verified(&self) -> bool {
        !self
            .findings
            .iter()
            .any(|f| matches!(f, Finding::Unverified { .. }))
    }
}

/// Why the topology could not be applied or checked.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// An object exists with a different type or arguments (the broker
    /// answered the declaration with 406 PRECONDITION_FAILED).
    #[error(
        "{kind} '{name}' already exists with different arguments: {details}. {migration} (broker said: {broker_message})"
    )]
    Conflict {
        /// Exchange or queue.
        kind: ObjectKind,
        /// Its name.
        name: String,
        /// Each differing argument: `x-delivery-limit is 5 on the broker, sandfleet expects 20`.
        details: String,
        /// The differing arguments, as `(argument, expected, actual)`.
        differences: Vec<(String, String, String)>,
        /// How to migrate.
        migration: String,
        /// The broker's 406 text, which names the first differing argument.
        broker_message: String,
    },
    /// Any other broker error.
    #[error(transparent)]
    Amqp(#[from] AmqpError),
}

impl TopologyError {
    /// Conflicts need an operator; broker outages may pass.
    pub fn is_transient(&self) -> bool {
        match self {
            TopologyError::Conflict { .. } => false,
            TopologyError::Amqp(e) => e.is_transient(),
        }
    }
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

fn int(n: u64) -> AMQPValue {
    AMQPValue::LongLongInt(i64::try_from(n).unwrap_or(i64::MAX))
}

fn table(entries: Vec<(&str, AMQPValue)>) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in entries {
        t.insert(k.into(), v);
    }
    t
}

/// Renders an AMQP argument value as the management API shows it.
fn show_amqp(v: &AMQPValue) -> String {
    if let Some(i) = amqp_int(v) {
        return i.to_string();
    }
    match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.to_string(),
        AMQPValue::Boolean(b) => b.to_string(),
        other => format!("{other:?}"),
    }
}

fn show_json(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl Topology {
    /// The topology for these settings.
    pub fn new(settings: &TopologySettings) -> Topology {
        let p = settings.prefix.as_str();
        let mut delays: Vec<u64> = settings.retry_delays_secs.clone();
        delays.sort_unstable();
        delays.dedup();
        Topology {
            prefix: p.to_owned(),
            tasks_exchange: format!("{p}.tasks"),
            tasks_queue: format!("{p}.tasks"),
            task_shards: (0..settings.task_shards)
                .map(|n| format!("{p}.tasks.{n}"))
                .collect(),
            retry_tiers: delays
                .into_iter()
                .map(|s| RetryTier {
                    delay: Duration::from_secs(s),
                    queue: format!("{p}.retry.{s}s"),
                })
                .collect(),
            dead_exchange: format!("{p}.dead"),
            dead_queue: format!("{p}.dead"),
            results_exchange: format!("{p}.results"),
            results_stream: format!("{p}.results.stream"),
            cancellations_exchange: format!("{p}.cancellations"),
            cancellations_stream: format!("{p}.cancellations.stream"),
            settings: settings.clone(),
        }
    }

    /// The settings it was built from.
    pub fn settings(&self) -> &TopologySettings {
        &self.settings
    }

    /// Every queue tasks wait in: `<p>.tasks`, then the shards. Workers
    /// consume all of them; the queue depth the autoscaler sees is their sum.
    pub fn task_queues(&self) -> Vec<String> {
        std::iter::once(self.tasks_queue.clone())
            .chain(self.task_shards.iter().cloned())
            .collect()
    }

    /// The routing key on the task exchange for a task with this fairness
    /// key: `task.<n>` with shards (`n` = [`sandfleet_proto::shard_for`]),
    /// plain `task` without.
    pub fn routing_key_for(&self, fairness_key: &str) -> String {
        if self.task_shards.is_empty() {
            return TASK_ROUTING_KEY.to_owned();
        }
        let shards = u16::try_from(self.task_shards.len()).unwrap_or(u16::MAX);
        format!(
            "{TASK_ROUTING_KEY}.{}",
            sandfleet_proto::shard_for(fairness_key, shards)
        )
    }

    /// The shortest tier whose delay is at least `delay` (the longest tier
    /// when none is long enough). `None` when the ladder is empty.
    pub fn retry_tier_for(&self, delay: Duration) -> Option<&RetryTier> {
        self.retry_tiers
            .iter()
            .find(|t| t.delay >= delay)
            .or_else(|| self.retry_tiers.last())
    }

    /// The tier for retry number `retry` (1 = the first retry), climbing the
    /// ladder and staying on its top rung.
    pub fn retry_tier(&self, retry: u32) -> Option<&RetryTier> {
        let i = (retry.max(1) as usize - 1).min(self.retry_tiers.len().checked_sub(1)?);
        self.retry_tiers.get(i)
    }

    /// Every exchange, queue and binding, in declaration order.
    pub fn declarations(&self) -> Vec<Declaration> {
        let s = &self.settings;
        let mut out = Vec::new();
        let mut push = |kind, name: &str, type_: &str, args: FieldTable, purpose: &str| {
            let arguments = args
                .inner()
                .iter()
                .map(|(k, v)| (k.to_string(), show_amqp(v)))
                .collect();
            out.push(Declaration {
                kind,
                name: name.to_owned(),
                type_: type_.to_owned(),
                arguments,
                purpose: purpose.to_owned(),
                args,
            });
        };
        push(
            ObjectKind::Exchange,
            &self.dead_exchange,
            "fanout",
            FieldTable::default(),
            "Dead letters: invalid and poison messages, tasks over the delivery limit or out of attempts.",
        );
        push(
            ObjectKind::Queue,
            &self.dead_queue,
            "quorum",
            table(vec![("x-queue-type", long("quorum"))]),
            "Holds dead letters for inspection and replay (`sandfleet dlq`).",
        );
        push(
            ObjectKind::Binding,
            &format!("{} -> {}", self.dead_exchange, self.dead_queue),
            "",
            FieldTable::default(),
            "Every dead letter lands in the dead-letter queue.",
        );
        push(
            ObjectKind::Exchange,
            &self.tasks_exchange,
            "direct",
            FieldTable::default(),
            "Producers publish tasks here (routing key `task`); delay queues dead-letter back here.",
        );
        let mut task_args = vec![
            ("x-queue-type", long("quorum")),
            ("x-dead-letter-exchange", long(&self.dead_exchange)),
            ("x-dead-letter-strategy", long("at-least-once")),
            ("x-overflow", long("reject-publish")),
            ("x-delivery-limit", int(u64::from(s.delivery_limit))),
        ];
        if s.tasks_max_length > 0 {
            task_args.push(("x-max-length", int(s.tasks_max_length)));
        }
        push(
            ObjectKind::Queue,
            &self.tasks_queue,
            "quorum",
            table(task_args.clone()),
            "The work queue. Replicated; crash loops end at the delivery limit; rejected and over-limit messages are dead-lettered at least once; publishes beyond x-max-length are nacked.",
        );
        push(
            ObjectKind::Binding,
            &format!("{} -> {}", self.tasks_exchange, self.tasks_queue),
            TASK_ROUTING_KEY,
            FieldTable::default(),
            "Routes tasks to the work queue.",
        );
        for (n, shard) in self.task_shards.iter().enumerate() {
            push(
                ObjectKind::Queue,
                shard,
                "quorum",
                table(task_args.clone()),
                "A task queue shard for fair sharing: the tasks whose fairness key hashes here; the same arguments as the work queue.",
            );
            push(
                ObjectKind::Binding,
                &format!("{} -> {}", self.tasks_exchange, shard),
                &format!("{TASK_ROUTING_KEY}.{n}"),
                FieldTable::default(),
                "Routes the tasks of this shard's fairness keys.",
            );
        }
        for tier in &self.retry_tiers {
            let ms = u64::try_from(tier.delay.as_millis()).unwrap_or(u64::MAX);
            push(
                ObjectKind::Queue,
                &tier.queue,
                "quorum",
                table(vec![
                    ("x-queue-type", long("quorum")),
                    ("x-message-ttl", int(ms)),
                    ("x-dead-letter-exchange", long(&self.tasks_exchange)),
                    ("x-dead-letter-routing-key", long(TASK_ROUTING_KEY)),
                    ("x-dead-letter-strategy", long("at-least-once")),
                    ("x-overflow", long("reject-publish")),
                ]),
                &format!(
                    "Retry ladder rung: a retried task waits {}s here (no consumer), then expires back to the task exchange.",
                    tier.delay.as_secs()
                ),
            );
        }
        push(
            ObjectKind::Exchange,
            &self.results_exchange,
            "topic",
            FieldTable::default(),
            "Results, routing key `<outcome>.<final|retrying>`; consumers bind their own queues too.",
        );
        push(
            ObjectKind::Queue,
            &self.results_stream,
            "stream",
            table(vec![
                ("x-queue-type", long("stream")),
                ("x-max-age", long(&s.results_max_age)),
                ("x-max-length-bytes", int(s.results_max_bytes)),
            ]),
            "Replayable log of every result; subscribers start from first, last, next or a time.",
        );
        push(
            ObjectKind::Binding,
            &format!("{} -> {}", self.results_exchange, self.results_stream),
            "#",
            FieldTable::default(),
            "Every result goes to the stream.",
        );
        push(
            ObjectKind::Exchange,
            &self.cancellations_exchange,
            "fanout",
            FieldTable::default(),
            "Cancel requests and supersedes (`sandfleet cancel`, the task API, the gateway).",
        );
        // The same age bound as the results: a cancel must outlive any task
        // it may still meet (queued, delayed, redelivered), and every worker
        // reads the whole stream at start, so it must not grow without bound.
        push(
            ObjectKind::Queue,
            &self.cancellations_stream,
            "stream",
            table(vec![
                ("x-queue-type", long("stream")),
                ("x-max-age", long(&s.results_max_age)),
            ]),
            "Every cancel, recorded once; each worker reads it from the start into an in-memory index.",
        );
        push(
            ObjectKind::Binding,
            &format!(
                "{} -> {}",
                self.cancellations_exchange, self.cancellations_stream
            ),
            "",
            FieldTable::default(),
            "Every cancel goes to the stream.",
        );
        out
    }

    /// Declares everything. Idempotent: re-applying an applied topology
    /// changes nothing. A conflicting existing object gives
    /// [`TopologyError::Conflict`].
    pub async fn apply(&self, amqp: &Amqp) -> Result<(), TopologyError> {
        let channel = amqp.channel().await?;
        for d in self.declarations() {
            let res = match d.kind {
                ObjectKind::Exchange => {
                    let kind = match d.type_.as_str() {
                        "fanout" => ExchangeKind::Fanout,
                        "topic" => ExchangeKind::Topic,
                        _ => ExchangeKind::Direct,
                    };
                    channel
                        .exchange_declare(
                            d.name.as_str().into(),
                            kind,
                            ExchangeDeclareOptions {
                                durable: true,
                                ..Default::default()
                            },
                            d.args.clone(),
                        )
                        .await
                        .map(|_| ())
                }
                ObjectKind::Queue => channel
                    .queue_declare(
                        d.name.as_str().into(),
                        QueueDeclareOptions {
                            durable: true,
                            ..Default::default()
                        },
                        d.args.clone(),
                    )
                    .await
                    .map(|_| ()),
                ObjectKind::Binding => {
                    let (exchange, queue) = split_binding(&d.name);
                    channel
                        .queue_bind(
                            queue.into(),
                            exchange.into(),
                            d.type_.as_str().into(),
                            QueueBindOptions::default(),
                            FieldTable::default(),
                        )
                        .await
                }
            };
            if let Err(e) = res {
                if reply_code(&e) == Some(REPLY_PRECONDITION_FAILED) {
                    return Err(self
                        .conflict(amqp, &d, reply_text(&e).unwrap_or_default())
                        .await);
                }
                return Err(AmqpError::broker(declare_op(d.kind), e).into());
            }
        }
        let _ = channel.close(200, "OK".into()).await;
        Ok(())
    }

    /// Builds the conflict error for `d`, listing every differing argument
    /// when the management API is reachable, else quoting the broker.
    async fn conflict(&self, amqp: &Amqp, d: &Declaration, broker_message: &str) -> TopologyError {
        let differences = match diff(&amqp.management(), d).await {
            Ok(diffs) if !diffs.is_empty() => diffs,
            _ => parse_406(broker_message).into_iter().collect(),
        };
        let details = if differences.is_empty() {
            "see the broker's message".to_owned()
        } else {
            differences
                .iter()
                .map(|(arg, expected, actual)| {
                    format!("{arg} is {actual} on the broker, sandfleet expects {expected}")
                })
                .collect::<Vec<_>>()
                .join("; ")
        };
        let migration = match d.kind {
            ObjectKind::Queue => format!(
                "RabbitMQ cannot change a queue's arguments in place. To migrate: stop producers and workers, \
                 let the queue drain (or move its messages, e.g. with a shovel), delete it \
                 (`rabbitmqctl delete_queue {name}`), then run `sandfleet topology apply`; \
                 or change the sandfleet topology settings to match the existing queue",
                name = d.name
            ),
            _ => format!(
                "To migrate: delete the exchange (`rabbitmqadmin delete exchange name={name}`) and run \
                 `sandfleet topology apply`, which recreates it and its bindings",
                name = d.name
            ),
        };
        TopologyError::Conflict {
            kind: d.kind,
            name: d.name.clone(),
            details,
            differences,
            migration,
            broker_message: broker_message.to_owned(),
        }
    }

    /// Verifies without changing anything: passive declares for existence;
    /// through the management API (when reachable) arguments and bindings.
    pub async fn check(&self, amqp: &Amqp) -> Result<CheckReport, TopologyError> {
        let mut report = CheckReport::default();
        let mgmt = amqp.management();
        let mut mgmt_ok = true;
        for d in self.declarations() {
            match d.kind {
                ObjectKind::Exchange | ObjectKind::Queue => {
                    if !passive_exists(amqp, &d).await? {
                        report.findings.push(Finding::Missing {
                            kind: d.kind,
                            name: d.name.clone(),
                        });
                        continue;
                    }
                    if !mgmt_ok {
                        continue;
                    }
                    match diff(&mgmt, &d).await {
                        Ok(diffs) => report.findings.extend(diffs.into_iter().map(
                            |(argument, expected, actual)| Finding::Different {
                                kind: d.kind,
                                name: d.name.clone(),
                                argument,
                                expected,
                                actual,
                            },
                        )),
                        Err(e) => {
                            mgmt_ok = false;
                            report.findings.push(Finding::Unverified {
                                what: format!("arguments and bindings ({e})"),
                            });
                        }
                    }
                }
                ObjectKind::Binding => {
                    if !mgmt_ok {
                        continue;
                    }
                    let (exchange, queue) = split_binding(&d.name);
                    match mgmt.binding_keys(exchange, queue).await {
                        Ok(keys) if keys.contains(&d.type_) => {}
                        Ok(_) => report.findings.push(Finding::Missing {
                            kind: ObjectKind::Binding,
                            name: format!("{} (routing key '{}')", d.name, d.type_),
                        }),
                        Err(e) => {
                            mgmt_ok = false;
                            report.findings.push(Finding::Unverified {
                                what: format!("arguments and bindings ({e})"),
                            });
                        }
                    }
                }
            }
        }
        Ok(report)
    }

    /// Deletes every queue and exchange of this topology (messages included).
    /// For tests and teardown; not used by the fleet.
    pub async fn delete(&self, amqp: &Amqp) -> Result<(), AmqpError> {
        let channel = amqp.channel().await?;
        for d in self.declarations().iter().rev() {
            let r = match d.kind {
                ObjectKind::Queue => channel
                    .queue_delete(d.name.as_str().into(), Default::default())
                    .await
                    .map(|_| ()),
                ObjectKind::Exchange => {
                    channel
                        .exchange_delete(d.name.as_str().into(), Default::default())
                        .await
                }
                ObjectKind::Binding => Ok(()),
            };
            r.map_err(|e| AmqpError::broker(declare_op(d.kind), e))?;
        }
        let _ = channel.close(200, "OK".into()).await;
        Ok(())
    }
}

fn declare_op(kind: ObjectKind) -> &'static str {
    match kind {
        ObjectKind::Exchange => "exchange.declare",
        ObjectKind::Queue => "queue.declare",
        ObjectKind::Binding => "queue.bind",
    }
}

fn split_binding(name: &str) -> (&str, &str) {
    name.split_once(" -> ").unwrap_or((name, name))
}

/// Passive declare on a throw-away channel (a 404 closes the channel).
async fn passive_exists(amqp: &Amqp, d: &Declaration) -> Result<bool, AmqpError> {
    let channel: Channel = amqp.channel().await?;
    let passive = match d.kind {
        ObjectKind::Exchange => channel
            .exchange_declare(
                d.name.as_str().into(),
                ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map(|_| ()),
        _ => channel
            .queue_declare(
                d.name.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map(|_| ()),
    };
    match passive {
        Ok(()) => {
            let _ = channel.close(200, "OK".into()).await;
            Ok(true)
        }
        Err(e) if reply_code(&e) == Some(REPLY_NOT_FOUND) => Ok(false),
        Err(e) => Err(AmqpError::broker(declare_op(d.kind), e)),
    }
}

/// `(argument, expected, actual)` for every difference between `d` and the
/// broker's object, read from the management API.
async fn diff(
    mgmt: &Management,
    d: &Declaration,
) -> Result<Vec<(String, String, String)>, AmqpError> {
    let (kind, actual) = match d.kind {
        ObjectKind::Exchange => match mgmt.exchange(&d.name).await? {
            Some(x) => (x.kind, x.arguments),
            None => return Ok(Vec::new()),
        },
        ObjectKind::Queue => match mgmt.queue(&d.name).await? {
            Some(q) => (q.kind, q.arguments),
            None => return Ok(Vec::new()),
        },
        ObjectKind::Binding => return Ok(Vec::new()),
    };
    let mut out = Vec::new();
    if !kind.is_empty() && kind != d.type_ {
        out.push(("type".to_owned(), d.type_.clone(), kind));
    }
    let expected: std::collections::BTreeMap<String, String> =
        d.arguments.iter().cloned().collect();
    for (k, v) in &expected {
        if k == "x-queue-type" {
            continue; // reported as `type`
        }
        match actual.get(k) {
            Some(a) if show_json(a) == *v => {}
            Some(a) => out.push((k.clone(), v.clone(), show_json(a))),
            None => out.push((k.clone(), v.clone(), "none".to_owned())),
        }
    }
    for (k, a) in &actual {
        if !expected.contains_key(k) {
            out.push((k.clone(), "none".to_owned(), show_json(a)));
        }
    }
    Ok(out)
}

/// Parses RabbitMQ's 406 text: `PRECONDITION_FAILED - inequivalent arg
/// 'x-delivery-limit' for queue 'q' in vhost '/': received the value '20' of
/// type 'long' but current is none` → `(x-delivery-limit, 20, none)`.
fn parse_406(text: &str) -> Option<(String, String, String)> {
    let arg = text
        .split("inequivalent arg '")
        .nth(1)?
        .split('\'')
        .next()?
        .to_owned();
    let expected = text
        .split("received the value '")
        .nth(1)
        .and_then(|s| s.split('\'').next())
        .or_else(|| {
            text.split("received '")
                .nth(1)
                .and_then(|s| s.split('\'').next())
        })
        .unwrap_or("?")
        .to_owned();
    let actual = text
        .split("but current is ")
        .nth(1)
        .map(|s| {
            let s = s.trim();
            s.strip_prefix("the value '")
                .and_then(|v| v.split('\'').next())
                .unwrap_or(s)
                .trim_matches('\'')
                .to_owned()
        })
        .unwrap_or_else(|| "?".to_owned());
    Some((arg, expected, actual))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn topo() -> Topology {
        Topology::new(&TopologySettings {
            prefix: "sf".into(),
            retry_delays_secs: vec![60, 10, 300],
            ..TopologySettings::default()
        })
    }

    #[test]
    fn names_derive_from_the_prefix() {
        let t = topo();
        assert_eq!(t.tasks_exchange, "sf.tasks");
        assert_eq!(t.tasks_queue, "sf.tasks");
        assert_eq!(t.dead_exchange, "sf.dead");
        assert_eq!(t.results_exchange, "sf.results");
        assert_eq!(t.results_stream, "sf.results.stream");
        let tiers: Vec<_> = t.retry_tiers.iter().map(|r| r.queue.as_str()).collect();
        assert_eq!(tiers, ["sf.retry.10s", "sf.retry.60s", "sf.retry.300s"]);
    }

    #[test]
    fn task_queue_has_safe_dead_lettering_and_a_delivery_limit() {
        let t = topo();
        let d = t
            .declarations()
            .into_iter()
            .find(|d| d.name == "sf.tasks" && d.kind == ObjectKind::Queue)
            .unwrap();
        let args: std::collections::BTreeMap<_, _> = d.arguments.into_iter().collect();
        assert_eq!(args["x-queue-type"], "quorum");
        assert_eq!(args["x-dead-letter-strategy"], "at-least-once");
        assert_eq!(args["x-overflow"], "reject-publish");
        assert_eq!(args["x-delivery-limit"], "20");
        assert_eq!(args["x-dead-letter-exchange"], "sf.dead");
        assert!(!args.contains_key("x-max-length"));
    }

    #[test]
    fn shards_are_task_queues_with_the_same_arguments_and_their_own_keys() {
        let t = Topology::new(&TopologySettings {
            prefix: "sf".into(),
            task_shards: 4,
            ..TopologySettings::default()
        });
        assert_eq!(
            t.task_queues(),
            [
                "sf.tasks",
                "sf.tasks.0",
                "sf.tasks.1",
                "sf.tasks.2",
                "sf.tasks.3"
            ]
        );
        let decls = t.declarations();
        let args = |name: &str| {
            decls
                .iter()
                .find(|d| d.name == name && d.kind == ObjectKind::Queue)
                .unwrap()
                .arguments
                .clone()
        };
        assert_eq!(args("sf.tasks.2"), args("sf.tasks"));
        let bind = decls
            .iter()
            .find(|d| d.name == "sf.tasks -> sf.tasks.2")
            .unwrap();
        assert_eq!(bind.type_, "task.2");
        let key = t.routing_key_for("acme/web");
        assert_eq!(
            key,
            format!("task.{}", sandfleet_proto::shard_for("acme/web", 4))
        );
        // Without shards: the one queue, routing key `task`.
        assert_eq!(topo().routing_key_for("acme/web"), "task");
        assert_eq!(topo().task_queues(), ["sf.tasks"]);
    }

    #[test]
    fn retry_tiers_climb_and_stay_on_top() {
        let t = topo();
        assert_eq!(t.retry_tier(1).unwrap().queue, "sf.retry.10s");
        assert_eq!(t.retry_tier(2).unwrap().queue, "sf.retry.60s");
        assert_eq!(t.retry_tier(9).unwrap().queue, "sf.retry.300s");
        assert_eq!(
            t.retry_tier_for(Duration::from_secs(30)).unwrap().queue,
            "sf.retry.60s"
        );
        assert_eq!(
            t.retry_tier_for(Duration::from_secs(3000)).unwrap().queue,
            "sf.retry.300s"
        );
        let empty = Topology::new(&TopologySettings {
            retry_delays_secs: vec![],
            ..Default::default()
        });
        assert!(empty.retry_tier(1).is_none());
    }

    #[test]
    fn broker_406_text_names_the_argument() {
        let t = "PRECONDITION_FAILED - inequivalent arg 'x-delivery-limit' for queue 'sf.tasks' in vhost '/': received the value '20' of type 'long' but current is the value '5' of type 'long'";
        assert_eq!(
            parse_406(t),
            Some(("x-delivery-limit".into(), "20".into(), "5".into()))
        );
        let t = "PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue 'q' in vhost '/': received the value '10' of type 'long' but current is none";
        assert_eq!(
            parse_406(t),
            Some(("x-max-length".into(), "10".into(), "none".into()))
        );
        assert_eq!(parse_406("something else"), None);
    }
}
