//! Warm pools: the pure part. A pool member is an ordinary session Job,
//! created from a [`PoolTemplate`] with no per-session value in it, and
//! labelled with its pool, template hash, slot and state. A [`PoolIndex`]
//! holds what the watch on member Jobs said ([`PoolIndex::apply`],
//! [`PoolIndex::delete`], [`PoolIndex::reset`]); from it come the decisions:
//! which members to create and delete to keep every pool full
//! ([`PoolIndex::plan`]) and which idle members a claim tries, in what
//! order ([`PoolIndex::candidates`]). The I/O around them lives in
//! [`super::kubernetes`] (create, claim, activate) and the sessions service.
//!
//! Member names are deterministic, `sp-<pool>-<slot>-<generation>`, so two
//! replicas that see the same state create the same name and one of them
//! gets 409 AlreadyExists: no pool is filled twice. A claim is a merge
//! patch carrying the member's resourceVersion, so of two replicas claiming
//! one member exactly one succeeds.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::batch::v1::Job;
use sandfleet_proto::Resources;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Label with the pool a member Job belongs to (kept after the claim).
pub const LABEL_POOL: &str = "sandfleet.dev/pool";
/// Label with a member's state: `warming`, `idle` or `claimed`.
pub const LABEL_POOL_STATE: &str = "sandfleet.dev/pool-state";
/// Label with the hash of the template a member was made from.
pub const LABEL_TEMPLATE: &str = "sandfleet.dev/pool-template";
/// Label with a member's slot in its pool.
pub const LABEL_SLOT: &str = "sandfleet.dev/pool-slot";
/// Label with a member's generation within its slot.
pub const LABEL_GENERATION: &str = "sandfleet.dev/pool-generation";
/// Annotation with the time (RFC 3339) a member was claimed.
pub const ANNOTATION_CLAIMED_AT: &str = "sandfleet.dev/claimed-at";
/// Annotation with an idle member's pod, set with its `idle` label: a
/// replica that claims a member it did not start execs into it without
/// looking the pod up first.
pub const ANNOTATION_POD: &str = "sandfleet.dev/pod";
/// Annotation on a member's Job: `stdin` when its idle loop takes a claim's
/// values from its stdin (through `pods/attach`, no process started in the
/// sandbox), as its promoter found it; without it a claim hands them over
/// through an exec.
pub const ANNOTATION_HANDOVER: &str = "sandfleet.dev/handover";
/// [`ANNOTATION_HANDOVER`]'s value (and what the readiness probe prints) for
/// a loop that reads hand-overs from its stdin.
pub const HANDOVER_STDIN: &str = "stdin";
/// Selector of every pool member, idle or claimed.
pub const POOL_SELECTOR: &str = "sandfleet.dev/pool";

/// What a pool's members look like and how many there are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolTemplate {
    /// The pool's name (`pool: NAME` on create): lowercase letters, digits
    /// and `-`, at most 30 characters.
    pub name: String,
    /// Container image of every member.
    pub image: String,
    /// CPU and memory of every member.
    #[serde(default)]
    pub resources: Resources,
    /// Idle members kept ready.
    pub size: usize,
    /// An idle member older than this is replaced (images move on, nodes drain).
    #[serde(with = "humantime_secs")]
    pub max_age: Duration,
}

mod humantime_secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }
    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_secs(u64::deserialize(d)?))
    }
}

impl PoolTemplate {
    /// Checks the name (it goes into Job names and label values), image, age.
    pub fn validate(&self) -> Result<(), String> {
        let ok = !self.name.is_empty()
            && self.name.len() <= 30
            && !self.name.starts_with('-')
            && !self.name.ends_with('-')
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !ok {
            return Err(format!(
                "pool name {:?} must be 1-30 lowercase letters, digits or '-'",
                self.name
            ));
        }
        if self.image.trim().is_empty() {
            return Err(format!("pool {}: image must not be empty", self.name));
        }
        if self.max_age < Duration::from_secs(1) {
            return Err(format!("pool {}: max_age must be at least 1 s", self.name));
        }
        Ok(())
    }

