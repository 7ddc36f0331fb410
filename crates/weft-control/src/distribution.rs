//! The control stream, control-plane side: one task per connected proxy that pushes a new
//! config whenever what that proxy needs has changed, and records ACKs, NACKs, subscriptions and
//! telemetry. The first push on a stream is the whole config; later ones carry only what
//! changed since the last (a policy, an endpoint joining), built once per change and shared
//! ([`crate::plan`]). A proxy that missed one asks for the whole config again. A stream has at
//! most two pushes out that its proxy has not answered, so a proxy that stops reading or
//! answering is never waited on and costs nothing: once it answers it is sent one push with
//! every change it has not taken yet (and during a storm every stream folds the changes that
//! came while its proxy applied the last push). A proxy whose stream ends is removed from
//! every other proxy's endpoints at once.
//! Registrations in progress are bounded ([`Gate`]): beyond the bound a stream is refused with
//! a hint of when to come back, so a cold start or a reconnect storm of thousands is served at
//! the rate the control plane can take it instead of all at once.
//! At shutdown every stream ends with `UNAVAILABLE`, so proxies look for a control plane again
//! (keeping their last-known-good config) instead of holding a stream to a process that is
//! going away.

use crate::admission::{ControlPeer, Proof, Refused};
use crate::mesh::Mesh;
use crate::metrics::{KindLabel, ReasonLabel};
use crate::plan::{PushSize, Sent};
use parking_lot::Mutex;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};
use weft_api::proto::{self, ControlMessage, ProxyMessage, control_message, proxy_message};
use weft_core::Shutdown;

/// Messages a stream holds for a proxy that reads slowly; past them, changes are folded into
/// the next push instead of queued.
const QUEUE: usize = 8;
/// One message queued for a proxy, boxed: tokio's channel allocates its slots 32 at a time
/// whatever its bound, and 32 unboxed messages (with room for a `Status`) took 8.7 KB per
/// stream, for the stream's whole life (heaptrack, 2,000 proxies).
type Queued = Box<Result<ControlMessage, Status>>;

/// The messages a stream sends its proxy, in the order they were queued.
pub(crate) struct Outbox(mpsc::Receiver<Queued>);

impl Stream for Outbox {
    type Item = Result<ControlMessage, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx).map(|queued| queued.map(|m| *m))
    }
}

/// Pushes a stream has out that its proxy has not answered (ACK, NACK or Resync); past them,
/// changes wait for an answer and go as one push. A stream sends no faster than its proxy
/// applies, so a storm costs the control plane what its proxies can take, not a push per
/// change per stream; and the control plane holds at most this many pushes per stream (each
/// up to 64 endpoints, tens of KiB decoded) instead of a queue's worth.
const UNANSWERED: u64 = 2;
/// How long a new stream may take to send its Register.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(5);
/// Registrations in progress at once, by default (`--max-registering`). 1,024, not 256: on a
/// quiet 2-core machine 10,000 proxies cold-started in 17.6 s (plaintext) and 18.4 s (TLS)
/// against 24.8 s and 20.1 s with 256, with fewer refusals and no more control-plane CPU
/// (bench/README.md, #20, 2026-12-02).
pub const MAX_REGISTERING: u32 = 1024;
/// How long a registration is taken to be in progress before any has completed: 1,024 of them
/// (the default bound) then complete 4,000 a second, until the first completions measure it.
const INITIAL_TIME: Duration = Duration::from_millis(256);
/// Weight of each completed registration in the mean time one is in progress.
const TIME_WEIGHT: f64 = 1.0 / 16.0;
/// The least rate a hint assumes: a control plane registering slower than this is told so by
/// refusing the early comers again.
const MIN_RATE: f64 = 50.0;
/// Bounds of the hint.
const MIN_HINT: Duration = Duration::from_millis(50);
const MAX_HINT: Duration = Duration::from_secs(30);

pub(crate) struct Distribution {
    pub(crate) mesh: Arc<Mesh>,
    pub(crate) gate: Arc<Gate>,
    pub(crate) shutdown: Shutdown,
}

