//! Watches through kube's `runtime::watcher`, including recovery from 410 Expired.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{NS, client, shell_job, start};
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, PostParams, WatchEvent, WatchParams};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use sandfleet_kube_sim::{FaultAction, FaultRule};

/// Collects watcher events until `done` holds for the Job named `name`.
async fn watch_until(
    stream: impl futures::Stream<Item = Result<Event<Job>, watcher::Error>>,
    name: &str,
    done: impl Fn(&Job) -> bool,
) -> Vec<String> {
    let mut seen = Vec::new();
    let mut stream = std::pin::pin!(stream);
    let deadline = tokio::time::sleep(Duration::from_secs(20));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            () = &mut deadline => panic!("watch did not see {name} finish; saw {seen:?}"),
            ev = stream.next() => match ev.expect("stream ended") {
                Ok(Event::Apply(j) | Event::InitApply(j)) if j.metadata.name.as_deref() == Some(name) => {
                    seen.push("apply".to_owned());
                    if done(&j) { return seen; }
                }
                Ok(Event::Init) => seen.push("init".to_owned()),
                Ok(Event::InitDone) => seen.push("init-done".to_owned()),
                Ok(_) => {}
                Err(e) => seen.push(format!("error: {e}")),
            }
        }
    }
}

fn is_complete(j: &Job) -> bool {
    common::condition(j, "Complete").is_some_and(|c| c.0 == "True")
}

#[tokio::test]
async fn watcher_sees_job_through_to_completion() {
    let sim = start().await;
    let jobs: Api<Job> = Api::namespaced(client(&sim).await, NS);
    let stream = watcher::watcher(
        jobs.clone(),
        watcher::Config::default().labels("app=sim-test"),
    );
    let create = async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        jobs.create(&PostParams::default(), &shell_job("w1", "true"))
            .await
            .unwrap();
    };
    let (seen, ()) = tokio::join!(watch_until(stream, "w1", is_complete), create);
    assert!(seen.contains(&"init-done".to_owned()), "{seen:?}");
    let log = sim.request_log();
    let watch = log
        .iter()
        .find(|r| r.verb() == "watch")
        .expect("a watch request");
    assert_eq!(
        watch.query_param("labelSelector").as_deref(),
        Some("app=sim-test")
    );
}

#[tokio::test]
async fn watcher_recovers_from_410_by_relisting() {
    let sim = start().await;
    let jobs: Api<Job> = Api::namespaced(client(&sim).await, NS);
    sim.faults()
        .inject(FaultRule::new("GET", "/jobs", FaultAction::WatchGone).times(2));
    let stream = watcher::watcher(jobs.clone(), watcher::Config::default()).default_backoff();
    let create = async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        jobs.create(&PostParams::default(), &shell_job("w2", "true"))
            .await
            .unwrap();
    };
    let (seen, ()) = tokio::join!(watch_until(stream, "w2", is_complete), create);
    assert!(seen.iter().any(|s| s.starts_with("error")), "{seen:?}");
    let lists = sim
        .request_log()
        .iter()
        .filter(|r| r.verb() == "list")
        .count();
    assert!(
        lists >= 2,
        "the watcher re-listed after 410 ({lists} lists)"
    );
}

#[tokio::test]
async fn raw_watch_replays_from_resource_version_and_filters_labels() {
    let sim = start().await;
    let jobs: Api<Job> = Api::namespaced(client(&sim).await, NS);
    let first = jobs
        .create(&PostParams::default(), &shell_job("r1", "true"))
        .await
        .unwrap();
    let rv = first.metadata.resource_version.unwrap();
    let mut other = shell_job("r2", "true");
    other.metadata.labels = Some([("app".to_owned(), "other".to_owned())].into());
    jobs.create(&PostParams::default(), &other).await.unwrap();

    // From r1's version: r1's own ADDED is not replayed; r2 is filtered out by label.
    let wp = WatchParams::default().labels("app=sim-test").timeout(1);
    let events: Vec<_> = jobs
        .watch(&wp, &rv)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    for e in &events {
        match e {
            WatchEvent::Added(j) | WatchEvent::Modified(j) | WatchEvent::Deleted(j) => {
                assert_eq!(j.metadata.name.as_deref(), Some("r1"));
            }
            WatchEvent::Bookmark(_) => {}
            WatchEvent::Error(e) => panic!("unexpected error {e:?}"),
        }
    }
    assert!(
        !events.iter().any(|e| matches!(e, WatchEvent::Added(_))),
        "no ADDED replayed at or before the start version"
    );
}

