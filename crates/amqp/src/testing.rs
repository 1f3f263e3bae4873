//! Test support (feature `testing`): a TCP proxy in front of the broker that
//! holds a client mid-stream, so a fault can land at a known point of a
//! batch instead of racing it; a queue's settled depth; and a reader of the
//! cancellations stream up to a sentinel.
//!
//! A test that closes a connection "while a batch is flowing" cannot win
//! that race by timing: a fast broker confirms the whole batch before the
//! close lands. Through a [`HoldingProxy`], the client's bytes stop reaching
//! the broker once it has sent `hold_after` of them; the client cannot get
//! the rest of its batch confirmed, so it waits, mid-batch, until the test
//! has injected its fault and calls [`HoldingProxy::release`]. The broker's
//! bytes keep flowing to the client the whole time (confirms, a
//! `connection.close`), as on a link that is congested one way.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A proxy on `127.0.0.1:<ephemeral>` forwarding to one upstream address.
/// Stops (and drops its connections) when dropped.
#[derive(Debug)]
pub struct HoldingProxy {
    addr: SocketAddr,
    state: Arc<State>,
    accept: JoinHandle<()>,
}

#[derive(Debug)]
struct State {
    upstream: String,
    hold_after: u64,
    /// Client → broker bytes forwarded, over every connection.
    forwarded: AtomicU64,
    /// `true` once the client's bytes are held.
    holding: watch::Sender<bool>,
    /// `true` once released: nothing is held any more.
    released: watch::Sender<bool>,
}

impl HoldingProxy {
    /// Starts a proxy to `upstream` (`host:port`) that holds the clients'
    /// bytes once it has forwarded `hold_after` of them (summed over every
    /// connection through it).
    async fn start(upstream: &str, hold_after: u64) -> std::io::Result<HoldingProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            upstream: upstream.to_owned(),
            hold_after,
            forwarded: AtomicU64::new(0),
            holding: watch::channel(false).0,
            released: watch::channel(false).0,
        });
        let accept = tokio::spawn({
            let state = state.clone();
            async move {
                let mut connections = tokio::task::JoinSet::new();
                while let Ok((client, _)) = listener.accept().await {
                    connections.spawn(serve(client, state.clone()));
                }
            }
        });
        Ok(HoldingProxy {
            addr,
            state,
            accept,
        })
    }

    /// A proxy in front of the broker of `url` (an `amqp://` URL), and the
    /// URL that reaches the broker through it (same user, password, vhost
    /// and query).
    pub async fn for_url(url: &str, hold_after: u64) -> std::io::Result<(HoldingProxy, String)> {
        let parts = UrlParts::of(url);
        let upstream = match parts.hostport.rsplit_once(':') {
            Some((_, port)) if port.parse::<u16>().is_ok() => parts.hostport.to_owned(),
            _ => format!("{}:5672", parts.hostport),
        };
        let proxy = HoldingProxy::start(&upstream, hold_after).await?;
        let through = format!(
            "{}://{}{}{}",
            parts.scheme, parts.userinfo, proxy.addr, parts.tail
        );
        Ok((proxy, through))
    }

    /// Waits until the proxy holds the clients' bytes.
    pub async fn holding(&self) {
        let mut rx = self.state.holding.subscribe();
        let _ = rx.wait_for(|h| *h).await;
    }

    /// Lets every held byte through; nothing is held after this.
    pub fn release(&self) {
        self.state.released.send_replace(true);
    }
}

impl Drop for HoldingProxy {
    fn drop(&mut self) {
        // Dropping the accept task drops its JoinSet, which aborts every
        // connection's task and closes both of its sockets.
        self.accept.abort();
    }
}