/// Bounds the registrations in progress: a stream from its Register until its proxy ACKs the
/// first config (the costly part of a join: admission, the whole config planned and sent).
/// Beyond the bound a stream is refused with a hint of when to come back: a place in a virtual
/// queue served at the rate the control plane completes registrations, so ten thousand proxies
/// refused at once come back spread over the time the control plane needs for them, not all
/// at once again.
pub(crate) struct Gate {
    limit: usize,
    state: Mutex<GateState>,
}

/// The gate's bookkeeping, apart from the clock (its tests pass the time).
struct GateState {
    in_progress: usize,
    /// The next free place in the virtual queue.
    next_slot: Instant,
    /// The mean time a registration is in progress, seconds. While the gate is full, `limit`
    /// registrations complete in that time (Little's law): that is the rate the virtual queue
    /// is served at. (The rate used to be counted from completions while some were refused;
    /// but the refused come back at the rate their hints said, so the count measured the
    /// hints, never the control plane, and a first low estimate held a fleet's cold start to
    /// it: 3,000 proxies registered at 270 a second with the control plane's CPU 75% idle.)
    mean: f64,
}

/// A registration in progress: dropping it frees its place.
pub(crate) struct Pass {
    gate: Arc<Gate>,
    mesh: Arc<Mesh>,
    entered: Instant,
}

impl Gate {
    pub(crate) fn new(limit: u32) -> Self {
        Self {
            limit: limit.max(1) as usize,
            state: Mutex::new(GateState {
                in_progress: 0,
                next_slot: Instant::now(),
                mean: INITIAL_TIME.as_secs_f64(),
            }),
        }
    }

    /// A place for one registration, or how long to wait before asking again.
    fn enter(self: &Arc<Self>, mesh: &Arc<Mesh>) -> Result<Pass, Duration> {
        let now = Instant::now();
        let mut s = self.state.lock();
        s.enter(self.limit, now)?;
        mesh.metrics.registering.set(s.in_progress as i64);
        Ok(Pass {
            gate: self.clone(),
            mesh: mesh.clone(),
            entered: now,
        })
    }
}

// === impl GateState ===

impl GateState {
    /// Registrations completed per second while the gate is full.
    fn rate(&self, limit: usize) -> f64 {
        (limit as f64 / self.mean).max(MIN_RATE)
    }

    /// Takes a place, or returns the wait until the next free one in the virtual queue.
    fn enter(&mut self, limit: usize, now: Instant) -> Result<(), Duration> {
        if self.in_progress < limit {
            self.in_progress += 1;
            return Ok(());
        }
        let slot = self.next_slot.max(now);
        self.next_slot = slot + Duration::from_secs_f64(1.0 / self.rate(limit));
        Err((slot - now).clamp(MIN_HINT, MAX_HINT))
    }

    /// A registration entered at `entered` completed: its time moves the mean, and the places
    /// already handed out ahead are served at the new rate (the hints given stay as they were).
    fn complete(&mut self, limit: usize, entered: Instant, now: Instant) {
        let before = self.rate(limit);
        let took = now.saturating_duration_since(entered).as_secs_f64();
        self.mean += TIME_WEIGHT * (took - self.mean);
        if self.next_slot > now {
            let ahead = (self.next_slot - now).as_secs_f64() * before;
            self.next_slot = now + Duration::from_secs_f64(ahead / self.rate(limit));
        }
    }
}

impl Pass {
    /// The proxy ACKed (or refused) its first config: the registration is done.
    fn complete(self) {
        let limit = self.gate.limit;
        self.gate.state.lock().complete(limit, self.entered, Instant::now());
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        let mut s = self.gate.state.lock();
        s.in_progress -= 1;
        self.mesh.metrics.registering.set(s.in_progress as i64);
    }
}

#[tonic::async_trait]
impl proto::distribution_server::Distribution for Distribution {
    type ConnectStream = Outbox;

