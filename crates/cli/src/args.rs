//! The command line, as clap derive types. Every subcommand's `--help` ends
//! with examples.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// sandfleet: run fix-attempt sandboxes from a RabbitMQ queue.
#[derive(Debug, Parser)]
#[command(
    name = "sandfleet",
    version,
    about = "Run fix-attempt sandboxes from a RabbitMQ queue: workers, webhook gateway, and the tools operators use.",
    long_about = None,
    after_help = "\
Try it first (needs nothing installed):
  sandfleet demo

Everyday use:
  sandfleet topology apply                      # declare exchanges and queues
  sandfleet worker                              # run a worker (Ctrl-C drains)
  sandfleet enqueue task.json                   # enqueue a task from a file
  sandfleet results tail --follow               # watch results arrive
  sandfleet dlq list                            # what was dead-lettered, and why
  sandfleet replay --from-dlq --dry-run         # what a replay would send
  sandfleet status                              # queues, consumers, workers
  sandfleet results get TASK_ID                 # one task's attempts, steps, log

Configuration: defaults, then the file (--config, or ./sandfleet.toml when it
exists), then SANDFLEET__SECTION__KEY environment variables (for example
SANDFLEET__AMQP__URL), then flags. Flags win.

Exit codes: 0 ok, 1 failure, 2 usage or configuration error,
3 broker unavailable, 4 partial failure (some items failed),
5 topology missing (run `sandfleet topology apply`), 130 interrupted."
)]
pub struct Cli {
    /// Options every subcommand takes.
    #[command(flatten)]
    pub global: GlobalArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Options every subcommand takes.
#[derive(Debug, Clone, Args)]
pub struct GlobalArgs {
    /// Configuration file (TOML). Default: ./sandfleet.toml when it exists.
    #[arg(long, short = 'c', global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Machine-readable output: one JSON object per line on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    /// RabbitMQ URL; overrides `amqp.url` (e.g. amqp://guest:guest@127.0.0.1:5672/%2f).
    #[arg(long, global = true, value_name = "URL")]
    pub amqp_url: Option<String>,
    /// Prefix of exchange and queue names; overrides `topology.prefix`.
    #[arg(long, global = true, value_name = "PREFIX")]
    pub prefix: Option<String>,
    /// Log filter (tracing env-filter syntax); overrides `telemetry.log_filter`.
    #[arg(long, global = true, value_name = "FILTER")]
    pub log: Option<String>,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a worker: consume tasks, run sandboxes, publish results.
    #[command(after_help = "\
Examples:
  sandfleet worker
  SANDFLEET__WORKER__EXECUTOR=kubernetes sandfleet worker --concurrency 8

The first SIGTERM or Ctrl-C drains (in-flight tasks finish, up to
worker.drain_timeout_secs); a second one exits at once.")]
    Worker(WorkerArgs),
    /// Run the webhook gateway (GitHub, GitLab, and the bearer-token task API).
    #[command(after_help = "\
Examples:
  SANDFLEET__GATEWAY__GITHUB_SECRET=... sandfleet gateway --listen 0.0.0.0:8080

Routes: POST /webhooks/github, POST /webhooks/gitlab, POST /v1/tasks,
GET /healthz, /readyz, /metrics.")]
    Gateway(GatewayArgs),
    /// Enqueue one task and print its id once the broker confirmed it.
    #[command(after_help = "\
Examples:
  sandfleet enqueue task.json
  cat task.json | sandfleet enqueue -
  sandfleet enqueue --repo octo-org/octo-repo --commit 3484a3fb \\
      --image alpine:3.20 --step 'build=make' --step 'test=make test'

Values given with --repo, --commit and --ref reach the sandbox as the env vars
SANDFLEET_REPOSITORY, SANDFLEET_COMMIT and SANDFLEET_REF.")]
    Enqueue(EnqueueArgs),
    /// Cancel tasks wherever they are (queued, delayed, running); supersedes are automatic.
    #[command(after_help = "\
Examples:
  sandfleet cancel 0190f3c2-7d1e-7a4b-9c2d-3e4f5a6b7c8d
  sandfleet cancel --reason 'runaway batch' ID1 ID2 ID3

Each task ends with one final `cancelled` result (who and why in it) unless it
finished first; a finished or unknown task is reported and the exit code is 4.")]
    Cancel(CancelArgs),
    /// Re-enqueue failed builds from the dead-letter queue, the results stream or a file.
    #[command(after_help = "\
Examples:
  sandfleet replay --from-dlq --dry-run
  sandfleet replay --from-results --since 2h --repo 'octo-org/*' --outcome failed --rate 5
  sandfleet replay --from-file failed.jsonl --batch incident-42

Each replayed task gets a new id, `replay_of` set to the original build (a
replay of a replay points at the same build), and the idempotency key
replay:<original id>:<batch>. Keys already in the replay ledger (the stream
queue <prefix>.replays) are skipped, so running the same replay twice sends
nothing, also after the replays failed again; pass a new --batch, or --force,
to replay again. --dry-run makes the same checks as a real run and reports
what would fail; it exits as the real run would.")]
    Replay(ReplayArgs),
    /// Read the results stream.
    #[command(subcommand)]
    Results(ResultsCommand),
    /// Inspect and manage the dead-letter queue.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Declare (apply), verify (check) or delete exchanges and queues.
    #[command(subcommand)]
    Topology(TopologyCommand),
    /// Run three sample fix attempts through the whole pipeline in one process.
    #[command(after_help = "\
Examples:
  sandfleet demo                 # in-memory broker, local executor: needs only /bin/sh
  sandfleet demo --amqp-url amqp://guest:guest@127.0.0.1:5672/%2f

The three tasks: one that passes, one whose tests fail, one that times out.")]
    Demo(DemoArgs),
    /// Serve interactive sandbox sessions over HTTP (the sessions service).
    #[command(after_help = "\
Examples:
  sandfleet sessions --tokens-file /var/run/sandfleet-sessions/tokens
  sandfleet sessions --backend local --tokens-file ./tokens --listen 127.0.0.1:8081

Sessions run as Jobs in sandbox.kubernetes.namespace; state lives on them, so
replicas are interchangeable. `--backend local` (sessions.backend) runs them as
child processes of one replica instead: no isolation, no warm pools. Routes:
/v1/sessions[/{id}[/run|/files]], /v1/pools, /healthz, /readyz, /metrics
(docs/sessions.md).")]
    Sessions(crate::commands::sessions::SessionsArgs),
    /// Serve the operator console: overview, results, dead letters, replay.
    #[command(after_help = "\
Examples:
  sandfleet console --listen 127.0.0.1:8070 --worker http://127.0.0.1:9090

Reading is open unless console.read_requires_token; requeue, purge and replay
need a console.tokens entry with role = \"operator\" (docs/console.md).")]
    Console(crate::commands::console::ConsoleArgs),
    /// Open, use and remove sessions from scripts (through the sessions service).
    #[command(subcommand)]
    Session(crate::commands::session::SessionCommand),
    /// An interactive session: type commands, see their output; torn down on exit.
    #[command(after_help = "\