/// The depth of `queue` once it stopped growing: two equal non-zero reads
/// 100 ms apart. Read on a connection that does not go through a held proxy.
///
/// # Panics
/// When the queue cannot be read.
pub async fn settled_depth(amqp: &crate::Amqp, queue: &str) -> u32 {
    let mut last = u32::MAX;
    loop {
        #[allow(clippy::expect_used)]
        let depth = amqp.queue_depth(queue).await.expect("queue depth");
        if depth == last && depth > 0 {
            return depth;
        }
        last = depth;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// The messages on `topology`'s cancellations stream with their offsets,
/// read from the first up to the one with id `sentinel` (published by the
/// caller, e.g. a marker: everything confirmed before it is read). Fails
/// when the sentinel is not read within 10 s.
pub async fn cancellations_up_to(
    amqp: &crate::Amqp,
    topology: &crate::Topology,
    sentinel: uuid::Uuid,
) -> Result<Vec<(u64, sandfleet_proto::Cancellation)>, Box<dyn std::error::Error + Send + Sync>> {
    use crate::{Consumer, ConsumerOptions, StreamOffset};
    let options = ConsumerOptions::new(topology.cancellations_stream.clone(), 500)
        .stream_offset(StreamOffset::First);
    let mut consumer = Consumer::start(amqp, options).await?;
    let mut read = Vec::new();
    loop {
        let d = tokio::time::timeout(std::time::Duration::from_secs(10), consumer.next_delivery())
            .await
            .map_err(|_| "the cancellations stream not read up to the sentinel in 10 s")?
            .ok_or("the cancellations reader lost its subscription")?;
        d.ack().await?;
        let c: sandfleet_proto::Cancellation = serde_json::from_slice(d.body())?;
        if c.id == sentinel {
            consumer.cancel();
            return Ok(read);
        }
        let offset = d
            .stream_offset()
            .ok_or("a stream delivery without its offset")?;
        read.push((offset, c));
    }
}

/// An AMQP URL cut around its `host:port`.
struct UrlParts<'a> {
    scheme: &'a str,
    /// `user:password@`, or empty.
    userinfo: &'a str,
    hostport: &'a str,
    /// The vhost path and query.
    tail: &'a str,
}

impl<'a> UrlParts<'a> {
    fn of(url: &'a str) -> UrlParts<'a> {
        let (scheme, rest) = url.split_once("://").unwrap_or(("amqp", url));
        let (authority, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
        let at = authority.rfind('@').map_or(0, |i| i + 1);
        let (userinfo, hostport) = authority.split_at(at);
        UrlParts {
            scheme,
            userinfo,
            hostport,
            tail,
        }
    }
}

async fn serve(client: TcpStream, state: Arc<State>) {
    let Ok(broker) = TcpStream::connect(&state.upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = broker.set_nodelay(true);
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut broker_rx, mut broker_tx) = broker.into_split();
    let down = async {
        let _ = tokio::io::copy(&mut broker_rx, &mut client_tx).await;
        let _ = client_tx.shutdown().await;
    };
    let up = async {
        let mut released = state.released.subscribe();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match client_rx.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let total = state.forwarded.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
            if total > state.hold_after && !*released.borrow() {
                state.holding.send_replace(true);
                if released.wait_for(|r| *r).await.is_err() {
                    break;
                }
            }
            if broker_tx.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = broker_tx.shutdown().await;
    };
    tokio::join!(down, up);
}

/// Deletes `topology` and the queues named `queues` (what a test declared
/// outside its topology, such as a replay ledger) on a connection of its own.
/// Errors are ignored: this is cleanup, often after a test already failed.
pub async fn delete_declared(amqp: &crate::Amqp, topology: &crate::Topology, queues: &[String]) {
    if let Ok(ch) = amqp.channel().await {
        for q in queues {
            let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
        }
    }
    let _ = topology.delete(amqp).await;
}

/// [`delete_declared`] on a thread and current-thread runtime of their own,
/// waiting until it is done: what a test fixture's `Drop` needs, since it
/// cannot await and the test's own runtime may be unwinding. The broker is
/// shared, so a failed test must not leave its queues behind.
pub fn delete_declared_blocking(
    settings: sandfleet_settings::AmqpSettings,
    topology: crate::Topology,
    queues: Vec<String>,
) {
    let _ = std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            if let Ok(amqp) = crate::Amqp::connect(&settings, "test-cleanup").await {
                delete_declared(&amqp, &topology, &queues).await;
                amqp.close();
            }
        });
    })
    .join();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_is_cut_around_its_host_and_port() {
        let p = UrlParts::of("amqp://guest:guest@127.0.0.1:5672/%2f?heartbeat=5");
        assert_eq!(
            (p.scheme, p.userinfo, p.hostport, p.tail),
            ("amqp", "guest:guest@", "127.0.0.1:5672", "/%2f?heartbeat=5")
        );
        let p = UrlParts::of("amqp://rabbit");
        assert_eq!((p.userinfo, p.hostport, p.tail), ("", "rabbit", ""));
    }
}