    /// Issues a certificate to the workload the request names, if it proved itself (its current
    /// certificate on this connection, or a join token for exactly that workload). A refusal
    /// issues nothing for anyone.
    async fn certify(&self, req: Request<proto::CertifyRequest>) -> Result<Response<proto::CertifyResponse>, Status> {
        let peer = req.extensions().get::<ControlPeer>().cloned();
        let source = req.remote_addr();
        let req = req.into_inner();
        let Some((ns, name)) = req.workload.split_once('/') else {
            return Err(Status::invalid_argument(format!(
                "certify: workload {:?} is not NAMESPACE/NAME",
                req.workload
            )));
        };
        let admitted = self.mesh.admit(peer.as_ref(), ns, name, &req.token).map_err(|refused| {
            self.mesh
                .metrics
                .refused_admissions
                .get_or_create(&ReasonLabel { reason: refused.reason() })
                .inc();
            tracing::warn!(workload = %req.workload, source = ?source, reason = %refused, "certificate refused");
            match refused {
                Refused::Store(e) => Status::internal(e.to_string()),
                other => Status::unauthenticated(other.to_string()),
            }
        })?;
        let issued = self
            .mesh
            .ca
            .certify(&admitted.namespace, &admitted.name, &admitted.service_account, &req.csr_pem)
            .map_err(|e| {
                self.mesh.metrics.refused_csrs.inc();
                tracing::warn!(workload = %req.workload, reason = %e, "certificate refused");
                Status::permission_denied(e.to_string())
            })?;
        // A token's use is counted only for a certificate actually issued; one whose last use
        // was taken meanwhile issues nothing.
        self.mesh.redeem(&admitted, source, &issued.serial).map_err(|refused| {
            self.mesh
                .metrics
                .refused_admissions
                .get_or_create(&ReasonLabel { reason: refused.reason() })
                .inc();
            tracing::warn!(workload = %req.workload, reason = %refused, "certificate refused");
            Status::unauthenticated(refused.to_string())
        })?;
        self.mesh.metrics.certificates.inc();
        let by = match admitted.proof {
            Proof::Certificate { .. } => "certificate",
            Proof::Token(_) => "token",
        };
        tracing::info!(workload = %req.workload, identity = %issued.identity, serial = %issued.serial, not_after = issued.not_after, by, "certificate issued");
        Ok(Response::new(proto::CertifyResponse {
            cert_chain_pem: issued.chain_pem,
            trust_bundle_pem: self.mesh.ca.bundle_pem(),
            not_after_unix: issued.not_after,
            identity: issued.identity,
            generation: issued.generation,
        }))
    }

