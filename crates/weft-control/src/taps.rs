//! `weft tap`: live request metadata (never bodies) from the sidecars, for callers the API
//! trusts. A tap is open while its API stream is; every proxy stream carries the list of open
//! taps, and the proxies send back the metadata of matching requests.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::{mpsc, watch};
use weft_api::proto;

/// Events buffered per tap before new ones are dropped (a slow reader never slows proxies).
const BUFFER: usize = 1024;

pub(crate) struct Taps {
    inner: Mutex<Inner>,
    list: watch::Sender<Vec<proto::Tap>>,
}

#[derive(Default)]
struct Inner {
    next: u64,
    open: HashMap<u64, (String, mpsc::Sender<proto::TapEvent>)>,
}

/// An open tap; closes when dropped.
pub(crate) struct TapHandle {
    pub(crate) id: u64,
    pub(crate) rx: mpsc::Receiver<proto::TapEvent>,
    taps: Arc<Taps>,
}

impl Default for Taps {
    fn default() -> Self {
        Taps {
            inner: Mutex::new(Inner::default()),
            list: watch::channel(Vec::new()).0,
        }
    }
}

impl Taps {
    pub(crate) fn open(self: &Arc<Self>, service: &str) -> TapHandle {
        let (tx, rx) = mpsc::channel(BUFFER);
        let mut inner = self.inner.lock();
        inner.next += 1;
        let id = inner.next;
        inner.open.insert(id, (service.to_string(), tx));
        self.publish(&inner);
        tracing::info!(tap = id, %service, "tap opened");
        TapHandle {
            id,
            rx,
            taps: self.clone(),
        }
    }

    fn close(&self, id: u64) {
        let mut inner = self.inner.lock();
        if inner.open.remove(&id).is_some() {
            self.publish(&inner);
            tracing::info!(tap = id, "tap closed");
        }
    }

    fn publish(&self, inner: &Inner) {
        let mut list: Vec<proto::Tap> = inner
            .open
            .iter()
            .map(|(id, (service, _))| proto::Tap {
                id: *id,
                service: service.clone(),
            })
            .collect();
        list.sort_by_key(|t| t.id);
        self.list.send_replace(list);
    }

    /// The open taps, for the proxy streams.
    pub(crate) fn watch(&self) -> watch::Receiver<Vec<proto::Tap>> {
        self.list.subscribe()
    }

    /// Hands each event to the taps it matched; a full tap drops it.
    pub(crate) fn deliver(&self, events: Vec<proto::TapEvent>) {
        let inner = self.inner.lock();
        for e in events {
            for id in &e.taps {
                if let Some((_, tx)) = inner.open.get(id) {
                    let _ = tx.try_send(e.clone());
                }
            }
        }
    }
}

impl Drop for TapHandle {
    fn drop(&mut self) {
        self.taps.close(self.id);
    }
}
