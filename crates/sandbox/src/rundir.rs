//! The local executor's run directories, and the sweep that removes the ones
//! left behind by workers that are gone.
//!
//! Every run gets `<base>/sf-<task>-a<attempt>-<random>/` and, beside it, a
//! lock file `<same name>.lock` that the owning executor holds locked
//! (`flock`, exclusive) for the whole run. The kernel releases a `flock` when
//! its holder dies, however it dies, so "the lock is free" means "the owner is
//! gone" — unlike a pid in a file, which a new process may reuse. A starting
//! executor [`sweep`]s its base directory: every run whose lock it can take
//! is removed, lock file last.
//!
//! A free lock says the worker is gone, not that its sandbox is: the
//! sandbox's watcher needs a moment to kill it. So the lock file also records
//! the sandbox's process group ([`RunDir::set_group`]); a run whose lock is
//! free but whose group still has live members is *dying*: the sweep leaves
//! it, and a new run of the same task waits for it ([`dying_runs_of`]), so a
//! redelivery never runs beside the orphan of its previous delivery.
//!
//! Order keeps the sweep safe against runs being set up or torn down at the
//! same time: the lock is created, locked and verified before the directory
//! exists, and removed only after the directory is gone, by a holder of the
//! lock. So a run directory without its lock file is always garbage, and a
//! lock that a sweeper takes from under a run being created is noticed by its
//! creator (the path no longer names its file) and not used.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

const PREFIX: &str = "sf-";
const LOCK_SUFFIX: &str = ".lock";

/// The base directory when `sandbox.local.work_dir` is unset:
/// `$TMPDIR/sandfleet-<uid>`, so two users of one machine do not share (or
/// sweep) each other's runs.
pub(crate) fn default_base() -> PathBuf {
    std::env::temp_dir().join(format!("sandfleet-{}", rustix::process::getuid().as_raw()))
}

/// Creates `base` (mode 0700 when it is new).
pub(crate) fn ensure_base(base: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(base)
}

/// One run's directory and the lock that says its owner is alive.
/// Dropping it removes the directory, then the lock file.
#[derive(Debug)]
pub(crate) struct RunDir {
    path: PathBuf,
    lock_path: PathBuf,
    _lock: File,
}

impl RunDir {
    /// Creates a run directory for attempt `attempt` of task `task` (its
    /// 32-hex simple form) under `base`, locked by this process.
    pub(crate) fn create(base: &Path, task: &str, attempt: u32) -> io::Result<RunDir> {
        for _ in 0..8 {
            let suffix = uuid::Uuid::new_v4().simple().to_string();
            let name = format!("{PREFIX}{task}-a{attempt}-{}", &suffix[..8]);
            let path = base.join(&name);
            let lock_path = base.join(format!("{name}{LOCK_SUFFIX}"));
            let lock = match OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&lock_path)
            {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            };
            // A sweeper may have taken the fresh lock file for a dead run's
            // and unlinked it: then it is not ours to use. Try another name.
            if lock.try_lock().is_err() || !same_file(&lock, &lock_path) {
                continue;
            }
            std::fs::DirBuilder::new().mode(0o700).create(&path)?;
            return Ok(RunDir {
                path,
                lock_path,
                _lock: lock,
            });
        }
        Err(io::Error::other(
            "could not create a locked run directory after 8 tries",
        ))
    }

    /// The directory.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Records the process group of the run's sandbox in the lock file,
    /// once: the file is still empty then. (Not truncated first: on ext4 a
    /// file truncated to zero is written out when it is closed — here just
    /// before it is removed — which costs a block allocation, its discard,
    /// and a wait for the disk on every run.)
    pub(crate) fn set_group(&self, pgid: i32) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        self._lock.write_all_at(pgid.to_string().as_bytes(), 0)
    }
}

/// The process group recorded in a run's lock file.
fn group_of(lock_path: &Path) -> Option<i32> {
    std::fs::read_to_string(lock_path).ok()?.trim().parse().ok()
}

/// True while a process of group `pgid` is alive (zombies do not count:
/// where nothing reaps them they would keep a dead group "alive" forever).
pub(crate) fn group_alive(pgid: i32) -> bool {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return false;
    };
    procs.flatten().any(|p| {
        let name = p.file_name();
        if !name
            .to_str()
            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        {
            return false;
        }
        let Ok(stat) = std::fs::read_to_string(p.path().join("stat")) else {
            return false;
        };
        // `pid (comm) state ppid pgrp ...`; comm may hold spaces and parentheses.
        let mut fields = stat
            .rsplit_once(')')
            .map_or("", |(_, rest)| rest)
            .split_ascii_whitespace();
        let state = fields.next();
        let pgrp = fields.nth(1).and_then(|g| g.parse::<i32>().ok());
        pgrp == Some(pgid) && !matches!(state, Some("Z" | "X") | None)
    })
}

