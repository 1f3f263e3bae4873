//! What earlier benchmark runs left on the broker.
//!
//! Every run names its queues and exchanges `sfbench-<pid>-...` and deletes
//! them when it ends, but a run that was killed (SIGKILL, a closed terminal,
//! an out-of-memory kill) cannot: its queues and exchanges stay, durable, with
//! whatever messages they held. A run is over when no process has its pid on
//! this machine and no queue of its has a consumer on an open channel. Each
//! benchmark that declares such names [`report`]s what runs that are over left;
//! `sandfleet-bench clean` deletes it. Deleting stays a command of its own:
//! a benchmark running on another machine against the same broker has a pid
//! that means nothing here, and one that only publishes (`producer`) has no
//! consumer to tell it is alive, so an operator decides.

use std::collections::BTreeMap;

use anyhow::Context as _;
use sandfleet_amqp::Amqp;
use sandfleet_settings::AmqpSettings;

/// The prefix of every benchmark name.
pub(crate) const PREFIX: &str = "sfbench-";

/// The run a benchmark name belongs to: `sfbench-<pid>-` and the pid.
fn run_of(name: &str) -> Option<(String, u32)> {
    let rest = name.strip_prefix(PREFIX)?;
    let (pid, _) = rest.split_once('-')?;
    let pid: u32 = pid.parse().ok()?;
    Some((format!("{PREFIX}{pid}-"), pid))
}

/// Whether a process with `pid` runs on this machine (`/proc/<pid>`).
fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Whether the run of `pid` is over as far as this machine can tell: not
/// this process, and no process with that pid (per `alive`).
fn gone(pid: u32, alive: &impl Fn(u32) -> bool) -> bool {
    pid != std::process::id() && !alive(pid)
}

/// The runs whose names should go: over (per `alive`), and no queue of theirs
/// has a live consumer. `queues` is (name, consumers on open channels).
fn stale_runs<'a>(
    queues: impl IntoIterator<Item = (&'a str, usize)>,
    exchanges: impl IntoIterator<Item = &'a str>,
    alive: impl Fn(u32) -> bool,
) -> Vec<String> {
    // run prefix → (pid, consumed)
    let mut runs: BTreeMap<String, (u32, bool)> = BTreeMap::new();
    for (name, consumers) in queues {
        if let Some((run, pid)) = run_of(name) {
            runs.entry(run).or_insert((pid, false)).1 |= consumers > 0;
        }
    }
    for name in exchanges {
        if let Some((run, pid)) = run_of(name) {
            runs.entry(run).or_insert((pid, false));
        }
    }
    runs.into_iter()
        .filter(|(_, (pid, consumed))| !consumed && gone(*pid, &alive))
        .map(|(run, _)| run)
        .collect()
}

/// Says on stderr what runs that are over left on the broker, and how to
/// remove it; run first by the benchmarks that declare `sfbench-` names. A
/// broker without the management API only earns a line saying so.
pub(crate) async fn report(url: &str) {
    match found(url).await {
        Ok(f) if !f.runs.is_empty() => eprintln!(
            "note: {} queue(s) and {} exchange(s) of earlier benchmark runs that did not end cleanly \
             are on the broker ({}); `sandfleet-bench clean` deletes them",
            f.queues.len(),
            f.exchanges.len(),
            f.listed()
        ),
        Ok(_) => {}
        Err(e) => eprintln!("note: not checking for earlier runs' queues: {e}"),
    }
}

/// `sandfleet-bench clean`: deletes the queues and exchanges of benchmark
/// runs that are over (see the module docs) and their kubeconfig files in
/// the temporary directory, or with `--dry-run` only lists them.
#[derive(Debug, clap::Args)]
pub(crate) struct CleanArgs {
    /// Broker URL
    #[arg(
        long,
        env = "AMQP_ADDR",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub(crate) url: String,
    /// List what would be deleted, delete nothing.
    #[arg(long)]
    dry_run: bool,
}