Examples:
  SANDFLEET_SESSIONS_TOKEN=... sandfleet shell --image python:3.12
  sandfleet shell --local --image ignored      # child processes here, no service")]
    Shell(crate::commands::shell::ShellArgs),
    /// Queues, consumers and workers at a glance: depths, in-flight, readiness, breaker.
    #[command(after_help = "\
Examples:
  sandfleet status                                  # queues and the consumers the broker sees
  sandfleet status --worker http://10.0.3.7:9090    # and that worker's /readyz, /metrics, /tasks
  sandfleet status --json | jq .

Queue figures come from the RabbitMQ management API (port 15672 of the amqp.url
host, same credentials); they lag the broker by a few seconds. Every consumer
of the task queue is listed by its connection name (sandfleet-worker@<host>)
with its unacknowledged deliveries, the tasks it holds. Give --worker URL (the
worker's worker.http_addr) for readiness with reasons, breaker state,
in-flight count and the attempts it runs. Exit 0 when every queue exists and
every --worker is ready, 1 otherwise; 3 when the management API does not answer.")]
    Status(StatusArgs),
    /// Work with task files without a broker.
    #[command(subcommand)]
    Task(TaskCommand),
    /// Show and check the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print a shell completion script.
    #[command(after_help = "\
Examples:
  sandfleet completions bash > ~/.local/share/bash-completion/completions/sandfleet
  sandfleet completions zsh > \"${fpath[1]}/_sandfleet\"
  sandfleet completions fish > ~/.config/fish/completions/sandfleet.fish")]
    Completions(CompletionsArgs),
    /// Print the man page (roff), or write one page per command to a directory.
    #[command(after_help = "\
Examples:
  sandfleet man | man -l -
  sandfleet man --out-dir /usr/local/share/man/man1")]
    Man(ManArgs),
}