    async fn connect(&self, req: Request<Streaming<ProxyMessage>>) -> Result<Response<Self::ConnectStream>, Status> {
        // Before anything costly: a refused stream has done nothing but open.
        let pass = self.gate.enter(&self.mesh).map_err(|wait| {
            self.mesh.metrics.registrations_deferred.inc();
            let mut status = Status::unavailable(format!(
                "busy: {} registrations in progress; come back in {} ms",
                self.gate.limit,
                wait.as_millis()
            ));
            status.metadata_mut().insert(
                weft_api::RETRY_AFTER_MS,
                wait.as_millis().to_string().parse().expect("digits are ASCII"),
            );
            status
        })?;
        let peer = req.extensions().get::<ControlPeer>().cloned();
        let mut inbound = req.into_inner();
        let first = tokio::time::timeout(REGISTER_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Register within 5s"))??;
        let Some(ProxyMessage {
            msg: Some(proxy_message::Msg::Register(reg)),
        }) = first
        else {
            return Err(Status::invalid_argument("the first message on the stream must be Register"));
        };
        // Fail closed: no proof for exactly this workload, no registration.
        let admitted = self.mesh.admit(peer.as_ref(), &reg.namespace, &reg.name, &reg.token).map_err(|refused| {
            self.mesh.metrics.refused_admissions.get_or_create(&ReasonLabel { reason: refused.reason() }).inc();
            tracing::warn!(workload = %format!("{}/{}", reg.namespace, reg.name), source = ?peer.as_ref().and_then(|p| p.remote), reason = %refused, "registration refused");
            Status::unauthenticated(format!("register {refused}"))
        })?;
        let (conn, id) = self.mesh.register(&reg, admitted.identity).map_err(Status::invalid_argument)?;
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(drive(self.mesh.clone(), conn, id, inbound, tx, self.shutdown.clone(), pass));
        Ok(Response::new(Outbox(rx)))
    }
}

async fn drive(
    mesh: Arc<Mesh>,
    conn: u64,
    id: String,
    mut inbound: Streaming<ProxyMessage>,
    tx: mpsc::Sender<Queued>,
    shutdown: Shutdown,
    pass: Pass,
) {
    // Held until the proxy answers its first config.
    let mut pass = Some(pass);
    let mut changed = mesh.watch();
    let mut taps = mesh.taps.watch();
    // The open taps go first when there are any, then again whenever they change.
    let mut taps_dirty = !taps.borrow_and_update().is_empty();
    let mut last: Option<u64> = None;
    // What the proxy was sent (none: the next push is the whole config).
    let mut sent: Option<Sent> = None;
    // The queue was full: the next push waits for room, and carries every change since `sent`.
    let mut behind = false;
    let mut version = 0u64;
    // The last push the proxy answered: pushes after it are out, unanswered.
    let mut answered = 0u64;
    // A change waits for an answer (counted once per wait).
    let mut waiting = false;
    let mut dirty = true;
    let mut held_until: Option<std::time::Instant> = None;
    loop {
        let open = version - answered < UNANSWERED;
        if dirty && !behind && !open && !waiting {
            waiting = true;
            mesh.metrics.deferred.inc();
        }
        if dirty && !behind && open {
            (dirty, waiting) = (false, false);
            let Some(planned) = mesh.config_for(conn) else { break };
            let bundle_epoch = mesh.ca.bundle_epoch();
            held_until = mesh.hold(conn, &planned);
            // A stream held for endpoints of proxies not back yet must not keep them out.
            if held_until.is_some() {
                pass.take();
            }
            // Checked after planning: a config that lost endpoints because other proxies'
            // streams ended at shutdown is never sent (they did not go away, this process did).
            if shutdown.is_cancelled() {
                stop(&tx);
                break;
            }
            if held_until.is_none() && last != Some(planned.fingerprint) {
                version += 1;
                let (msg, next, size) = planned.push(sent.as_ref(), version);
                // Never waits on one proxy: a stream whose queue is full is behind, and once
                // there is room it is sent one push with every change since the last it took,
                // not one per change (the push planned here is dropped, its number unused).
                match tx.try_send(Box::new(Ok(ControlMessage { msg: Some(msg) }))) {
                    Ok(()) => {
                        // A push that carried part of some service's endpoints is followed by
                        // the rest, one push at a time as the queue takes them.
                        let more = next.partial();
                        last = (!more).then_some(planned.fingerprint);
                        dirty = more;
                        sent = Some(next);
                        count(&mesh, size);
                        mesh.pushed(conn, version, planned.included, bundle_epoch);
                    }
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        version -= 1;
                        mesh.metrics.deferred.inc();
                        (behind, dirty) = (true, true);
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => break,
                }
            }
        }
        if taps_dirty && !behind {
            let list = taps.borrow_and_update().clone();
            let msg = ControlMessage {
                msg: Some(control_message::Msg::Taps(proto::TapList { taps: list })),
            };
            match tx.try_send(Box::new(Ok(msg))) {
                Ok(()) => taps_dirty = false,
                // The newest list goes when there is room.
                Err(mpsc::error::TrySendError::Full(_)) => behind = true,
                Err(mpsc::error::TrySendError::Closed(_)) => break,
            }
        }
        let held = async {
            match held_until {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        let room = async {
            if behind {
                // The permit is dropped at once: the push itself is planned afresh.
                tx.reserve().await.map(drop)
            } else {
                std::future::pending().await
            }
        };
        tokio::select! {
            () = std::future::ready(()), if dirty && !behind && open => {}
            _ = held => dirty = true,
            r = room => {
                if r.is_err() { break }
                behind = false;
            }
            r = taps.changed() => {
                if r.is_err() { break }
                taps_dirty = true;
            }
            r = changed.changed() => {
                if r.is_err() { break }
                changed.borrow_and_update();
                dirty = true;
            }
            msg = inbound.message() => match msg {
                Ok(Some(ProxyMessage { msg: Some(m) })) => {
                    if matches!(m, proxy_message::Msg::Ack(_) | proxy_message::Msg::Nack(_))
                        && let Some(pass) = pass.take()
                    {
                        pass.complete();
                    }
                    // A proxy answers pushes in order; one that asked for the whole config
                    // drops whatever deltas were out.
                    answered = match &m {
                        proxy_message::Msg::Ack(a) => answered.max(a.version.min(version)),
                        proxy_message::Msg::Nack(n) => answered.max(n.version.min(version)),
                        proxy_message::Msg::Resync(_) => version,
                        _ => answered,
                    };
                    match receive(&mesh, conn, m) {
                    Ok(Follow::Nothing) => {}
                    Ok(Follow::Replan) => dirty = true,
                    // A refused push leaves the proxy on its last good config, which the next
                    // delta would not build on: the next push is whole (not now: it would be
                    // refused again).
                    Ok(Follow::Refused) => sent = None,
                    Ok(Follow::Resync) => {
                        mesh.metrics.resyncs.get_or_create(&ReasonLabel { reason: "asked" }).inc();
                        (last, sent, dirty) = (None, None, true);
                    }
                    Err(status) => {
                        let _ = tx.send(Box::new(Err(status))).await;
                        break;
                    }
                    }
                }
                Ok(Some(ProxyMessage { msg: None })) => {}
                Ok(None) => break,
                Err(status) => {
                    tracing::debug!(proxy = %id, %status, "stream error");
                    break;
                }
            },
            _ = tx.closed() => break,
            _ = shutdown.cancelled() => {
                stop(&tx);
                break;
            }
        }
    }
    mesh.unregister(conn);
}

/// Counts one push in the control plane's metrics.
fn count(mesh: &Mesh, size: PushSize) {
    let m = &mesh.metrics;
    let form = if size.full > 0 { "full" } else { "delta" };
    m.push_messages.get_or_create(&KindLabel { kind: form }).inc();
    for (kind, bytes) in [
        ("full", size.full),
        ("own", size.own),
        ("policy", size.policy),
        ("endpoints", size.endpoints),
    ] {
        if bytes > 0 {
            m.push_bytes.get_or_create(&KindLabel { kind }).inc_by(bytes as u64);
        }
    }
    if size.total as i64 > m.push_largest.get() {
        m.push_largest.set(size.total as i64);
    }
}

/// Ends a stream at shutdown with `UNAVAILABLE`, which proxies answer by reconnecting. Never
/// waits: a proxy too slow to take the status still sees its stream end.
fn stop(tx: &mpsc::Sender<Queued>) {
    let _ = tx.try_send(Box::new(Err(Status::unavailable("the control plane is shutting down"))));
}

/// What a stream does after a message from its proxy.
#[derive(Debug, PartialEq)]
pub(crate) enum Follow {
    Nothing,
    /// Its subscriptions changed: plan its config again.
    Replan,
    /// It refused a push and kept its last good config.
    Refused,
    /// It asked for the whole config.
    Resync,
}

/// Applies one message a registered proxy sent on its stream (after its Register) to the mesh.
/// Returns what the stream does next, or the status that ends the stream. The fuzz target
/// `proxy_message` drives this same function.
pub(crate) fn receive(mesh: &Mesh, conn: u64, msg: proxy_message::Msg) -> Result<Follow, Status> {
    match msg {
        proxy_message::Msg::Subscribe(s) => {
            mesh.subscribe(conn, s.services);
            return Ok(Follow::Replan);
        }
        proxy_message::Msg::Ack(a) => mesh.ack(conn, a.version, a.revision),
        proxy_message::Msg::Nack(n) => {
            mesh.nack(conn, n.version, n.revision, n.reason);
            return Ok(Follow::Refused);
        }
        proxy_message::Msg::Resync(r) => {
            tracing::info!(conn, reason = %r.reason, "proxy asked for its whole config");
            return Ok(Follow::Resync);
        }
        proxy_message::Msg::Telemetry(t) => mesh.telemetry(conn, t),
        proxy_message::Msg::Tap(t) => mesh.taps.deliver(t.events),
        proxy_message::Msg::Register(_) => return Err(Status::invalid_argument("Register may be sent once per stream")),
    }
    Ok(Follow::Nothing)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(limit: usize, now: Instant) -> GateState {
        GateState {
            in_progress: limit,
            next_slot: now,
            mean: INITIAL_TIME.as_secs_f64(),
        }
    }

    /// Registrations that take 10 ms with 4 at a time: 400 a second. A stream refused behind
    /// 39 others is told to come back when they have been served, 100 ms on; after
    /// registrations slowed to 1 s each (4 a second, held at the floor of 50), 20 ms per place.
    #[test]
    fn the_hint_is_a_place_in_a_queue_served_at_the_rate_registrations_complete() {
        let (limit, t0) = (4, Instant::now());
        let mut g = gate(limit, t0);
        for _ in 0..200 {
            g.complete(limit, t0, t0 + Duration::from_millis(10));
        }
        assert!((g.rate(limit) - 400.0).abs() < 1.0, "rate {}", g.rate(limit));
        let hints: Vec<Duration> = (0..40).map(|_| g.enter(limit, t0).unwrap_err()).collect();
        assert_eq!(hints[0], MIN_HINT, "the first place is now: the least hint");
        let last = hints[39].as_secs_f64() * 1e3;
        assert!((97.0..=98.0).contains(&last), "39 places ahead at 2.5 ms each: {last} ms");

        let mut g = gate(limit, t0);
        for _ in 0..200 {
            g.complete(limit, t0, t0 + Duration::from_secs(1));
        }
        assert_eq!(g.rate(limit), MIN_RATE);
        let hints: Vec<Duration> = (0..10).map(|_| g.enter(limit, t0).unwrap_err()).collect();
        assert_eq!(hints[9], Duration::from_millis(180), "9 places at 20 ms");
    }

    /// The first estimate (256 ms each, 4 at a time: below the floor of 50 a second) put 100
    /// refused streams 2 s out; registrations then complete in 10 ms: the places handed out
    /// are served at the rate measured, so the next stream refused waits about 100 places at
    /// 2.5 ms, not 2 s.
    #[test]
    fn places_ahead_are_served_at_the_rate_measured_since() {
        let (limit, t0) = (4, Instant::now());
        let mut g = gate(limit, t0);
        for _ in 0..100 {
            g.enter(limit, t0).unwrap_err();
        }
        let before = (g.next_slot - t0).as_secs_f64();
        assert!((1.99..2.01).contains(&before), "100 places at 20 ms: {before} s");
        for _ in 0..200 {
            g.complete(limit, t0, t0 + Duration::from_millis(10));
        }
        let hint = g.enter(limit, t0 + Duration::from_millis(10)).unwrap_err().as_secs_f64() * 1e3;
        assert!((200.0..300.0).contains(&hint), "about 100 places ahead at 2.5 ms: {hint} ms");
    }

    /// Below the bound every stream gets a place at once; the bound's own place frees on drop.
    #[test]
    fn below_the_bound_a_place_is_given_at_once() {
        let (limit, t0) = (2, Instant::now());
        let mut g = gate(limit, t0);
        g.in_progress = 0;
        assert!(g.enter(limit, t0).is_ok());
        assert!(g.enter(limit, t0).is_ok());
        assert!(g.enter(limit, t0).is_err(), "the third waits");
    }
}
