//! State shared by the routes, the controller and the kubelet.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio_util::sync::CancellationToken;

use crate::SimOptions;
use crate::deletion::Propagation;
use crate::faults::Faults;
use crate::kubelet::Kubelet;
use crate::request_log::RequestLog;
use crate::store::Store;

/// Everything one simulated cluster holds.
pub(crate) struct Shared {
    pub(crate) store: Store,
    pub(crate) options: SimOptions,
    pub(crate) faults: Faults,
    pub(crate) requests: RequestLog,
    pub(crate) kubelet: Kubelet,
    /// Open `pods/exec` and `pods/attach` streams.
    pub(crate) streams: crate::remote_command::Streams,
    /// Propagation policy of Jobs being deleted, by uid, for the garbage collector.
    propagation: Mutex<HashMap<String, Propagation>>,
    /// Stops the server, controller and kubelet.
    pub(crate) shutdown: CancellationToken,
}

impl Shared {
    pub(crate) fn new(options: SimOptions) -> Self {
        Self {
            store: Store::new(options.history_limit),
            options,
            faults: Faults::default(),
            requests: RequestLog::default(),
            kubelet: Kubelet::default(),
            streams: Default::default(),
            propagation: Mutex::new(HashMap::new()),
            shutdown: CancellationToken::new(),
        }
    }

    pub(crate) fn record_propagation(&self, uid: &str, p: Propagation) {
        self.propagation
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(uid.to_owned(), p);
    }

    pub(crate) fn take_propagation(&self, uid: &str) -> Option<Propagation> {
        self.propagation
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(uid)
    }
}
