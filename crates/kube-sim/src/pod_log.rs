//! Container logs: the captured stdout+stderr of a pod's container, served by
//! `GET …/pods/{name}/log` with `tailLines`, `limitBytes`, `previous` and `follow`.

use std::sync::Mutex;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

#[derive(Default)]
struct LogState {
    current: Vec<u8>,
    previous: Option<Vec<u8>>,
    done: bool,
}

/// The log of one container, appended to while it runs.
pub(crate) struct ContainerLog {
    state: Mutex<LogState>,
    /// Bumped on every change so followers wake up.
    changed: watch::Sender<u64>,
}

impl Default for ContainerLog {
    fn default() -> Self {
        Self {
            state: Mutex::new(LogState::default()),
            changed: watch::channel(0).0,
        }
    }
}

/// Query parameters of a log request.
#[derive(Debug, Clone, Default)]
pub(crate) struct LogParams {
    pub(crate) tail_lines: Option<usize>,
    pub(crate) limit_bytes: Option<usize>,
    pub(crate) follow: bool,
    pub(crate) previous: bool,
}

impl ContainerLog {
    fn lock(&self) -> std::sync::MutexGuard<'_, LogState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    pub(crate) fn append(&self, bytes: &[u8]) {
        self.lock().current.extend_from_slice(bytes);
        self.bump();
    }

    /// The container exited: followers drain and stop.
    pub(crate) fn finish(&self) {
        self.lock().done = true;
        self.bump();
    }

    /// The container restarts: the current log becomes `previous=true`.
    pub(crate) fn restart(&self) {
        let mut s = self.lock();
        let current = std::mem::take(&mut s.current);
        s.previous = Some(current);
        s.done = false;
        drop(s);
        self.bump();
    }

    /// The whole current log.
    pub(crate) fn contents(&self) -> Vec<u8> {
        self.lock().current.clone()
    }

    /// Whether a previous instance's log exists.
    pub(crate) fn has_previous(&self) -> bool {
        self.lock().previous.is_some()
    }

    /// The log as a one-shot response body.
    pub(crate) fn read(&self, params: &LogParams) -> Vec<u8> {
        let s = self.lock();
        let data = if params.previous {
            s.previous.as_deref().unwrap_or(&[])
        } else {
            &s.current
        };
        let mut out = tail(data, params.tail_lines).to_vec();
        if let Some(limit) = params.limit_bytes {
            out.truncate(limit);
        }
        out
    }

    /// Streams the log (after `tailLines`) and then new output until the container
    /// exits, `limitBytes` is reached, the client goes away or `stop` fires.
    pub(crate) fn follow(
        self: std::sync::Arc<Self>,
        params: LogParams,
        stop: CancellationToken,
    ) -> mpsc::Receiver<Bytes> {
        let (tx, rx) = mpsc::channel(64);
        let mut changed = self.changed.subscribe();
        tokio::spawn(async move {
            let mut remaining = params.limit_bytes.unwrap_or(usize::MAX);
            let (first, mut offset, mut done) = {
                let s = self.lock();
                (
                    tail(&s.current, params.tail_lines).to_vec(),
                    s.current.len(),
                    s.done,
                )
            };
            if !send_limited(&tx, first, &mut remaining).await {
                return;
            }
            while !done && remaining > 0 {
                tokio::select! {
                    () = tx.closed() => return,
                    () = stop.cancelled() => return,
                    r = changed.changed() => if r.is_err() { return },
                }
                let chunk = {
                    let s = self.lock();
                    done = s.done;
                    if offset > s.current.len() {
                        // The container restarted; this stream belonged to the old one.
                        return;
                    }
                    let chunk = s.current[offset..].to_vec();
                    offset = s.current.len();
                    chunk
                };
                if !send_limited(&tx, chunk, &mut remaining).await {
                    return;
                }
            }
        });
        rx
    }
}

async fn send_limited(tx: &mpsc::Sender<Bytes>, mut chunk: Vec<u8>, remaining: &mut usize) -> bool {
    if chunk.is_empty() {
        return true;
    }
    chunk.truncate(*remaining);
    *remaining -= chunk.len();
    tx.send(Bytes::from(chunk)).await.is_ok() && *remaining > 0
}

/// The last `n` lines of `data` (a trailing newline does not start a new line).
pub(crate) fn tail(data: &[u8], n: Option<usize>) -> &[u8] {
    let Some(n) = n else { return data };
    if n == 0 {
        return &[];
    }
    let body = data.strip_suffix(b"\n").unwrap_or(data);
    let mut count = 0;
    for (i, b) in body.iter().enumerate().rev() {
        if *b == b'\n' {
            count += 1;
            if count == n {
                return &data[i + 1..];
            }
        }
    }
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_counts_lines_from_the_end() {
        assert_eq!(tail(b"a\nb\nc\n", Some(2)), b"b\nc\n");
        assert_eq!(tail(b"a\nb\nc", Some(1)), b"c");
        assert_eq!(tail(b"a\nb\n", Some(5)), b"a\nb\n");
        assert_eq!(tail(b"a\n", Some(0)), b"");
    }

    #[test]
    fn read_applies_tail_then_limit_and_previous() {
        let log = ContainerLog::default();
        log.append(b"one\ntwo\nthree\n");
        let p = LogParams {
            tail_lines: Some(2),
            limit_bytes: Some(5),
            ..LogParams::default()
        };
        assert_eq!(log.read(&p), b"two\nt");
        log.restart();
        log.append(b"again\n");
        let prev = LogParams {
            previous: true,
            ..LogParams::default()
        };
        assert_eq!(log.read(&prev), b"one\ntwo\nthree\n");
        assert_eq!(log.read(&LogParams::default()), b"again\n");
    }
}
