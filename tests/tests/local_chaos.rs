//! SIGKILL chaos on the local executor: 240 tasks through two worker
//! processes on the real RabbitMQ while one of them is SIGKILLed every 2–5 s
//! and restarted. Every run of a step appends `start <task> <pid>` and
//! `end <task> <pid>` to a shared file outside the workspaces, and before it
//! starts it looks for a run of the same task that is still alive (by its
//! pid's `/proc` entry and environment), writing `overlap` when it finds one.
//! Asserts: 0 lost, 0 tasks with two different final outcomes, 0 concurrent
//! runs of one task, no process of any run alive at the end, and 0 run
//! directories left in the work dir once the last workers are SIGKILLed too,
//! with sandboxes running and no restart to sweep after them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use sandfleet_e2e::{Env, WorkerProc, task};
use sandfleet_proto::Outcome;

const BIN: &str = env!("CARGO_BIN_EXE_sandfleet-test-worker");
const TASKS: usize = 240;

/// The step: check for a live earlier run of this task, record the start,
/// work a while, record the end. Values arrive as env vars (MARKERS and the
/// task id); the sleep is a number spliced by the test.
fn step(sleep: &str) -> String {
    format!(
        r#"m="$MARKERS"; k="$SANDFLEET_TASK_ID"
for p in $(sed -n "s/^start $k \([0-9]*\)$/\1/p" "$m" 2>/dev/null); do
  s=$(cut -d' ' -f3 /proc/"$p"/stat 2>/dev/null) || s=
  case "$s" in
    ''|Z|X) ;;
    *) if tr '\0' '\n' <"/proc/$p/environ" 2>/dev/null | grep -qx "SANDFLEET_TASK_ID=$k"; then
         echo "overlap $k $p $$" >>"$m"
       fi ;;
  esac
done
echo "start $k $$" >>"$m"
sleep {sleep}
echo "end $k $$" >>"$m""#
    )
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !matches!(
            s.rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next()),
            Some("Z" | "X")
        )
    })
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_chaos_sigkill_two_workers_no_lost_no_double_runs_no_leftovers() {
    let started = Instant::now();
    let scratch = tempfile::tempdir().unwrap();
    let work_dir = scratch.path().join("runs");
    let markers = scratch.path().join("markers.log");
    std::fs::write(&markers, "").unwrap();
    let env = Env::new("localchaos", BIN, false, |s| {
        s.worker.concurrency = 8;
        s.worker.drain_timeout_secs = 1;
        s.telemetry.log_filter = "warn".into();
        s.sandbox.local.work_dir = Some(work_dir.display().to_string());
    })
    .await
    .unwrap();

    let mut workers: Vec<WorkerProc> = vec![
        env.spawn_worker("w0-0", |_| {}).unwrap(),
        env.spawn_worker("w1-0", |_| {}).unwrap(),
    ];
    for w in &workers {
        w.wait_ready(200, Duration::from_secs(30)).await.unwrap();
    }

    let sleeps = ["0.5", "1", "1.5", "2", "3"];
    let tasks: Vec<_> = (0..TASKS)
        .map(|i| {
            let mut t = task(&step(sleeps[i % sleeps.len()]));
            t.sandbox
                .env
                .insert("MARKERS".into(), markers.display().to_string());
            t
        })
        .collect();
    for chunk in tasks.chunks(60) {
        for r in futures::future::join_all(chunk.iter().map(|t| env.publish(t))).await {
            r.unwrap();
        }
    }

    let done = |e: &Env| {
        let finals: HashSet<_> = e
            .results()
            .iter()
            .filter(|r| r.is_final)
            .map(|r| r.task_id)
            .collect();
        finals.len() + e.dead_letters().len()
    };
    // A kill every 2–5 s (a fixed cycle, so the run is reproducible),
    // alternating between the two workers; the killed one is restarted at once.
    let intervals = [2000u64, 3500, 5000, 2500, 4000, 3000];
    let mut kills = 0usize;
    let deadline = Instant::now() + Duration::from_secs(240);
    while done(&env) < TASKS && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(intervals[kills % intervals.len()])).await;
        let slot = kills % 2;
        workers[slot].kill9().unwrap();
        kills += 1;
        workers[slot] = env
            .spawn_worker(&format!("w{slot}-{kills}"), |_| {})
            .unwrap();
    }
    env.until("every task accounted for", Duration::from_secs(60), |e| {
        done(e) >= TASKS
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}; worker logs:\n{}\n{}",
            workers[0].log_tail(),
            workers[1].log_tail()
        )
    });
    let finished_in = started.elapsed();
    let history = env.history();
    let report = history.check();

    // The last workers die the same way, each with sandboxes running and no
    // restart to sweep after them: nothing of theirs may stay behind.
    let tail: Vec<_> = (0..6)
        .map(|_| {
            let mut t = task(&step("120"));
            t.sandbox
                .env
                .insert("MARKERS".into(), markers.display().to_string());
            t
        })
        .collect();
    for t in &tail {
        env.publish(t).await.unwrap();
    }
    let tail_ids: Vec<String> = tail.iter().map(|t| t.id.to_string()).collect();
    env.until("the last sandboxes run", Duration::from_secs(30), |_| {
        let text = std::fs::read_to_string(&markers).unwrap_or_default();
        tail_ids
            .iter()
            .all(|id| text.contains(&format!("start {id} ")))
    })
    .await
    .unwrap();
    assert!(!entries(&work_dir).is_empty(), "runs in flight");
    for w in &mut workers {
        w.kill9().unwrap();
    }
    let text = std::fs::read_to_string(&markers).unwrap();
    let mut starts: HashMap<&str, Vec<u32>> = HashMap::new();
    let mut ends = 0usize;
    let mut overlaps = Vec::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split(' ').collect();
        match words[..] {
            ["start", task, pid] => starts.entry(task).or_default().push(pid.parse().unwrap()),
            ["end", _, _] => ends += 1,
            ["overlap", ..] => overlaps.push(line.to_owned()),
            _ => panic!("unexpected marker line {line:?}"),
        }
    }
    let pids: Vec<u32> = starts.values().flatten().copied().collect();
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(15)
        && (pids.iter().any(|p| alive(*p)) || !entries(&work_dir).is_empty())
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let survivors: Vec<u32> = pids.iter().copied().filter(|p| alive(*p)).collect();
    let leftovers = entries(&work_dir);

    let reruns = starts.values().filter(|v| v.len() > 1).count();
    eprintln!(
        "local chaos: {TASKS} tasks, {kills} SIGKILLs, {} runs started ({} ended, {reruns} tasks re-run after a kill), \
         {} overlapping runs, {} results ({} duplicate final deliveries), {} dead letters, \
         {} surviving processes, {} leftover entries in the work dir, all final after {finished_in:?}",
        pids.len(),
        ends,
        overlaps.len(),
        history.results.len(),
        report.duplicate_final_deliveries,
        history.dead.len(),
        survivors.len(),
        leftovers.len(),
    );
    assert!(kills >= 4, "the workers were killed repeatedly ({kills})");
    assert!(reruns > 0, "kills interrupted running sandboxes");
    assert_eq!(report.lost, Vec::<uuid::Uuid>::new(), "lost tasks");
    assert!(report.conflicting_finals.is_empty(), "{report:?}");
    assert!(history.dead.is_empty(), "dead letters: {:?}", history.dead);
    assert_eq!(report.finished, TASKS);
    assert!(
        history
            .results
            .iter()
            .filter(|r| r.is_final)
            .all(|r| r.outcome == Outcome::Succeeded),
        "every task succeeded"
    );
    assert_eq!(starts.len(), TASKS + tail.len(), "every task ran");
    assert!(
        overlaps.is_empty(),
        "concurrent runs of one task: {overlaps:#?}"
    );
    assert!(
        survivors.is_empty(),
        "processes of killed sandboxes alive: {survivors:?}"
    );
    assert!(leftovers.is_empty(), "left in the work dir: {leftovers:?}");
    drop(workers);
    env.cleanup().await.unwrap();
}

