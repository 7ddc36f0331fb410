//! Scripted ends of the control stream. A scripted proxy registers as told and answers every
//! config with whatever the test decides (ACK, NACK): for tests of what the control plane does
//! with proxies it cannot otherwise make misbehave. A scripted control plane sends real proxies
//! exactly the configs a test gives it, including ones the real control plane would never
//! produce: for tests of what proxies do with a bad push.

use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use weft_api::proto::{self, ControlMessage, ProxyMessage, control_message, distribution_client::DistributionClient, proxy_message};

/// Registers with `register` over `channel` (see `Control::channel`) and answers each config
/// with `respond` (a delta is applied to the last config it ACKed first, and answered with a
/// Resync when it does not build on it). The registration lasts until the returned task is dropped or aborted.
pub async fn proxy<R>(channel: tonic::transport::Channel, register: proto::Register, respond: R) -> tokio::task::JoinHandle<()>
where
    R: Fn(&proto::ProxyConfig) -> proxy_message::Msg + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(proto::ProxyMessage {
        msg: Some(proxy_message::Msg::Register(register)),
    })
    .await
    .unwrap();
    let mut inbound = DistributionClient::new(channel)
        .connect(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tokio::spawn(async move {
        // The last config it ACKed, which deltas build on (as a real proxy keeps it).
        let mut held: Option<proto::ProxyConfig> = None;
        while let Ok(Some(m)) = inbound.message().await {
            let cfg = match m.msg {
                Some(control_message::Msg::Config(cfg)) => cfg,
                Some(control_message::Msg::Delta(delta)) => {
                    match held
                        .as_ref()
                        .ok_or_else(|| "no config held".to_string())
                        .and_then(|h| weft_api::delta::apply(h, delta))
                    {
                        Ok(cfg) => cfg,
                        Err(reason) => {
                            if tx
                                .send(proto::ProxyMessage {
                                    msg: Some(proxy_message::Msg::Resync(proto::Resync { reason })),
                                })
                                .await
                                .is_err()
                            {
                                return;
                            }
                            continue;
                        }
                    }
                }
                _ => continue,
            };
            let answer = respond(&cfg);
            if matches!(answer, proxy_message::Msg::Ack(_)) {
                held = Some(cfg);
            }
            if tx.send(proto::ProxyMessage { msg: Some(answer) }).await.is_err() {
                return;
            }
        }
    })
}

/// The answer of a well-behaved proxy.
pub fn ack(cfg: &proto::ProxyConfig) -> proxy_message::Msg {
    proxy_message::Msg::Ack(proto::Ack {
        version: cfg.version,
        revision: cfg.revision,
    })
}

/// A plaintext control plane on a loopback port: every proxy that connects is sent the script
/// in order, the first config after its Register and each next one after its ACK or NACK, and
/// whatever [`ScriptedControl::push`] sends to all; every message proxies send is reported with
/// its stream's number (0, 1, ... in order of connection).
pub struct ScriptedControl {
    /// The gRPC URL to give proxies (`--control`).
    pub url: String,
    pub seen: mpsc::UnboundedReceiver<(usize, proxy_message::Msg)>,
    pushes: broadcast::Sender<proto::ProxyConfig>,
}

struct Script {
    configs: Vec<proto::ProxyConfig>,
    seen: mpsc::UnboundedSender<(usize, proxy_message::Msg)>,
    pushes: broadcast::Sender<proto::ProxyConfig>,
    streams: std::sync::atomic::AtomicUsize,
}

impl ScriptedControl {
    pub async fn start(configs: Vec<proto::ProxyConfig>) -> Self {
        let (seen_tx, seen) = mpsc::unbounded_channel();
        let (pushes, _) = broadcast::channel(16);
        let script = Script {
            configs,
            seen: seen_tx,
            pushes: pushes.clone(),
            streams: Default::default(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(proto::distribution_server::DistributionServer::new(script))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        Self { url, seen, pushes }
    }

    /// Sends `config` to every proxy connected now.
    pub fn push(&self, config: proto::ProxyConfig) {
        let _ = self.pushes.send(config);
    }

    /// The next message any proxy sent, with its stream's number; fails after 10 s.
    pub async fn next(&mut self) -> (usize, proxy_message::Msg) {
        tokio::time::timeout(std::time::Duration::from_secs(10), self.seen.recv())
            .await
            .expect("a message from a proxy within 10 s")
            .expect("the scripted control plane runs")
    }
}

#[tonic::async_trait]
impl proto::distribution_server::Distribution for Script {
    type ConnectStream = ReceiverStream<Result<ControlMessage, Status>>;

    async fn certify(&self, _: Request<proto::CertifyRequest>) -> Result<Response<proto::CertifyResponse>, Status> {
        Err(Status::unimplemented("this scripted control plane issues no certificates"))
    }

    async fn connect(&self, req: Request<Streaming<ProxyMessage>>) -> Result<Response<Self::ConnectStream>, Status> {
        let stream = self.streams.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(8);
        let (mut script, seen, mut pushes) = (self.configs.clone().into_iter(), self.seen.clone(), self.pushes.subscribe());
        tokio::spawn(async move {
            let send = |cfg: proto::ProxyConfig| {
                let tx = tx.clone();
                async move {
                    let msg = ControlMessage {
                        msg: Some(control_message::Msg::Config(cfg)),
                    };
                    tx.send(Ok(msg)).await.is_ok()
                }
            };
            loop {
                let next = tokio::select! {
                    msg = inbound.message() => match msg {
                        Ok(Some(ProxyMessage { msg: Some(m) })) => {
                            let answer = matches!(m, proxy_message::Msg::Register(_) | proxy_message::Msg::Ack(_) | proxy_message::Msg::Nack(_));
                            let _ = seen.send((stream, m));
                            if answer { script.next() } else { None }
                        }
                        Ok(Some(_)) => None,
                        _ => return,
                    },
                    pushed = pushes.recv() => match pushed {
                        Ok(cfg) => Some(cfg),
                        Err(_) => return,
                    },
                };
                if let Some(cfg) = next
                    && !send(cfg).await
                {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