/// `sandfleet status`.
#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// A worker's HTTP address (its worker.http_addr, e.g. http://10.0.3.7:9090); repeatable.
    #[arg(long = "worker", value_name = "URL")]
    pub workers: Vec<String>,
    /// The management API's base URL (default: http://<amqp host>:15672).
    #[arg(long, value_name = "URL")]
    pub management_url: Option<String>,
}

/// `sandfleet task ...`.
#[derive(Debug, Subcommand)]
pub enum TaskCommand {
    /// Check task files as enqueue would, without publishing; exit 2 listing every problem.
    #[command(after_help = "\
Examples:
  sandfleet task validate task.json
  sandfleet task validate tasks/*.json --json | jq 'select(.valid == false)'
  producer-script | sandfleet task validate -

Checks the size, the JSON, schema_version, the structure, every field rule and
the deadline budget (limits.broker_consumer_timeout_secs): the same checks as
sandfleet enqueue and the gateway. Needs no broker.")]
    Validate(ValidateArgs),
}

/// `sandfleet task validate`.
#[derive(Debug, Clone, Args)]
pub struct ValidateArgs {
    /// Task JSON files; `-` for stdin.
    #[arg(value_name = "FILE", required = true)]
    pub files: Vec<PathBuf>,
}

/// `sandfleet config ...`.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Load and validate the settings; print the effective configuration, secrets hidden.
    #[command(after_help = "\
Examples:
  sandfleet config check
  sandfleet --config prod.toml config check
  SANDFLEET__WORKER__CONCURRENCY=0 sandfleet config check   # exit 2, says why

Exit 0 with the effective settings (TOML; --json for JSON) when they are
valid; exit 2 listing every invalid setting otherwise. Needs no broker.")]
    Check,
}

/// `sandfleet completions`.
#[derive(Debug, Clone, Args)]
pub struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// `sandfleet man`.
#[derive(Debug, Clone, Args)]
pub struct ManArgs {
    /// Write sandfleet.1 and one sandfleet-<command>.1 per subcommand here
    /// instead of printing the main page.
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
}

/// `sandfleet worker`.
#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    /// Tasks run at once; overrides `worker.concurrency`.
    #[arg(long)]
    pub concurrency: Option<u16>,
    /// `local` or `kubernetes`; overrides `worker.executor`.
    #[arg(long)]
    pub executor: Option<String>,
    /// Address of /healthz, /readyz, /metrics; overrides `worker.http_addr`.
    #[arg(long, value_name = "ADDR")]
    pub http_addr: Option<String>,
}

/// `sandfleet gateway`.
#[derive(Debug, Clone, Args)]
pub struct GatewayArgs {
    /// Listen address; overrides `gateway.listen_addr`.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
}

/// `sandfleet cancel`.
#[derive(Debug, Clone, Args)]
pub struct CancelArgs {
    /// The tasks to cancel.
    #[arg(value_name = "TASK_ID", required = true)]
    pub task_ids: Vec<String>,
    /// Why, recorded in each cancelled result.
    #[arg(long, default_value = "cancelled from the command line")]
    pub reason: String,
    /// Who, recorded in each cancelled result (default `cli:$USER`).
    #[arg(long)]
    pub by: Option<String>,
}

/// `sandfleet enqueue`.
#[derive(Debug, Clone, Args)]
pub struct EnqueueArgs {
    /// A task JSON file, or `-` for stdin. Omit it to build a task from flags.
    #[arg(value_name = "FILE", conflicts_with_all = ["repo", "commit", "image", "steps"])]
    pub file: Option<PathBuf>,
    /// Repository (`owner/name`) for a task built from flags.
    #[arg(long, requires_all = ["commit", "steps"])]
    pub repo: Option<String>,
    /// Commit SHA for a task built from flags.
    #[arg(long)]
    pub commit: Option<String>,
    /// Branch or tag.
    #[arg(long = "ref", value_name = "REF")]
    pub git_ref: Option<String>,
    /// Sandbox image (default: the gateway template's image).
    #[arg(long)]
    pub image: Option<String>,
    /// A step as NAME=COMMAND; repeat for several, they run in order.
    #[arg(long = "step", value_name = "NAME=COMMAND")]
    pub steps: Vec<String>,
    /// Timeout of each step built from flags, in seconds.
    #[arg(long, default_value_t = 600)]
    pub step_timeout: u64,
    /// Extra env var for the sandbox as KEY=VALUE; repeatable.
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Overall deadline, in seconds (with the 300 s pending timeout it must
    /// fit `limits.broker_consumer_timeout_secs` less 60 s, or the task is
    /// refused with exit 2).
    #[arg(long, default_value_t = 1200)]
    pub deadline: u64,
    /// Idempotency key (default: the task id).
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Fairness tenant (default: the repository's owner; docs/fairness.md).
    #[arg(long)]
    pub tenant: Option<String>,
    /// Fairness key (default: the repository; docs/fairness.md).
    #[arg(long)]
    pub fairness_key: Option<String>,
}

/// `sandfleet replay`.
#[derive(Debug, Clone, Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["from_dlq", "from_results", "from_file"])))]
pub struct ReplayArgs {
    /// Replay tasks from the dead-letter queue (replayed messages are removed from it).
    #[arg(long)]
    pub from_dlq: bool,
    /// Replay failed builds found in the results stream.
    #[arg(long)]
    pub from_results: bool,
    /// Replay tasks (or results carrying a task) from a JSON-lines file, `-` for stdin.
    #[arg(long, value_name = "FILE")]
    pub from_file: Option<PathBuf>,
    /// Only results finished at or after this time: RFC 3339, or an age like 90m, 2h, 7d.
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Only results finished before this time: RFC 3339, or an age like 30m.
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
    /// Only these repositories: `owner/name` or `owner/*`; repeatable.
    #[arg(long = "repo", value_name = "PATTERN")]
    pub repos: Vec<String>,
    /// Only these final outcomes (default: every outcome but succeeded); repeatable or comma-separated.
    #[arg(long = "outcome", value_name = "OUTCOME", value_delimiter = ',')]
    pub outcomes: Vec<String>,
    /// Only these task ids; repeatable or comma-separated.
    #[arg(long = "task", value_name = "ID", value_delimiter = ',')]
    pub tasks: Vec<uuid::Uuid>,
    /// Replay batch key: part of each replayed task's idempotency key.
    #[arg(long, default_value = "default")]
    pub batch: String,
    /// Replay even when the ledger says this batch already replayed a task.
    #[arg(long)]
    pub force: bool,
    /// List what would be sent; send nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Tasks per second at most (0: no limit).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Stop after this many tasks.
    #[arg(long)]
    pub limit: Option<usize>,
    /// When reading a stream or queue, stop after this long without a message (e.g. 2s).
    #[arg(long, default_value = "2s", value_name = "DURATION")]
    pub idle_timeout: String,
}

/// `sandfleet results ...`.
#[derive(Debug, Subcommand)]
pub enum ResultsCommand {
    /// Print results from the results stream, optionally following new ones.
    #[command(after_help = "\
Examples:
  sandfleet results tail                       # the latest results, then stop
  sandfleet results tail --follow              # and keep printing new ones
  sandfleet results tail -n 20 --outcome failed  # the last 20 failures still retained
  sandfleet results tail --task 0192f0c4-...   # one task's attempts
  sandfleet results tail --since 1h --outcome failed --repo 'octo-org/*'
  sandfleet results tail --from first --json | jq .outcome")]
    Tail(TailArgs),
    /// Show one task: every attempt, its steps and the log tail.
    #[command(after_help = "\
Examples:
  sandfleet results get 0192f0c4-...            # what the stream holds about it
  sandfleet results get 0192f0c4-... --follow   # wait for its final result
  sandfleet results get 0192f0c4-... --json | jq .steps

Reads the results stream from its start (or --since). Exit 0 when results
were found, 1 when the stream holds none for the task (without --follow).")]
    Get(GetArgs),
}

/// `sandfleet results tail`.
#[derive(Debug, Clone, Args)]
pub struct TailArgs {
    /// Where to start: `first`, `last`, `next`, or a numeric stream offset
    /// (default `last`; with --last, `first`).
    #[arg(long, conflicts_with = "since")]
    pub from: Option<String>,
    /// Start at this time: RFC 3339, or an age like 90m, 2h, 7d.
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Keep printing new results until interrupted.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Only these outcomes; repeatable or comma-separated.
    #[arg(long = "outcome", value_delimiter = ',')]
    pub outcomes: Vec<String>,
    /// Only these repositories (`owner/name` or `owner/*`); repeatable.
    #[arg(long = "repo", value_name = "PATTERN")]
    pub repos: Vec<String>,
    /// Only these task ids; repeatable or comma-separated.
    #[arg(long = "task", value_name = "ID", value_delimiter = ',')]
    pub tasks: Vec<uuid::Uuid>,
    /// Only final results (no `retrying` attempts).
    #[arg(long)]
    pub final_only: bool,
    /// Print only the last N matching results (read from the stream's start,
    /// or --since/--from, up to now); with --follow, then the new ones.
    #[arg(long = "last", short = 'n', value_name = "N")]
    pub last: Option<usize>,
    /// Stop after printing this many results.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Without --follow: stop after this long without a message (with
    /// --last: this long without one means caught up).
    #[arg(long, default_value = "2s", value_name = "DURATION")]
    pub idle_timeout: String,
}

/// `sandfleet results get`.
#[derive(Debug, Clone, Args)]
pub struct GetArgs {
    /// The task's id.
    #[arg(value_name = "TASK_ID")]
    pub task: uuid::Uuid,
    /// Keep reading until the task's final result arrives.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Read from this time on instead of the stream's start: RFC 3339, or an age like 2h.
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Lines of the final attempt's log to show (0: none).
    #[arg(long, default_value_t = 40, value_name = "N")]
    pub log_lines: usize,
    /// Without --follow: stop after this long without a message.
    #[arg(long, default_value = "2s", value_name = "DURATION")]
    pub idle_timeout: String,
}

/// `sandfleet dlq ...`.
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Show dead-lettered tasks with their reasons.
    #[command(after_help = "\
Examples:
  sandfleet dlq list
  sandfleet dlq list --json | jq -r .reason")]
    List(DlqListArgs),
    /// Move dead-lettered tasks back to the task queue (same id, next attempt number).
    #[command(after_help = "\
Examples:
  sandfleet dlq requeue --task 0192f0c4-...
  sandfleet dlq requeue --task raw-3f2a9c1e8b7d     # a message without a task id
  sandfleet dlq requeue --all

The attempt number is raised by one, not reset: the task runs in a fresh
sandbox, its earlier attempts stay in the results, and its retry budget
(retry.max_attempts) counts from there.")]
    Requeue(DlqRequeueArgs),
    /// Delete every message in the dead-letter queue.
    #[command(after_help = "\
Examples:
  sandfleet dlq purge            # asks for confirmation
  sandfleet dlq purge --yes")]
    Purge(DlqPurgeArgs),
}

/// `sandfleet dlq list`.
#[derive(Debug, Clone, Args)]
pub struct DlqListArgs {
    /// Show at most this many messages.
    #[arg(long, short = 'n', default_value_t = 100)]
    pub limit: usize,
}

/// `sandfleet dlq requeue`.
#[derive(Debug, Clone, Args)]
#[command(group(clap::ArgGroup::new("selection").required(true).args(["tasks", "all"])))]
pub struct DlqRequeueArgs {
    /// Task ids, or the raw-<digest> handles `dlq list` shows for messages
    /// without one; repeatable or comma-separated.
    #[arg(long = "task", value_name = "ID", value_delimiter = ',')]
    pub tasks: Vec<String>,
    /// Requeue every dead-lettered task.
    #[arg(long)]
    pub all: bool,
}

/// `sandfleet dlq purge`.
#[derive(Debug, Clone, Args)]
pub struct DlqPurgeArgs {
    /// Do not ask for confirmation.
    #[arg(long, short = 'y')]
    pub yes: bool,
}

/// `sandfleet topology ...`.
#[derive(Debug, Subcommand)]
pub enum TopologyCommand {
    /// Declare every exchange, queue and binding (idempotent).
    Apply,
    /// Verify that they exist with the expected arguments; exit 1 when not.
    Check,
    /// Delete every exchange and queue of the prefix (and its replay ledger).
    #[command(after_help = "\
Examples:
  sandfleet --prefix ci-staging topology delete            # asks: type the prefix
  sandfleet --prefix ci-staging topology delete --yes
  sandfleet --prefix ci-staging topology delete --yes --force

Without --force, nothing is deleted while any queue holds messages (tasks,
dead letters, results, replay records); the refusal lists them (exit 1).
Bindings of your own queues to <prefix>.results go with that exchange.")]
    Delete(TopologyDeleteArgs),
}

/// `sandfleet topology delete`.
#[derive(Debug, Clone, Args)]
pub struct TopologyDeleteArgs {
    /// Do not ask for confirmation.
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// Delete queues that still hold messages, with their messages.
    #[arg(long)]
    pub force: bool,
}

/// `sandfleet demo`.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Seconds the "times out" sample's step may run before it is killed.
    #[arg(long, default_value_t = 2)]
    pub timeout_secs: u64,
}