#[tokio::test]
async fn label_filtered_watch_sends_deleted_when_labels_stop_matching() {
    use kube::api::{Patch, PatchParams};
    let sim = start().await;
    let jobs: Api<Job> = Api::namespaced(client(&sim).await, NS);
    let job = jobs
        .create(&PostParams::default(), &shell_job("lbl", "true"))
        .await
        .unwrap();
    let rv = job.metadata.resource_version.unwrap();
    jobs.patch(
        "lbl",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"metadata": {"labels": {"app": "moved"}}})),
    )
    .await
    .unwrap();
    let wp = WatchParams::default().labels("app=sim-test").timeout(1);
    let events: Vec<_> = jobs
        .watch(&wp, &rv)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let last = events
        .iter()
        .rfind(|e| !matches!(e, WatchEvent::Bookmark(_)))
        .expect("an event");
    match last {
        WatchEvent::Deleted(j) => {
            assert_eq!(j.metadata.labels.as_ref().unwrap()["app"], "moved");
        }
        other => panic!("expected DELETED, got {other:?}"),
    }
}

#[tokio::test]
async fn streaming_list_sends_initial_events_then_bookmark() {
    let sim = start().await;
    let jobs: Api<Job> = Api::namespaced(client(&sim).await, NS);
    jobs.create(&PostParams::default(), &shell_job("pre", "true"))
        .await
        .unwrap();
    let stream = watcher::watcher(jobs.clone(), watcher::Config::default().streaming_lists());
    let mut stream = std::pin::pin!(stream);
    let mut seen = Vec::new();
    while let Some(ev) = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("watcher event in time")
    {
        match ev.unwrap() {
            Event::Init => seen.push("init".to_owned()),
            Event::InitApply(j) => seen.push(j.metadata.name.unwrap()),
            Event::InitDone => {
                seen.push("done".to_owned());
                break;
            }
            Event::Apply(_) | Event::Delete(_) => {}
        }
    }
    assert_eq!(seen, ["init", "pre", "done"]);
    let watch = sim
        .request_log()
        .into_iter()
        .find(|r| r.verb() == "watch")
        .unwrap();
    assert_eq!(
        watch.query_param("sendInitialEvents").as_deref(),
        Some("true")
    );
}

#[tokio::test]
async fn bookmarks_are_sent_when_allowed() {
    let sim = sandfleet_kube_sim::KubeSim::start(sandfleet_kube_sim::SimOptions {
        bookmark_interval: Duration::from_millis(100),
        ..Default::default()
    })
    .await
    .unwrap();
    let jobs: Api<Job> = Api::namespaced(client(&sim).await, NS);
    let wp = WatchParams {
        bookmarks: true,
        ..WatchParams::default().timeout(1)
    };
    let events: Vec<_> = jobs
        .watch(&wp, "0")
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert!(events.iter().any(|e| matches!(e, WatchEvent::Bookmark(_))));
    let wp = WatchParams {
        bookmarks: false,
        ..WatchParams::default().timeout(1)
    };
    let events: Vec<_> = jobs
        .watch(&wp, "0")
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert!(!events.iter().any(|e| matches!(e, WatchEvent::Bookmark(_))));
}

#[tokio::test]
async fn a_410_error_mid_stream_ends_the_watch() {
    let sim = start().await;
    let jobs: Api<Job> = Api::namespaced(client(&sim).await, NS);
    sim.faults().inject(
        FaultRule::new(
            "GET",
            "/jobs",
            FaultAction::WatchGoneAfter(Duration::from_millis(300)),
        )
        .times(1),
    );
    let wp = WatchParams::default().timeout(5);
    let started = std::time::Instant::now();
    let mut stream = std::pin::pin!(jobs.watch(&wp, "0").await.unwrap());
    jobs.create(&PostParams::default(), &shell_job("mid", "true"))
        .await
        .unwrap();
    let mut saw_added = false;
    let mut saw_gone = false;
    while let Some(ev) = stream.try_next().await.unwrap() {
        match ev {
            WatchEvent::Added(_) => saw_added = true,
            WatchEvent::Error(e) => {
                assert_eq!(e.code, 410);
                saw_gone = true;
            }
            _ => {}
        }
    }
    assert!(saw_added && saw_gone, "added {saw_added}, gone {saw_gone}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "ended by the fault, not the timeout"
    );
}