    /// A short hash of what shapes a member's pod (image, resources, and the
    /// idle loop it runs, which the claim wrapper talks to): a member whose
    /// label differs was made from an older template, or by an older
    /// release, and is replaced. Size and max age are not in it: changing
    /// them replaces nobody.
    pub fn hash(&self) -> String {
        let mut h = Sha256::new();
        h.update(self.image.as_bytes());
        h.update([0]);
        h.update(serde_json::to_vec(&self.resources).unwrap_or_default());
        h.update([0]);
        // The command as the pod carries it: a release that changes the loop
        // or its escaping replaces the members running the old one. Its
        // digest is computed once (the loop is ~8 KB; the hash is taken on
        // every plan).
        h.update(*COMMAND_DIGEST);
        // Members get a stdin their loop reads claims from: a member from
        // before that has none and is replaced.
        h.update(b"\0stdin");
        h.finalize()
            .iter()
            .take(6)
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// SHA-256 of the pod command every member runs.
static COMMAND_DIGEST: std::sync::LazyLock<[u8; 32]> = std::sync::LazyLock::new(|| {
    let mut h = Sha256::new();
    for arg in crate::session::kubernetes::pod::idle_command() {
        h.update(arg.as_bytes());
        h.update([0]);
    }
    h.finalize().into()
});

/// The Job name of a pool's member in `slot`, generation `generation`.
pub fn member_name(pool: &str, slot: u32, generation: u64) -> String {
    format!("sp-{pool}-{slot}-{generation}")
}

/// Where a member stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MemberState {
    /// Created, its pod not yet ready for exec.
    Warming,
    /// Ready and unclaimed.
    Idle,
    /// Serving a session (or about to): never touched by the pool again.
    Claimed,
}

impl MemberState {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Warming => "warming",
            MemberState::Idle => "idle",
            MemberState::Claimed => "claimed",
        }
    }

    fn parse(s: &str) -> Option<MemberState> {
        match s {
            "warming" => Some(MemberState::Warming),
            "idle" => Some(MemberState::Idle),
            "claimed" => Some(MemberState::Claimed),
            _ => None,
        }
    }
}

/// A member as the index knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Job name (the session id once claimed).
    pub name: String,
    /// Its pool.
    pub pool: String,
    /// Hash of the template it was made from.
    pub template: String,
    /// Slot within the pool.
    pub slot: u32,
    /// Generation within the slot.
    pub generation: u64,
    /// State.
    pub state: MemberState,
    /// Creation time.
    pub created: Option<SystemTime>,
    /// When it was claimed.
    pub claimed_at: Option<SystemTime>,
    /// The Job's resourceVersion (the claim's precondition).
    pub resource_version: String,
    /// The Job finished (its pod ended): it serves nobody any more.
    pub ended: bool,
    /// The idle timeout of the session that claimed it.
    pub idle_timeout: Option<Duration>,
    /// Its pod, as its promoter recorded it ([`ANNOTATION_POD`]).
    pub pod: Option<String>,
    /// Its idle loop takes a claim through its stdin ([`ANNOTATION_HANDOVER`]).
    pub stdin_handover: bool,
}

/// An idle member a claim may try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Job name.
    pub name: String,
    /// The resourceVersion the claim is conditional on.
    pub resource_version: String,
    /// Its pod, when recorded.
    pub pod: Option<String>,
    /// Its idle loop takes a claim through its stdin.
    pub stdin_handover: bool,
}

impl Member {
    /// Reads a member off its Job; `None` for a Job that is not one.
    pub fn from_job(job: &Job) -> Option<Member> {
        let labels = job.metadata.labels.as_ref()?;
        let no_annotations = std::collections::BTreeMap::new();
        let annotations = job.metadata.annotations.as_ref().unwrap_or(&no_annotations);
        let state = MemberState::parse(labels.get(LABEL_POOL_STATE)?)?;
        Some(Member {
            name: job.metadata.name.clone()?,
            pool: labels.get(LABEL_POOL)?.clone(),
            template: labels.get(LABEL_TEMPLATE).cloned().unwrap_or_default(),
            slot: labels.get(LABEL_SLOT)?.parse().ok()?,
            generation: labels.get(LABEL_GENERATION)?.parse().ok()?,
            state,
            created: job
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| SystemTime::from(t.0)),
            claimed_at: annotations
                .get(ANNOTATION_CLAIMED_AT)
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .map(SystemTime::from),
            resource_version: job.metadata.resource_version.clone().unwrap_or_default(),
            ended: super::kubernetes::pod::job_ended(job),
            idle_timeout: annotations
                .get(super::kubernetes::pod::ANNOTATION_IDLE_SECS)
                .and_then(|s| s.parse().ok())
                .map(Duration::from_secs),
            pod: annotations.get(ANNOTATION_POD).cloned(),
            stdin_handover: annotations
                .get(ANNOTATION_HANDOVER)
                .is_some_and(|h| h == HANDOVER_STDIN),
        })
    }

    fn age(&self, now: SystemTime) -> Duration {
        self.created
            .and_then(|c| now.duration_since(c).ok())
            .unwrap_or_default()
    }
}