/// Issue 11: after a forced exit (a second SIGTERM ends the worker at once,
/// with `std::process::exit`, no destructors) the local sandbox kept running
/// and its run directory stayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_exit_takes_the_local_sandbox_and_its_run_dir_with_it() {
    let scratch = tempfile::tempdir().unwrap();
    let work_dir = scratch.path().join("runs");
    let markers = scratch.path().join("markers.log");
    std::fs::write(&markers, "").unwrap();
    let env = Env::new("forcedexit", BIN, false, |s| {
        // Long enough that the drain is still waiting at the second signal.
        s.worker.drain_timeout_secs = 60;
        s.sandbox.local.work_dir = Some(work_dir.display().to_string());
    })
    .await
    .unwrap();
    let mut w = env.spawn_worker("w", |_| {}).unwrap();
    w.wait_ready(200, Duration::from_secs(30)).await.unwrap();
    let mut t = task(&step("300"));
    t.sandbox
        .env
        .insert("MARKERS".into(), markers.display().to_string());
    env.publish(&t).await.unwrap();
    let start = format!("start {} ", t.id);
    env.until("the sandbox runs", Duration::from_secs(30), |_| {
        std::fs::read_to_string(&markers).is_ok_and(|m| m.contains(&start))
    })
    .await
    .unwrap();
    let text = std::fs::read_to_string(&markers).unwrap();
    let pid: u32 = text
        .lines()
        .find_map(|l| l.strip_prefix(&start))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(!entries(&work_dir).is_empty());
    w.term().unwrap();
    w.wait_ready(503, Duration::from_secs(10)).await.unwrap();
    w.term().unwrap();
    let status = w.wait_exit(Duration::from_secs(10)).await.unwrap();
    assert_eq!(status.code(), Some(130), "a forced exit");
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(15)
        && (alive(pid) || !entries(&work_dir).is_empty())
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!alive(pid), "the step outlived its worker");
    assert_eq!(entries(&work_dir), Vec::<String>::new(), "left behind");
    drop(w);
    env.cleanup().await.unwrap();
}
