//! Open `weft tap`s (from the control plane) and the events the request path sends them: empty
//! almost always, so the request path checks [`Taps::tapping`] (one atomic load) first.

use crate::balance::RateLimiter;
use arc_swap::ArcSwap;
use parking_lot::Mutex;
use std::sync::Arc;
use tokio::sync::mpsc;
use weft_api::proto::{Tap, TapEvent};

/// Most tap events one proxy sends per second; more are dropped.
const TAP_EVENTS_PER_SECOND: f64 = 200.0;

pub(crate) struct Taps {
    /// `namespace/name` of this workload, stamped on each event.
    proxy: String,
    open: ArcSwap<Vec<Tap>>,
    tx: mpsc::Sender<TapEvent>,
    /// Taken by the control stream, which sends the events on.
    rx: Mutex<Option<mpsc::Receiver<TapEvent>>>,
    /// At most this many tap events per second leave the proxy.
    limit: RateLimiter,
}

impl Taps {
    pub(crate) fn new(proxy: String) -> Self {
        let (tx, rx) = mpsc::channel(1024);
        Taps {
            proxy,
            open: ArcSwap::from_pointee(Vec::new()),
            tx,
            rx: Mutex::new(Some(rx)),
            limit: RateLimiter::new(weft_api::resource::RateLimit {
                requests_per_second: TAP_EVENTS_PER_SECOND,
                burst: TAP_EVENTS_PER_SECOND as u32,
                at: Default::default(),
            }),
        }
    }

    /// Replaces the open taps (the control plane's list; empty once the stream is lost).
    pub(crate) fn set(&self, taps: Vec<Tap>) {
        self.open.store(Arc::new(taps));
    }

    /// The events to send on (once: one control stream per proxy).
    pub(crate) fn take_events(&self) -> Option<mpsc::Receiver<TapEvent>> {
        self.rx.lock().take()
    }

    /// Whether any tap is open (one atomic load; the request path checks it first).
    pub(crate) fn tapping(&self) -> bool {
        !self.open.load().is_empty()
    }

    /// Sends a request's metadata to the taps on `service` (destination for outbound, this
    /// workload's service for inbound), if any.
    pub(crate) fn tap(&self, service: &str, mut event: TapEvent) {
        let taps = self.open.load();
        event.taps = taps.iter().filter(|t| t.service == service).map(|t| t.id).collect();
        if event.taps.is_empty() || !self.limit.allow() {
            return;
        }
        event.proxy = self.proxy.clone();
        event.service = service.to_string();
        event.time_ms = crate::clock::unix_ms();
        let _ = self.tx.try_send(event);
    }
}