/// A member to create.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct NewMember {
    /// Its pool.
    pub pool: String,
    /// Its slot.
    pub slot: u32,
    /// Its generation.
    pub generation: u64,
}

impl NewMember {
    /// Its Job name.
    pub fn name(&self) -> String {
        member_name(&self.pool, self.slot, self.generation)
    }
}

/// Why a member is deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// Its pool is no longer configured.
    PoolGone,
    /// Its slot is past the pool's size.
    Shrunk,
    /// It was made from an older template.
    Stale,
    /// It reached the pool's max age.
    Aged,
    /// Its pod ended, or it never became ready.
    Broken,
    /// Another member holds its slot (two replicas raced on a stale view).
    Duplicate,
}

/// What [`PoolIndex::plan`] decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Members to create.
    pub create: Vec<NewMember>,
    /// Unclaimed members to delete, with the resourceVersion the delete is
    /// conditional on (so a member claimed meanwhile is never deleted).
    pub delete: Vec<(String, String, Removal)>,
}

/// Members by Job name, as the watch reported them.
#[derive(Debug, Clone, Default)]
pub struct PoolIndex {
    members: BTreeMap<String, Member>,
}

impl PoolIndex {
    /// An empty index.
    pub fn new() -> PoolIndex {
        PoolIndex::default()
    }

    /// A Job was added or changed.
    pub fn apply(&mut self, job: &Job) {
        let Some(name) = job.metadata.name.as_ref() else {
            return;
        };
        match Member::from_job(job) {
            Some(m) => {
                self.members.insert(name.clone(), m);
            }
            None => {
                self.members.remove(name);
            }
        }
    }

    /// A Job was deleted.
    pub fn delete(&mut self, name: &str) {
        self.members.remove(name);
    }