/// Runs of task `task` (32 hex) under `base` whose worker is gone but whose
/// sandbox still has live processes.
pub(crate) fn dying_runs_of(base: &Path, task: &str) -> usize {
    let Ok(entries) = std::fs::read_dir(base) else {
        return 0;
    };
    let prefix = format!("{PREFIX}{task}-");
    entries
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let Some(run) = name.to_str().and_then(|n| n.strip_suffix(LOCK_SUFFIX)) else {
                return false;
            };
            if !run.starts_with(&prefix) || !is_run_name(run) {
                return false;
            }
            let Ok(lock) = OpenOptions::new().write(true).open(e.path()) else {
                return false;
            };
            // Held: a live worker's run, not an orphan (the lock is let go
            // when `lock` drops).
            lock.try_lock().is_ok() && group_of(&e.path()).is_some_and(group_alive)
        })
        .count()
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if let Err(e) = remove_tree(&self.path) {
            // The lock file goes anyway: a run directory without its lock is
            // garbage to the next sweep, which tries again.
            tracing::warn!(dir = %self.path.display(), error = %e, "could not remove a run directory");
        }
        let _ = std::fs::remove_file(&self.lock_path);
    }
}

/// True when `path` still names the file `f` is open on.
fn same_file(f: &File, path: &Path) -> bool {
    match (f.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// True for `sf-<32 hex>-a<digits>-<8 hex>`: only names this module makes
/// are ever removed, whatever else lives in the base directory.
fn is_run_name(name: &str) -> bool {
    let Some(rest) = name.strip_prefix(PREFIX) else {
        return false;
    };
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    let mut parts = rest.split('-');
    let (Some(task), Some(attempt), Some(random), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    hex(task, 32)
        && attempt
            .strip_prefix('a')
            .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
        && hex(random, 8)
}

/// What a sweep removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Swept {
    /// Run directories removed (their owner was gone).
    pub(crate) removed: usize,
    /// Runs skipped because a live executor holds their lock.
    pub(crate) live: usize,
    /// Runs skipped because their worker is gone but processes of their
    /// sandbox are still alive (being stopped by its watcher).
    pub(crate) dying: usize,
}

/// Removes the runs under `base` whose owner is gone: every run whose lock is
/// free, and every run directory without a lock file.
pub(crate) fn sweep(base: &Path) -> io::Result<Swept> {
    let mut swept = Swept::default();
    for entry in std::fs::read_dir(base)? {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(run) = name.strip_suffix(LOCK_SUFFIX) {
            if !is_run_name(run) {
                continue;
            }
            let lock_path = entry.path();
            let Ok(lock) = OpenOptions::new().write(true).open(&lock_path) else {
                continue; // removed meanwhile by its owner
            };
            if lock.try_lock().is_err() {
                swept.live += 1;
                continue;
            }
            // Locked by us now; make sure the path is still that file (the
            // owner may have finished and unlinked it while we opened it).
            if !same_file(&lock, &lock_path) {
                continue;
            }
            // Its watcher is still stopping the sandbox: leave it the time.
            if group_of(&lock_path).is_some_and(group_alive) {
                swept.dying += 1;
                continue;
            }
            let dir = base.join(run);
            match remove_tree(&dir) {
                Ok(existed) => {
                    swept.removed += usize::from(existed);
                    let _ = std::fs::remove_file(&lock_path);
                }
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "could not remove a dead worker's run directory");
                }
            }
        } else if is_run_name(name)
            && !base.join(format!("{name}{LOCK_SUFFIX}")).exists()
            && entry.file_type().is_ok_and(|t| t.is_dir())
        {
            // Its lock went first: a removal that was interrupted.
            if remove_tree(&entry.path()).is_ok_and(|existed| existed) {
                swept.removed += 1;
            }
        }
    }
    Ok(swept)
}

/// Removes a directory tree; `Ok(false)` when it was not there. Directories a
/// step made read-only are made writable first, so they do not survive.
pub(crate) fn remove_tree(path: &Path) -> io::Result<bool> {
    if std::fs::symlink_metadata(path).is_err() {
        return Ok(false);
    }
    let mut last = Ok(());
    for _ in 0..3 {
        last = std::fs::remove_dir_all(path);
        match &last {
            Ok(()) => return Ok(true),
            // Removed meanwhile by someone else (the run's watcher, a sweep).
            Err(_) if std::fs::symlink_metadata(path).is_err() => return Ok(true),
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => make_writable(path),
            // Something may still be writing into it while it dies (an
            // orphan being killed): try again.
            Err(_) => {}
        }
    }
    last.map(|()| true)
}

fn make_writable(path: &Path) {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return;
    };
    if !meta.is_dir() {
        return;
    }
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700));
    if let Ok(entries) = std::fs::read_dir(path) {
        for e in entries.flatten() {
            make_writable(&e.path());
        }
    }
}

