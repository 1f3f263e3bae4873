//! Warm pool members on Kubernetes: create one, mark it idle once it runs,
//! claim it with a conditional update, hand it a session's values through
//! exec, and delete it conditionally. The decisions (which, when) are in
//! [`crate::session::pool`]; this is the I/O.

use std::time::Duration;

use kube::api::{AttachParams, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use serde_json::json;

use super::{KubeSessions, SessionMeta, Target, api_error, pod};
use crate::session::pool::{
    ANNOTATION_CLAIMED_AT, ANNOTATION_HANDOVER, ANNOTATION_POD, HANDOVER_STDIN, LABEL_GENERATION,
    LABEL_POOL, LABEL_POOL_STATE, LABEL_SLOT, LABEL_TEMPLATE, MemberState, NewMember, PoolTemplate,
};
use crate::session::script;
use crate::session::{SessionError, SessionId, SessionSpec};

/// How a claim attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// The member is this session's now.
    Claimed,
    /// Another replica (or the pool manager) changed it first: try the next.
    Lost,
}

/// How long a check of a claimed member may take, its exec included: a
/// `test -e` in the sandbox. A check that hangs (a slow API server, a stuck
/// exec) is given up, so it cannot hold the member unchecked for the
/// file-transfer wait; the pool manager checks again on its next tick.
pub const CHECK_WAIT: Duration = Duration::from_secs(10);

/// The most a claimer reads of a member's stdout while it waits for the
/// answer to its hand-over.
const ANSWER_LIMIT: u64 = 64 * 1024;

/// How long a promoter waits for a new member's idle loop to say how it
/// takes a claim, after the pod runs.
const LOOP_START_WAIT: Duration = Duration::from_secs(3);

/// How long past the pool's max age an idle member's own idle loop waits
/// before it exits by itself: the backstop when no service runs to replace it.
const IDLE_BACKSTOP: Duration = Duration::from_secs(60);