    /// The watch restarted: these are all the Jobs there are.
    pub fn reset<'a>(&mut self, jobs: impl IntoIterator<Item = &'a Job>) {
        self.members.clear();
        for j in jobs {
            self.apply(j);
        }
    }

    /// Records a claim this replica made, before the watch reports it (so
    /// the refill starts at once and no local claim tries it again).
    pub fn mark_claimed(&mut self, name: &str) {
        if let Some(m) = self.members.get_mut(name) {
            m.state = MemberState::Claimed;
        }
    }

    /// One member.
    pub fn get(&self, name: &str) -> Option<&Member> {
        self.members.get(name)
    }

    /// All members.
    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.values()
    }

    /// Counts of a pool's members by state (unended only).
    pub fn count(&self, pool: &str, state: MemberState) -> usize {
        self.members
            .values()
            .filter(|m| m.pool == pool && m.state == state && !m.ended)
            .count()
    }

    /// The idle members of `template`'s pool a claim may take, in the order
    /// to try them: current template, not ended, not `busy` (claims this
    /// replica has under way), shuffled by `spread` so that concurrent
    /// claims (here and on other replicas) try different members instead of
    /// all racing for the first, and a claim that lost a race does not walk
    /// into its neighbour's member next.
    pub fn candidates(
        &self,
        template: &PoolTemplate,
        busy: &HashSet<String>,
        spread: u64,
    ) -> Vec<Candidate> {
        let hash = template.hash();
        let mut idle: Vec<Candidate> = self
            .members
            .values()
            .filter(|m| {
                m.pool == template.name
                    && m.state == MemberState::Idle
                    && !m.ended
                    && m.template == hash
                    && !busy.contains(&m.name)
            })
            .map(|m| Candidate {
                name: m.name.clone(),
                resource_version: m.resource_version.clone(),
                pod: m.pod.clone(),
                stdin_handover: m.stdin_handover,
            })
            .collect();
        idle.sort_by_cached_key(|c| {
            use std::hash::{Hash as _, Hasher as _};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (spread, &c.name).hash(&mut h);
            h.finish()
        });
        idle
    }

    /// Whether `m`'s slot is left to the replica that claimed its previous
    /// member: that member was claimed less than `grace` ago, and not here
    /// (`mine`). The claimer starts the refill at once; another replica only
    /// after `grace` (the claimer may have died first), so a refill is one
    /// create, not one per replica (the others' would fail with 409).
    pub fn refill_left_to_claimer(
        &self,
        m: &NewMember,
        mine: &HashSet<String>,
        now: SystemTime,
        grace: Duration,
    ) -> bool {
        let Some(previous) = m.generation.checked_sub(1) else {
            return false;
        };
        let name = member_name(&m.pool, m.slot, previous);
        if mine.contains(&name) {
            return false;
        }
        self.members.get(&name).is_some_and(|p| {
            p.state == MemberState::Claimed
                && p.claimed_at
                    .is_some_and(|at| now.duration_since(at).map_or(true, |d| d < grace))
        })
    }

    /// Members still warming after `grace`: their creator may have died
    /// before it marked them idle, so another replica adopts them.
    pub fn warming_longer_than(&self, now: SystemTime, grace: Duration) -> Vec<String> {
        self.members
            .values()
            .filter(|m| m.state == MemberState::Warming && !m.ended && m.age(now) >= grace)
            .map(|m| m.name.clone())
            .collect()
    }

    /// Claimed members to check: claimed longer ago than their session's
    /// idle timeout and not yet seen serving it (`confirmed`). A replica that
    /// died between the claim and handing over the session's values leaves
    /// such a member behind; nobody will use it, and its own idle loop still
    /// runs on the pool's long timeout, so the service deletes it.
    pub fn unconfirmed_claims(&self, now: SystemTime, confirmed: &HashSet<String>) -> Vec<String> {
        self.members
            .values()
            .filter(|m| m.state == MemberState::Claimed && !m.ended && !confirmed.contains(&m.name))
            .filter(|m| {
                let (Some(at), Some(idle)) = (m.claimed_at, m.idle_timeout) else {
                    return false;
                };
                now.duration_since(at).is_ok_and(|d| d >= idle)
            })
            .map(|m| m.name.clone())
            .collect()
    }

    /// What to create and delete so that each pool in `templates` has
    /// `size` unclaimed members of its current template, none older than
    /// its max age; unclaimed members of pools no longer configured go.
    /// Claimed members are never deleted here: they are sessions. A member
    /// still warming after `warm_timeout` is taken for broken.
    pub fn plan(
        &self,
        templates: &[PoolTemplate],
        now: SystemTime,
        warm_timeout: Duration,
    ) -> Plan {
        let mut plan = Plan::default();
        // Each template's hash once per plan, not once per member: it digests
        // the whole idle loop.
        let by_name: BTreeMap<&str, (&PoolTemplate, String)> = templates
            .iter()
            .map(|t| (t.name.as_str(), (t, t.hash())))
            .collect();
        // (pool, slot) → highest generation seen, claimed members included,
        // so a refill never reuses the name of a member still around.
        let mut highest: BTreeMap<(&str, u32), u64> = BTreeMap::new();
        // (pool, slot) → the unclaimed member kept there.
        let mut kept: BTreeMap<(&str, u32), &Member> = BTreeMap::new();
        for m in self.members.values() {
            let g = highest.entry((m.pool.as_str(), m.slot)).or_default();
            *g = (*g).max(m.generation);
        }
        for m in self.members.values() {
            if m.state == MemberState::Claimed {
                continue;
            }
            let removal = match by_name.get(m.pool.as_str()) {
                None => Some(Removal::PoolGone),
                Some((t, _)) if m.slot as usize >= t.size => Some(Removal::Shrunk),
                Some((_, hash)) if m.template != *hash => Some(Removal::Stale),
                Some(_) if m.ended => Some(Removal::Broken),
                Some(_) if m.state == MemberState::Warming && m.age(now) > warm_timeout => {
                    Some(Removal::Broken)
                }
                Some((t, _)) if m.age(now) >= t.max_age => Some(Removal::Aged),
                Some(_) => None,
            };
            if let Some(r) = removal {
                plan.delete
                    .push((m.name.clone(), m.resource_version.clone(), r));
                continue;
            }
            // Two unclaimed members in one slot: keep the newer generation.
            match kept.insert((m.pool.as_str(), m.slot), m) {
                Some(older) if older.generation < m.generation => plan.delete.push((
                    older.name.clone(),
                    older.resource_version.clone(),
                    Removal::Duplicate,
                )),
                Some(newer) => {
                    plan.delete.push((
                        m.name.clone(),
                        m.resource_version.clone(),
                        Removal::Duplicate,
                    ));
                    kept.insert((m.pool.as_str(), m.slot), newer);
                }
                None => {}
            }
        }
        for t in templates {
            for slot in 0..u32::try_from(t.size).unwrap_or(u32::MAX) {
                if kept.contains_key(&(t.name.as_str(), slot)) {
                    continue;
                }
                let generation = highest.get(&(t.name.as_str(), slot)).map_or(0, |g| g + 1);
                plan.create.push(NewMember {
                    pool: t.name.clone(),
                    slot,
                    generation,
                });
            }
        }
        plan
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    fn template(size: usize) -> PoolTemplate {
        PoolTemplate {
            name: "py".into(),
            image: "python:3.12".into(),
            resources: Resources::default(),
            size,
            max_age: Duration::from_secs(3600),
        }
    }

    fn job(
        t: &PoolTemplate,
        slot: u32,
        generation: u64,
        state: MemberState,
        created: SystemTime,
    ) -> Job {
        job_with_hash(t, &t.hash(), slot, generation, state, created)
    }

    fn job_with_hash(
        t: &PoolTemplate,
        hash: &str,
        slot: u32,
        generation: u64,
        state: MemberState,
        created: SystemTime,
    ) -> Job {
        let labels = [
            (LABEL_POOL, t.name.clone()),
            (LABEL_POOL_STATE, state.as_str().into()),
            (LABEL_TEMPLATE, hash.into()),
            (LABEL_SLOT, slot.to_string()),
            (LABEL_GENERATION, generation.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        Job {
            metadata: ObjectMeta {
                name: Some(member_name(&t.name, slot, generation)),
                labels: Some(labels),
                resource_version: Some("7".into()),
                creation_timestamp: Some(Time(
                    k8s_openapi::jiff::Timestamp::try_from(created).unwrap(),
                )),
                ..ObjectMeta::default()
            },
            ..Job::default()
        }
    }

    #[test]
    fn an_empty_pool_is_filled_slot_by_slot() {
        let t = template(3);
        let plan = PoolIndex::new().plan(&[t], SystemTime::now(), Duration::from_secs(300));
        let names: Vec<String> = plan.create.iter().map(NewMember::name).collect();
        assert_eq!(names, ["sp-py-0-0", "sp-py-1-0", "sp-py-2-0"]);
        assert!(plan.delete.is_empty());
    }

    #[test]
    fn a_claimed_member_is_refilled_under_a_new_name_and_never_deleted() {
        let t = template(2);
        let now = SystemTime::now();
        let mut index = PoolIndex::new();
        index.apply(&job(&t, 0, 0, MemberState::Idle, now));
        index.apply(&job(&t, 1, 0, MemberState::Idle, now));
        assert!(
            index.plan(std::slice::from_ref(&t), now, Duration::from_secs(300)) == Plan::default()
        );
        index.mark_claimed("sp-py-0-0");
        let plan = index.plan(std::slice::from_ref(&t), now, Duration::from_secs(300));
        assert_eq!(
            plan.create,
            [NewMember {
                pool: "py".into(),
                slot: 0,
                generation: 1
            }]
        );
        assert!(plan.delete.is_empty());
        // Even once the pool is gone, a claimed member stays: it is a session.
        let plan = index.plan(&[], now, Duration::from_secs(300));
        assert_eq!(plan.delete.len(), 1);
        assert_eq!(plan.delete[0].0, "sp-py-1-0");
        assert_eq!(plan.delete[0].2, Removal::PoolGone);
    }

    #[test]
    fn a_template_change_replaces_every_idle_member_and_none_in_use() {
        let old = template(3);
        let now = SystemTime::now();
        let mut index = PoolIndex::new();
        index.apply(&job(&old, 0, 0, MemberState::Idle, now));
        index.apply(&job(&old, 1, 0, MemberState::Warming, now));
        index.apply(&job(&old, 2, 0, MemberState::Claimed, now));
        let new = PoolTemplate {
            image: "python:3.13".into(),
            ..old.clone()
        };
        assert_ne!(new.hash(), old.hash());
        let plan = index.plan(std::slice::from_ref(&new), now, Duration::from_secs(300));
        let deleted: Vec<&str> = plan.delete.iter().map(|d| d.0.as_str()).collect();
        assert_eq!(deleted, ["sp-py-0-0", "sp-py-1-0"]);
        assert!(plan.delete.iter().all(|d| d.2 == Removal::Stale));
        let created: Vec<String> = plan.create.iter().map(NewMember::name).collect();
        assert_eq!(created, ["sp-py-0-1", "sp-py-1-1", "sp-py-2-1"]);
        // Size and max age are not part of the template: nobody is replaced.
        let resized = PoolTemplate {
            size: 3,
            max_age: Duration::from_secs(7200),
            ..old.clone()
        };
        assert_eq!(resized.hash(), old.hash());
    }

    #[test]
    fn old_ended_and_stuck_members_are_replaced_and_a_shrink_removes_high_slots() {
        let t = template(2);
        let now = SystemTime::now();
        let long_ago = now - Duration::from_secs(4000);
        let mut index = PoolIndex::new();
        index.apply(&job(&t, 0, 0, MemberState::Idle, long_ago));
        index.apply(&job(
            &t,
            1,
            4,
            MemberState::Warming,
            now - Duration::from_secs(400),
        ));
        index.apply(&job(&t, 2, 0, MemberState::Idle, now));
        let plan = index.plan(std::slice::from_ref(&t), now, Duration::from_secs(300));
        let mut deleted: Vec<(&str, Removal)> =
            plan.delete.iter().map(|d| (d.0.as_str(), d.2)).collect();
        deleted.sort_by_key(|d| d.0);
        assert_eq!(
            deleted,
            [
                ("sp-py-0-0", Removal::Aged),
                ("sp-py-1-4", Removal::Broken),
                ("sp-py-2-0", Removal::Shrunk)
            ]
        );
        let created: Vec<String> = plan.create.iter().map(NewMember::name).collect();
        assert_eq!(created, ["sp-py-0-1", "sp-py-1-5"]);
    }

    #[test]
    fn two_members_in_one_slot_keep_the_newer() {
        let t = template(1);
        let now = SystemTime::now();
        let mut index = PoolIndex::new();
        index.apply(&job(&t, 0, 3, MemberState::Idle, now));
        index.apply(&job(&t, 0, 5, MemberState::Idle, now));
        let plan = index.plan(std::slice::from_ref(&t), now, Duration::from_secs(300));
        assert_eq!(plan.delete.len(), 1);
        assert_eq!(plan.delete[0].0, "sp-py-0-3");
        assert!(plan.create.is_empty());
    }

    #[test]
    fn candidates_are_idle_current_members_spread_and_minus_local_claims() {
        let t = template(4);
        let now = SystemTime::now();
        let mut index = PoolIndex::new();
        for slot in 0..3 {
            index.apply(&job(&t, slot, 0, MemberState::Idle, now));
        }
        index.apply(&job(&t, 3, 0, MemberState::Warming, now));
        index.apply(&job_with_hash(&t, "old", 4, 0, MemberState::Idle, now));
        let none = HashSet::new();
        let names = |v: Vec<Candidate>| v.into_iter().map(|c| c.name).collect::<Vec<_>>();
        let sorted = |mut v: Vec<String>| {
            v.sort();
            v
        };
        assert_eq!(
            sorted(names(index.candidates(&t, &none, 0))),
            ["sp-py-0-0", "sp-py-1-0", "sp-py-2-0"]
        );
        // Different claims start on different members.
        let firsts: HashSet<String> = (0..64)
            .map(|s| names(index.candidates(&t, &none, s)).remove(0))
            .collect();
        assert_eq!(firsts.len(), 3, "{firsts:?}");
        let busy: HashSet<String> = ["sp-py-1-0".to_owned()].into();
        assert_eq!(
            sorted(names(index.candidates(&t, &busy, 0))),
            ["sp-py-0-0", "sp-py-2-0"]
        );
        index.delete("sp-py-0-0");
        assert_eq!(
            index.count("py", MemberState::Idle),
            3,
            "the stale one still counts as idle"
        );
    }

    #[test]
    fn a_claim_left_unconfirmed_past_its_idle_timeout_is_checked() {
        let t = template(2);
        let now = SystemTime::now();
        let mut index = PoolIndex::new();
        for (slot, claimed_ago) in [(0u32, 30u64), (1, 5)] {
            let mut j = job(&t, slot, 0, MemberState::Claimed, now);
            let at = chrono::DateTime::<chrono::Utc>::from(now - Duration::from_secs(claimed_ago));
            j.metadata.annotations = Some(
                [
                    (ANNOTATION_CLAIMED_AT.to_owned(), at.to_rfc3339()),
                    (
                        crate::session::kubernetes::pod::ANNOTATION_IDLE_SECS.to_owned(),
                        "10".to_owned(),
                    ),
                ]
                .into(),
            );
            index.apply(&j);
        }
        index.apply(&job(
            &t,
            2,
            0,
            MemberState::Warming,
            now - Duration::from_secs(20),
        ));
        index.apply(&job(&t, 3, 0, MemberState::Warming, now));
        assert_eq!(
            index.warming_longer_than(now, Duration::from_secs(10)),
            ["sp-py-2-0"]
        );
        let none = HashSet::new();
        assert_eq!(index.unconfirmed_claims(now, &none), ["sp-py-0-0"]);
        let seen: HashSet<String> = ["sp-py-0-0".to_owned()].into();
        assert!(index.unconfirmed_claims(now, &seen).is_empty());
    }

    #[test]
    fn a_fresh_claims_refill_is_the_claimers_and_anyones_after_the_grace() {
        let t = template(2);
        let now = SystemTime::now();
        let mut index = PoolIndex::new();
        for (slot, claimed_ago) in [(0u32, 2u64), (1, 30)] {
            let mut j = job(&t, slot, 0, MemberState::Claimed, now);
            let at = chrono::DateTime::<chrono::Utc>::from(now - Duration::from_secs(claimed_ago));
            j.metadata.annotations =
                Some([(ANNOTATION_CLAIMED_AT.to_owned(), at.to_rfc3339())].into());
            index.apply(&j);
        }
        let plan = index.plan(std::slice::from_ref(&t), now, Duration::from_secs(600));
        let refill = |slot: u32| {
            plan.create
                .iter()
                .find(|m| m.slot == slot)
                .cloned()
                .unwrap()
        };
        let grace = Duration::from_secs(10);
        let none = HashSet::new();
        assert!(
            index.refill_left_to_claimer(&refill(0), &none, now, grace),
            "claimed 2 s ago elsewhere: the claimer refills"
        );
        let mine: HashSet<String> = ["sp-py-0-0".to_owned()].into();
        assert!(!index.refill_left_to_claimer(&refill(0), &mine, now, grace));
        assert!(
            !index.refill_left_to_claimer(&refill(1), &none, now, grace),
            "claimed 30 s ago and still empty: anyone refills"
        );
        let first = NewMember {
            pool: "py".into(),
            slot: 5,
            generation: 0,
        };
        assert!(!index.refill_left_to_claimer(&first, &none, now, grace));
    }

    #[test]
    fn pool_names_fit_job_names_and_labels() {
        assert!(template(1).validate().is_ok());
        for bad in ["", "Py", "a_b", "-a", &"a".repeat(31)] {
            let t = PoolTemplate {
                name: bad.into(),
                ..template(1)
            };
            assert!(t.validate().is_err(), "{bad:?}");
        }
    }
}