/// Disk space used by the tree at `path` (allocated blocks, symlinks not
/// followed), counting stops once it passes `stop_above`.
pub(crate) fn disk_usage(path: &Path, stop_above: u64) -> u64 {
    let mut total = 0u64;
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(meta) = e.metadata() else { continue };
            total = total.saturating_add(meta.blocks().saturating_mul(512));
            if meta.is_dir() {
                stack.push(e.path());
            }
            if total > stop_above {
                return total;
            }
        }
    }
    total
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const TASK: &str = "0193a6d29c447e11b8d051f2a3b4c5d6";

    #[test]
    fn only_run_names_are_recognised() {
        assert!(is_run_name(&format!("sf-{TASK}-a1-0a1b2c3d")));
        assert!(is_run_name(&format!("sf-{TASK}-a42-ffffffff")));
        for bad in [
            "sf-x-a1-0a1b2c3d".to_owned(),
            format!("sf-{TASK}-a-0a1b2c3d"),
            format!("sf-{TASK}-a1-0a1b2c3"),
            format!("sf-{TASK}-a1-0a1b2c3d-x"),
            format!("sandfleet-{TASK}-a1-0a1b2c3d"),
            "important".to_owned(),
        ] {
            assert!(!is_run_name(&bad), "{bad}");
        }
    }

    #[test]
    fn a_live_run_is_kept_and_a_dead_ones_are_removed() {
        let base = tempfile::tempdir().unwrap();
        let live = RunDir::create(base.path(), TASK, 1).unwrap();
        live.set_group(i32::MAX).unwrap();
        assert_eq!(group_of(&live.lock_path), Some(i32::MAX));
        std::fs::write(live.path().join("f"), "x").unwrap();
        // A dead owner: its lock file exists but nobody holds it.
        let dead = base.path().join(format!("sf-{TASK}-a2-00000000"));
        std::fs::create_dir_all(dead.join("workspace/deep")).unwrap();
        std::fs::write(dead.join("workspace/deep/file"), "x").unwrap();
        std::fs::write(base.path().join(format!("sf-{TASK}-a2-00000000.lock")), "").unwrap();
        // An interrupted removal: a run directory without its lock.
        let lockless = base.path().join(format!("sf-{TASK}-a3-11111111"));
        std::fs::create_dir(&lockless).unwrap();
        // Not ours: never touched.
        let other = base.path().join("keep-me");
        std::fs::create_dir(&other).unwrap();

        let swept = sweep(base.path()).unwrap();
        assert_eq!(
            swept,
            Swept {
                removed: 2,
                live: 1,
                dying: 0
            }
        );
        assert!(live.path().join("f").exists());
        assert!(!dead.exists());
        assert!(!lockless.exists());
        assert!(other.exists());
        let path = live.path().to_owned();
        drop(live);
        assert!(!path.exists());
        let left: Vec<_> = std::fs::read_dir(base.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("keep-me")]);
    }

    #[test]
    fn read_only_directories_are_removed_too() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("t");
        std::fs::create_dir_all(dir.join("ro/inner")).unwrap();
        std::fs::write(dir.join("ro/inner/f"), "x").unwrap();
        std::fs::set_permissions(dir.join("ro"), std::fs::Permissions::from_mode(0o500)).unwrap();
        assert!(remove_tree(&dir).unwrap());
        assert!(!dir.exists());
        assert!(!remove_tree(&dir).unwrap());
    }

    #[test]
    fn disk_usage_counts_allocated_bytes() {
        let base = tempfile::tempdir().unwrap();
        std::fs::create_dir(base.path().join("d")).unwrap();
        std::fs::write(base.path().join("d/f"), vec![1u8; 256 * 1024]).unwrap();
        let used = disk_usage(base.path(), u64::MAX);
        assert!(used >= 256 * 1024, "{used}");
        assert!(disk_usage(base.path(), 1000) > 1000);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod dying {
    use std::os::unix::process::CommandExt as _;

    use super::*;

    const TASK: &str = "0193a6d29c447e11b8d051f2a3b4c5d7";

    #[test]
    fn a_run_whose_worker_is_gone_but_whose_sandbox_lives_is_dying_until_it_dies() {
        let base = tempfile::tempdir().unwrap();
        // The orphan: a process group of its own that outlives its "worker".
        let mut orphan = std::process::Command::new("sleep")
            .arg("30")
            .process_group(0)
            .spawn()
            .unwrap();
        let pgid = orphan.id() as i32;
        assert!(group_alive(pgid));
        // What a worker that died leaves: the run directory, and a lock
        // file nobody holds that names the sandbox's group.
        let dir = base.path().join(format!("sf-{TASK}-a1-0a1b2c3d"));
        let lock_path = base.path().join(format!("sf-{TASK}-a1-0a1b2c3d.lock"));
        std::fs::create_dir_all(dir.join("workspace")).unwrap();
        std::fs::write(&lock_path, pgid.to_string()).unwrap();
        assert_eq!(dying_runs_of(base.path(), TASK), 1);
        assert_eq!(
            dying_runs_of(base.path(), "0193a6d29c447e11b8d051f2a3b4c5d8"),
            0
        );
        let swept = sweep(base.path()).unwrap();
        assert_eq!((swept.removed, swept.dying), (0, 1));
        assert!(dir.exists() && lock_path.exists());

        orphan.kill().unwrap();
        orphan.wait().unwrap();
        assert!(!group_alive(pgid));
        assert_eq!(dying_runs_of(base.path(), TASK), 0);
        assert_eq!(sweep(base.path()).unwrap().removed, 1);
        assert!(!dir.exists() && !lock_path.exists());
    }
}
