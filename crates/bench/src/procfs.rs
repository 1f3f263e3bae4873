//! Figures of a process read from `/proc`: CPU time and memory.

use std::time::Duration;

/// User + system CPU time of process `pid` so far, from `/proc/<pid>/stat`
/// (clock ticks, 100 per second on Linux: fine over runs of seconds). Zero
/// where unavailable.
pub(crate) fn cpu_of(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // Fields after the parenthesised command name (which may hold spaces);
    // utime and stime are the 14th and 15th fields of the whole line.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// [`cpu_of`] plus the CPU time of the children `pid` has waited for
/// (`cutime`, `cstime`), which include their own reaped descendants.
pub(crate) fn cpu_with_children(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Duration::from_millis((ticks(11) + ticks(12) + ticks(13) + ticks(14)) * 10)
}

/// Resident set size and its high-water mark of process `pid`, in KiB
/// (`VmRSS`, `VmHWM` of `/proc/<pid>/status`).
pub(crate) fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let [rss, hwm] = status_fields(pid, ["VmRSS:", "VmHWM:"])?;
    Some((rss, hwm))
}

/// The numeric fields `names` (with their colon) of `/proc/<pid>/status`,
/// in that order; sizes are in KiB. `None` when one is missing.
pub(crate) fn status_fields<const N: usize>(pid: u32, names: [&str; N]) -> Option<[u64; N]> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    };
    let mut out = [0; N];
    for (slot, name) in out.iter_mut().zip(names) {
        *slot = field(name)?;
    }
    Some(out)
}