impl KubeSessions {
    /// Creates member `m` of pool `t` and waits until it can run commands,
    /// then labels it idle. `max_lifetime` is the longest lifetime a session
    /// may ask for: the Job's deadline leaves room for it after the max age.
    /// Returns `false` when the member already existed (another replica made
    /// it: names are deterministic).
    pub async fn create_member(
        &self,
        t: &PoolTemplate,
        m: &NewMember,
        max_lifetime: Duration,
    ) -> Result<bool, SessionError> {
        let name = m.name();
        let spec = SessionSpec {
            image: t.image.clone(),
            resources: t.resources.clone(),
            idle_timeout: t.max_age + IDLE_BACKSTOP,
            max_lifetime: t.max_age + IDLE_BACKSTOP + max_lifetime,
            ..SessionSpec::new(&t.image)
        };
        let meta = SessionMeta {
            labels: [
                (LABEL_POOL, t.name.clone()),
                (LABEL_POOL_STATE, MemberState::Warming.as_str().to_owned()),
                (LABEL_TEMPLATE, t.hash()),
                (LABEL_SLOT, m.slot.to_string()),
                (LABEL_GENERATION, m.generation.to_string()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
            annotations: Default::default(),
        };
        let mut job = pod::session_job(&name, &spec, &meta, &self.settings)
            .map_err(|e| SessionError::InvalidSpec(e.to_string()))?;
        pod::open_stdin(&mut job);
        match self.jobs.create(&PostParams::default(), &job).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => return Ok(false),
            Err(e) => return Err(api_error("create pool member", e)),
        }
        self.promote_member(&name).await?;
        Ok(true)
    }

    /// Waits until warming member `name` can run commands, then labels it
    /// idle. Its creator does this; another replica adopts a member whose
    /// creator died while it warmed. A member that fails to start is deleted.
    pub async fn promote_member(&self, name: &str) -> Result<(), SessionError> {
        let id = SessionId(name.to_owned());
        let handover = match self.loop_handover(&id).await {
            Ok(h) => h,
            Err(e) => {
                let _ = self.delete_member(name, None).await;
                return Err(e);
            }
        };
        // Only a warming member becomes idle: never undo a claim.
        let current = self
            .jobs
            .get_opt(name)
            .await
            .map_err(|e| api_error("get pool member", e))?;
        let Some(job) = current else { return Ok(()) };
        let warming = job
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_POOL_STATE))
            .is_some_and(|s| s == MemberState::Warming.as_str());
        if !warming {
            return Ok(());
        }
        // Its pod goes with the label, so whoever claims it execs at once.
        let pod = self
            .targets
            .lock()
            .ok()
            .and_then(|t| t.get(&id).map(|t| t.pod.clone()));
        let patch = json!({"metadata": {
            "resourceVersion": job.metadata.resource_version,
            "labels": {LABEL_POOL_STATE: MemberState::Idle.as_str()},
            "annotations": {
                ANNOTATION_POD: pod,
                ANNOTATION_HANDOVER: (handover == HANDOVER_STDIN).then_some(HANDOVER_STDIN),
            },
        }});
        match self
            .jobs
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => Ok(()),
            // Changed meanwhile (another replica promoted or deleted it): its business.
            Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => Ok(()),
            Err(e) => Err(api_error("mark pool member idle", e)),
        }
    }

    /// Waits until warming member `id` runs, and returns how its idle loop
    /// takes a claim ([`HANDOVER_STDIN`] or `exec`), once the loop has said
    /// so: it may start a moment after the pod reports Running. A loop that
    /// says nothing within [`LOOP_START_WAIT`] is taken for one without
    /// (the claim exec works with every loop).
    async fn loop_handover(&self, id: &SessionId) -> Result<String, SessionError> {
        let mut answer = self.await_ready(id, ".").await?;
        let deadline = tokio::time::Instant::now() + LOOP_START_WAIT;
        while answer == script::LOOP_STARTING && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            answer = self.probe(&self.target(id).await?).await?.stdout.text();
        }
        Ok(answer)
    }

    /// Claims idle member `name` for a session, if it is still at
    /// `resource_version`: a merge patch that carries the resourceVersion, so
    /// of two replicas claiming one member the API server lets exactly one
    /// through (the other gets 409). The patch moves the member to `claimed`
    /// and adds the session's owner labels and annotations, working dir and
    /// idle timeout; the env never goes to the API server.
    pub async fn claim_member(
        &self,
        name: &str,
        resource_version: &str,
        spec: &SessionSpec,
        meta: &SessionMeta,
    ) -> Result<ClaimOutcome, SessionError> {
        let mut labels = serde_json::Map::new();
        for (k, v) in &meta.labels {
            labels.insert(k.clone(), json!(v));
        }
        labels.insert(
            LABEL_POOL_STATE.into(),
            json!(MemberState::Claimed.as_str()),
        );
        let mut annotations = serde_json::Map::new();
        for (k, v) in &meta.annotations {
            annotations.insert(k.clone(), json!(v));
        }
        annotations.insert(
            super::ANNOTATION_WORKING_DIR.into(),
            json!(spec.working_dir),
        );
        annotations.insert(
            pod::ANNOTATION_IDLE_SECS.into(),
            json!(spec.idle_timeout.as_secs().to_string()),
        );
        annotations.insert(
            ANNOTATION_CLAIMED_AT.into(),
            json!(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
        );
        let patch = json!({"metadata": {
            "resourceVersion": resource_version,
            "labels": labels,
            "annotations": annotations,
        }});
        match self
            .jobs
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => Ok(ClaimOutcome::Claimed),
            Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => Ok(ClaimOutcome::Lost),
            Err(e) => Err(api_error("claim pool member", e)),
        }
    }

    /// Hands a claimed member the session's env, working dir, idle timeout
    /// and lifetime: the values land in the sandbox's own state dir, never
    /// in a pod spec. With `stdin_handover` (the member's loop reads its
    /// stdin, [`ANNOTATION_HANDOVER`]) they are written to the loop through
    /// `pods/attach`, which starts no process in the sandbox; otherwise, or
    /// when they do not fit that path ([`script::handover_message`]), one
    /// exec writes them. Fails if the sandbox was already claimed (it serves
    /// one session). `pod` is the member's pod as its Job records it
    /// ([`ANNOTATION_POD`]); without it, or for a member this process
    /// started, the pod is looked up as for any session.
    pub async fn activate_member(
        &self,
        id: &SessionId,
        spec: &SessionSpec,
        pod: Option<&str>,
        stdin_handover: bool,
    ) -> Result<(), SessionError> {
        spec.validate()?;
        let mut target = match pod {
            Some(pod) if !self.knows(id) => Target {
                pod: pod.to_owned(),
                working_dir: spec.working_dir.clone(),
            },
            _ => self.target(id).await?,
        };
        let env = script::env_file(&spec.env);
        let nonce = uuid::Uuid::new_v4().simple().to_string();
        let message = stdin_handover
            .then(|| {
                script::handover_message(
                    &nonce,
                    &spec.working_dir,
                    spec.idle_timeout,
                    spec.max_lifetime,
                    &env,
                )
            })
            .flatten();
        match message {
            Some(message) => self.hand_over(&target, &message, &nonce).await?,
            None => self.claim_by_exec(&target, spec, &env).await?,
        }
        target.working_dir = spec.working_dir.clone();
        if let Ok(mut t) = self.targets.lock() {
            t.insert(id.clone(), target);
        }
        Ok(())
    }

    /// The hand-over through one exec of the claim wrapper
    /// ([`script::claim_argv`]), `env` on its stdin: for a loop that cannot
    /// read its own stdin, or values that do not fit a hand-over message.
    async fn claim_by_exec(
        &self,
        target: &Target,
        spec: &SessionSpec,
        env: &str,
    ) -> Result<(), SessionError> {
        let argv = script::claim_argv(&spec.working_dir, spec.idle_timeout, spec.max_lifetime, env);
        let e = self
            .exec(
                target,
                argv,
                Some(env.as_bytes()),
                4096,
                None,
                super::FILE_WAIT,
            )
            .await?;
        if e.exit_code != 0 {
            return Err(SessionError::Start(format!(
                "claiming the pool member: {}",
                e.stderr.text()
            )));
        }
        Ok(())
    }

    /// Writes a hand-over `message` to the idle loop of `target`'s pod
    /// through `pods/attach` and waits for the loop's answer on its stdout
    /// (the line tagged with `nonce`; the attach shows only what the loop
    /// writes after it, and the nonce tells this claim's answer from any
    /// other). All of it within [`CHECK_WAIT`]: the loop reads its stdin at
    /// least once a second.
    async fn hand_over(
        &self,
        target: &Target,
        message: &str,
        nonce: &str,
    ) -> Result<(), SessionError> {
        use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};

        let params = AttachParams::default()
            .container(pod::CONTAINER)
            .stdin(true)
            .stdout(true)
            .stderr(false)
            // The whole hand-over fits, so it leaves in as few frames as can be.
            .max_stdin_buf_size(16 * 1024);
        let lost = |what: &str, e: &dyn std::fmt::Display| {
            SessionError::ConnectionLost(format!("{what} pod {}: {e}", target.pod))
        };
        let answer = async {
            let mut attached = self.pods.attach(&target.pod, &params).await.map_err(|e| {
                if super::is_status(&e, 404) || super::is_status(&e, 400) {
                    SessionError::NotFound(SessionId(target.pod.clone()))
                } else {
                    api_error("attach", e)
                }
            })?;
            let (Some(mut stdin), Some(stdout)) = (attached.stdin(), attached.stdout()) else {
                return Err(SessionError::Unavailable(
                    "attach gave no stdin or stdout".into(),
                ));
            };
            stdin
                .write_all(message.as_bytes())
                .await
                .map_err(|e| lost("writing the hand-over to", &e))?;
            stdin
                .flush()
                .await
                .map_err(|e| lost("writing the hand-over to", &e))?;
            // The loop writes nothing but answers; a sandbox that floods its
            // stdout is cut off rather than read without end.
            let mut lines = tokio::io::BufReader::new(stdout.take(ANSWER_LIMIT)).lines();
            let tag = format!("{} {nonce} ", script::HANDOVER_TAG);
            while let Some(line) = lines
                .next_line()
                .await
                .map_err(|e| lost("reading the answer of", &e))?
            {
                if let Some(answer) = line.strip_prefix(&tag) {
                    return Ok(answer.trim().to_owned());
                }
            }
            Err(SessionError::ConnectionLost(format!(
                "pod {} did not answer the hand-over before its stream ended",
                target.pod
            )))
        };
        let answer = tokio::time::timeout(CHECK_WAIT, answer)
            .await
            .map_err(|_| {
                SessionError::ConnectionLost(format!(
                    "no answer to the hand-over from pod {} within {CHECK_WAIT:?}",
                    target.pod
                ))
            })??;
        match answer.as_str() {
            "ok" => Ok(()),
            "refused" => Err(SessionError::Start(
                "claiming the pool member: this sandbox already serves a session".into(),
            )),
            other => Err(SessionError::Start(format!(
                "claiming the pool member: the sandbox answered {other:?}"
            ))),
        }
    }

    /// Whether a claimed member got its session's values (the claim exec
    /// ran). A member claimed by a replica that died before that serves nobody.
    /// The check gives up after [`CHECK_WAIT`] (the caller checks again later).
    pub async fn member_activated(&self, id: &SessionId) -> Result<bool, SessionError> {
        let target = self.target(id).await?;
        let check = self.exec(
            &target,
            script::claimed_argv(),
            None,
            4096,
            None,
            CHECK_WAIT,
        );
        let e = tokio::time::timeout(CHECK_WAIT, check)
            .await
            .map_err(|_| {
                SessionError::ConnectionLost(format!(
                    "no answer from pod {} within {CHECK_WAIT:?}",
                    target.pod
                ))
            })??;
        Ok(e.exit_code == 0)
    }

    /// Deletes an unclaimed member; with `resource_version`, only if it is
    /// still at it (a member claimed meanwhile is left alone). Gone or
    /// changed is `Ok(false)`.
    pub async fn delete_member(
        &self,
        name: &str,
        resource_version: Option<&str>,
    ) -> Result<bool, SessionError> {
        let mut dp = DeleteParams::background();
        if let Some(rv) = resource_version {
            dp.preconditions = Some(Preconditions {
                resource_version: Some(rv.to_owned()),
                uid: None,
            });
        }
        self.forget(&SessionId(name.to_owned()));
        match self.jobs.delete(name, &dp).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(false),
            Err(e) => Err(api_error("delete pool member", e)),
        }
    }

    /// A watch on session Jobs matching `config`, for the pool manager: each
    /// Job decoded with its metadata and status only. The spec is skipped
    /// unallocated: it carries the idle loop (~8 KB), and every replica
    /// decodes every event of every session Job (a burst of claims and their
    /// refills is hundreds).
    pub fn jobs_watch(
        &self,
        config: kube::runtime::watcher::Config,
    ) -> impl futures::Stream<
        Item = Result<
            kube::runtime::watcher::Event<k8s_openapi::api::batch::v1::Job>,
            kube::runtime::watcher::Error,
        >,
    > + Send
    + use<> {
        use futures::StreamExt as _;
        use kube::runtime::watcher::Event;

        kube::runtime::watcher(self.slim_jobs(), config).map(|e| {
            e.map(|e| match e {
                Event::Apply(j) => Event::Apply(j.into()),
                Event::Delete(j) => Event::Delete(j.into()),
                Event::Init => Event::Init,
                Event::InitApply(j) => Event::InitApply(j.into()),
                Event::InitDone => Event::InitDone,
            })
        })
    }
}
