//! Garbage collection of orphaned sandfleet Jobs: which ones to delete is a
//! pure decision ([`orphans`]); the executor lists and deletes
//! ([`super::KubeExecutor::collect_garbage`]).

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::batch::v1::Job;

use super::to_chrono;

/// What the collector needs to know about a Job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobFacts {
    /// The Job's name.
    pub name: String,
    /// When it was created.
    pub created: Option<DateTime<Utc>>,
    /// When it finished (`Complete` or `Failed`), if it did.
    pub finished: Option<DateTime<Utc>>,
}

impl JobFacts {
    /// Reads the facts off a Job.
    pub fn of(job: &Job) -> Option<JobFacts> {
        let name = job.metadata.name.clone()?;
        let created = job
            .metadata
            .creation_timestamp
            .as_ref()
            .and_then(|t| to_chrono(&t.0));
        let status = job.status.as_ref();
        let finished = status
            .and_then(|s| s.completion_time.as_ref())
            .and_then(|t| to_chrono(&t.0))
            .or_else(|| {
                status
                    .and_then(|s| s.conditions.as_ref())?
                    .iter()
                    .find(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")
                    .map(|c| {
                        c.last_transition_time
                            .as_ref()
                            .and_then(|t| to_chrono(&t.0))
                    })
                    .map(|t| t.unwrap_or(DateTime::<Utc>::MIN_UTC))
            });
        Some(JobFacts {
            name,
            created,
            finished,
        })
    }
}

/// The Jobs to delete: not in flight on this worker, and either finished for
/// at least `finished_grace` (past the Job's TTL: no unsettled delivery may
/// still come back to adopt it) or older than `max_age` (nobody will ever
/// come back for it).
pub fn orphans(
    jobs: &[JobFacts],
    in_flight: &HashSet<String>,
    now: DateTime<Utc>,
    finished_grace: Duration,
    max_age: Duration,
) -> Vec<String> {
    let older = |t: Option<DateTime<Utc>>, d: Duration| {
        t.is_some_and(|t| {
            now.signed_duration_since(t)
                .to_std()
                .is_ok_and(|age| age >= d)
        })
    };
    jobs.iter()
        .filter(|j| !in_flight.contains(&j.name))
        .filter(|j| older(j.finished, finished_grace) || older(j.created, max_age))
        .map(|j| j.name.clone())
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn finished_and_ancient_jobs_go_in_flight_ones_stay() {
        let now = Utc::now();
        let ago = |s: i64| Some(now - chrono::Duration::seconds(s));
        let jobs = vec![
            JobFacts {
                name: "done-long-ago".into(),
                created: ago(900),
                finished: ago(600),
            },
            JobFacts {
                name: "done-just-now".into(),
                created: ago(900),
                finished: ago(5),
            },
            JobFacts {
                name: "running".into(),
                created: ago(100),
                finished: None,
            },
            JobFacts {
                name: "ancient-running".into(),
                created: ago(100_000),
                finished: None,
            },
            JobFacts {
                name: "mine-finished".into(),
                created: ago(900),
                finished: ago(600),
            },
        ];
        let mine = HashSet::from(["mine-finished".to_owned()]);
        let picked = orphans(
            &jobs,
            &mine,
            now,
            Duration::from_secs(60),
            Duration::from_secs(86_400),
        );
        assert_eq!(picked, ["done-long-ago", "ancient-running"]);
    }
}