pub(crate) async fn clean(args: CleanArgs) -> anyhow::Result<()> {
    let files = stale_files(&std::env::temp_dir(), alive);
    for file in &files {
        println!("file {}", file.display());
        if !args.dry_run {
            std::fs::remove_file(file).with_context(|| format!("removing {}", file.display()))?;
        }
    }
    let f = found(&args.url).await?;
    for name in f
        .queues
        .iter()
        .map(|q| ("queue", q))
        .chain(f.exchanges.iter().map(|e| ("exchange", e)))
    {
        println!("{} {}", name.0, name.1);
    }
    if args.dry_run {
        println!(
            "{} queue(s) and {} exchange(s) of {} run(s) that are over, {} file(s); nothing deleted (--dry-run)",
            f.queues.len(),
            f.exchanges.len(),
            f.runs.len(),
            files.len(),
        );
        return Ok(());
    }
    for q in &f.queues {
        f.mgmt.delete_queue(q).await?;
    }
    for e in &f.exchanges {
        f.mgmt.delete_exchange(e).await?;
    }
    println!(
        "deleted {} queue(s) and {} exchange(s) of {}, {} file(s)",
        f.queues.len(),
        f.exchanges.len(),
        f.listed(),
        files.len()
    );
    Ok(())
}

/// The files of runs that are over in `dir` (their kubeconfigs, in the
/// temporary directory): named `sfbench-<pid>-...` with no process `pid`.
fn stale_files(dir: &std::path::Path, alive: impl Fn(u32) -> bool) -> Vec<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<_> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter(|e| {
            e.file_name()
                .to_str()
                .and_then(run_of)
                .is_some_and(|(_, pid)| gone(pid, &alive))
        })
        .map(|e| e.path())
        .collect();
    files.sort();
    files
}

/// What runs that are over left: their prefixes and their queues' and
/// exchanges' names.
struct Found {
    mgmt: sandfleet_amqp::Management,
    runs: Vec<String>,
    queues: Vec<String>,
    exchanges: Vec<String>,
}

impl Found {
    fn listed(&self) -> String {
        if self.runs.is_empty() {
            return "no run that is over".into();
        }
        self.runs
            .iter()
            .map(|r| format!("{r}*"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

async fn found(url: &str) -> anyhow::Result<Found> {
    let settings = AmqpSettings {
        url: url.to_owned(),
        ..AmqpSettings::default()
    };
    let mgmt = Amqp::lazy(&settings, "bench")?.management();
    let queues = mgmt.queues_with_prefix(PREFIX).await?;
    let exchanges = mgmt.exchanges_with_prefix(PREFIX).await?;
    let live = mgmt.live_consumers().await?;
    let runs = stale_runs(
        queues
            .iter()
            .map(|q| (q.name.as_str(), live.get(&q.name).copied().unwrap_or(0))),
        exchanges.iter().map(|e| e.name.as_str()),
        alive,
    );
    let of_run = |name: &str| runs.iter().any(|r| name.starts_with(r.as_str()));
    let queues = queues
        .into_iter()
        .map(|q| q.name)
        .filter(|n| of_run(n))
        .collect();
    let exchanges = exchanges
        .into_iter()
        .map(|e| e.name)
        .filter(|n| of_run(n))
        .collect();
    Ok(Found {
        mgmt,
        runs,
        queues,
        exchanges,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_belong_to_the_run_of_their_pid() {
        assert_eq!(
            run_of("sfbench-4242-kube.tasks"),
            Some(("sfbench-4242-".into(), 4242))
        );
        assert_eq!(run_of("sfbench-x-kube"), None);
        assert_eq!(run_of("sfbench-4242"), None);
        assert_eq!(run_of("sandfleet.tasks"), None);
    }

    #[test]
    fn the_files_of_runs_that_are_over_are_found_and_no_others() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "sfbench-10-kubeconfig",
            "sfbench-10-fair-fifo-kubeconfig",
            "sfbench-20-inflight-kubeconfig",
            "sfbench-x-kubeconfig",
            "other-10-kubeconfig",
        ] {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        std::fs::create_dir(dir.path().join("sfbench-10-dir")).unwrap();
        let files: Vec<String> = stale_files(dir.path(), |pid| pid == 20)
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            files,
            ["sfbench-10-fair-fifo-kubeconfig", "sfbench-10-kubeconfig"]
        );
    }

    #[test]
    fn only_runs_that_are_over_and_unconsumed_are_swept() {
        let queues = [
            ("sfbench-10-kube.tasks", 0),
            ("sfbench-10-kube.results", 0),
            // Alive here.
            ("sfbench-20-kube.tasks", 0),
            // Its pid is not here, but a consumer says it runs elsewhere.
            ("sfbench-30-kube.tasks", 0),
            ("sfbench-30-kube.delay", 2),
        ];
        // A run whose queues are gone but whose exchange stayed.
        let exchanges = ["sfbench-10-kube.tasks", "sfbench-40-lib.tasks"];
        let runs = stale_runs(queues, exchanges, |pid| pid == 20);
        assert_eq!(runs, ["sfbench-10-", "sfbench-40-"]);
    }
}
