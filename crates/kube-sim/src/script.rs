//! Pod scripts: what the simulated kubelet does with a pod instead of (or around)
//! running its container command.

use std::sync::Mutex;
use std::time::Duration;

use serde_json::Value;

use crate::selector::LabelSelector;

/// The pod-template annotation that picks a script: `oom`, `never-schedule`,
/// `image-pull-backoff`, `evict`, `node-lost`, `instant`, `hang` or `run`.
pub const SCRIPT_ANNOTATION: &str = "kube-sim.sandfleet.dev/script";
/// Annotation with the delay in milliseconds for `evict` and `node-lost` (default 200).
pub const AFTER_MS_ANNOTATION: &str = "kube-sim.sandfleet.dev/after-ms";
/// Annotation with the exit code for `instant` (default 0).
pub const EXIT_CODE_ANNOTATION: &str = "kube-sim.sandfleet.dev/exit-code";

/// What the simulated kubelet does with a pod.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum PodScript {
    /// Run the container's command locally (the default).
    #[default]
    Run,
    /// Go Running and terminate at once with this exit code, without a process
    /// (cheap, for benchmarks). The log is empty.
    Instant {
        /// The container's exit code.
        exit_code: i32,
    },
    /// Go Running, then terminate with reason `OOMKilled` and exit code 137.
    OomKill,
    /// Stay Pending forever with `PodScheduled=False`, reason `Unschedulable`.
    NeverSchedule,
    /// Stay Pending forever, container waiting with `ErrImagePull`, then
    /// `ImagePullBackOff`.
    ImagePullBackOff,
    /// Run the command; `after` it started, kill it and fail the pod with reason
    /// `Evicted` and a `DisruptionTarget` condition.
    Evict {
        /// Time from container start to eviction.
        after: Duration,
    },
    /// Run the command; `after` it started, the node is lost: the process dies, the
    /// pod gets `DisruptionTarget`, phase `Failed` with reason `NodeLost`, and is
    /// deleted.
    NodeLost {
        /// Time from container start to node loss.
        after: Duration,
    },
    /// Go Running and never finish (until deleted).
    Hang,
}

impl PodScript {
    /// The script named by the pod's annotations, if any.
    fn from_annotations(pod: &Value) -> Option<Self> {
        let ann = pod.pointer("/metadata/annotations")?;
        let get = |k: &str| ann.get(k).and_then(Value::as_str);
        let after = Duration::from_millis(
            get(AFTER_MS_ANNOTATION)
                .and_then(|v| v.parse().ok())
                .unwrap_or(200),
        );
        Some(match get(SCRIPT_ANNOTATION)? {
            "oom" => Self::OomKill,
            "never-schedule" => Self::NeverSchedule,
            "image-pull-backoff" => Self::ImagePullBackOff,
            "evict" => Self::Evict { after },
            "node-lost" => Self::NodeLost { after },
            "hang" => Self::Hang,
            "instant" => Self::Instant {
                exit_code: get(EXIT_CODE_ANNOTATION)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
            },
            _ => Self::Run,
        })
    }
}

/// Scripts registered with [`crate::KubeSim::script_pods`].
#[derive(Default)]
pub(crate) struct Scripts {
    rules: Mutex<Vec<(LabelSelector, PodScript)>>,
}

impl Scripts {
    pub(crate) fn add(&self, selector: LabelSelector, script: PodScript) {
        self.lock().push((selector, script));
    }

    /// The most recently registered matching rule wins; then the annotation; then Run.
    pub(crate) fn resolve(&self, pod: &Value) -> PodScript {
        let from_rules = self
            .lock()
            .iter()
            .rev()
            .find(|(sel, _)| sel.matches_object(pod))
            .map(|(_, s)| s.clone());
        from_rules
            .or_else(|| PodScript::from_annotations(pod))
            .unwrap_or_default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(LabelSelector, PodScript)>> {
        self.rules.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rules_beat_annotations_and_later_rules_win() {
        let s = Scripts::default();
        let pod = json!({"metadata": {
            "labels": {"app": "x"},
            "annotations": {SCRIPT_ANNOTATION: "instant", EXIT_CODE_ANNOTATION: "4"},
        }});
        assert_eq!(s.resolve(&pod), PodScript::Instant { exit_code: 4 });
        s.add(LabelSelector::parse("app=x").unwrap(), PodScript::OomKill);
        s.add(LabelSelector::parse("app").unwrap(), PodScript::Hang);
        assert_eq!(s.resolve(&pod), PodScript::Hang);
        assert_eq!(s.resolve(&json!({})), PodScript::Run);
    }
}
