//! The control plane's own metrics, served on `/metrics` of the API listener.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone)]
pub(crate) struct ControlMetrics {
    pub(crate) proxies: Gauge,
    pub(crate) revision: Gauge,
    pub(crate) pushes: Counter,
    pub(crate) acks: Counter,
    pub(crate) nacks: Counter,
    pub(crate) telemetry_reports: Counter,
    pub(crate) push_to_ack: Histogram,
    pub(crate) certificates: Counter,
    pub(crate) refused_csrs: Counter,
    /// Intents by phase (set when scraped).
    pub(crate) intents: Family<PhaseLabel, Gauge>,
    /// Decisions by outcome (stage-passed, promoted, rolled-back, failed).
    pub(crate) decisions: Family<OutcomeLabel, Counter>,
    /// Connections to the API and gRPC listeners by handshake outcome.
    pub(crate) handshakes: Family<HandshakeLabel, Counter>,
    /// Certificates and registrations refused for want of proof, by reason.
    pub(crate) refused_admissions: Family<ReasonLabel, Counter>,
    /// Encoded bytes pushed, by what they carry ([`KindLabel`]).
    pub(crate) push_bytes: Family<KindLabel, Counter>,
    /// Pushes by form: `full` (a whole config) or `delta`.
    pub(crate) push_messages: Family<KindLabel, Counter>,
    /// Whole configs sent instead of a delta, by reason: `asked` (the proxy missed a version).
    pub(crate) resyncs: Family<ReasonLabel, Counter>,
    /// Pushes held back because the stream's queue was full (the next carries their changes).
    pub(crate) deferred: Counter,
    /// The largest single push so far, bytes.
    pub(crate) push_largest: Gauge,
    /// Streams told to come back later: registrations in progress were at their bound.
    pub(crate) registrations_deferred: Counter,
    /// Registrations in progress (Register received, first config not ACKed yet).
    pub(crate) registering: Gauge,
    /// Membership changes published as one change generation after a fold interval.
    pub(crate) membership_folds: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct KindLabel {
    /// Bytes: `full` (whole configs), and in deltas `own` (the proxy's own part), `policy`
    /// (services' policy parts) and `endpoints` (endpoint changes). Messages: `full`, `delta`.
    pub(crate) kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct HandshakeLabel {
    /// `api` or `grpc`.
    pub(crate) listener: &'static str,
    /// `accepted` (or plaintext taken as is), `failed`, `timed-out`.
    pub(crate) outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReasonLabel {
    pub(crate) reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct PhaseLabel {
    pub(crate) phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct OutcomeLabel {
    pub(crate) outcome: &'static str,
}

impl ControlMetrics {
    pub(crate) fn register(registry: &mut Registry) -> Self {
        let m = Self {
            proxies: Gauge::default(),
            revision: Gauge::default(),
            pushes: Counter::default(),
            acks: Counter::default(),
            nacks: Counter::default(),
            telemetry_reports: Counter::default(),
            certificates: Counter::default(),
            refused_csrs: Counter::default(),
            intents: Family::default(),
            decisions: Family::default(),
            handshakes: Family::default(),
            refused_admissions: Family::default(),
            push_bytes: Family::default(),
            push_messages: Family::default(),
            resyncs: Family::default(),
            deferred: Counter::default(),
            push_largest: Gauge::default(),
            registrations_deferred: Counter::default(),
            registering: Gauge::default(),
            membership_folds: Counter::default(),
            push_to_ack: Histogram::new([0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]),
        };
        registry.register("proxies_connected", "Proxies with an open control stream", m.proxies.clone());
        registry.register("revision", "Current mesh policy revision", m.revision.clone());
        registry.register("config_pushes", "Configs pushed to proxies", m.pushes.clone());
        registry.register("config_acks", "Configs proxies applied", m.acks.clone());
        registry.register("config_nacks", "Configs proxies refused", m.nacks.clone());
        registry.register("intents", "Intents by phase", m.intents.clone());
        registry.register(
            "decisions",
            "Decisions the control loop took, by outcome (stage-passed, promoted, rolled-back, failed)",
            m.decisions.clone(),
        );
        registry.register("certificates_issued", "Workload certificates the CA issued", m.certificates.clone());
        registry.register(
            "csrs_refused",
            "CSRs the CA refused (another identity, extra names)",
            m.refused_csrs.clone(),
        );
        registry.register(
            "tls_handshakes",
            "Connections to the API and gRPC listeners by TLS handshake outcome (accepted, failed, timed-out)",
            m.handshakes.clone(),
        );
        registry.register(
            "admissions_refused",
            "Registrations and certificate requests refused for want of proof, by reason",
            m.refused_admissions.clone(),
        );
        registry.register(
            "telemetry_reports",
            "Telemetry summaries received from proxies",
            m.telemetry_reports.clone(),
        );
        registry.register(
            "config_push_bytes",
            "Encoded bytes of configs pushed, by what they carry (full; delta parts own, policy, endpoints)",
            m.push_bytes.clone(),
        );
        registry.register(
            "config_push_messages",
            "Configs pushed, by form (full, delta)",
            m.push_messages.clone(),
        );
        registry.register(
            "config_resyncs",
            "Whole configs sent instead of a delta, by reason (asked: the proxy missed a version)",
            m.resyncs.clone(),
        );
        registry.register(
            "config_pushes_deferred",
            "Pushes held back because the proxy had not answered the last ones or its stream queue was full; the next one carries their changes",
            m.deferred.clone(),
        );
        registry.register(
            "registrations_deferred",
            "Proxies told to come back after a delay: registrations in progress were at --max-registering",
            m.registrations_deferred.clone(),
        );
        registry.register(
            "registrations_in_progress",
            "Proxies registered whose first config is not ACKed yet",
            m.registering.clone(),
        );
        registry.register(
            "membership_folds",
            "Proxies joining, leaving or subscribing published together after a fold interval",
            m.membership_folds.clone(),
        );
        registry.register(
            "config_push_largest_bytes",
            "The largest single config push so far",
            m.push_largest.clone(),
        );
        registry.register(
            "push_to_ack_seconds",
            "Time from pushing a config to its ACK",
            m.push_to_ack.clone(),
        );
        m
    }
}
