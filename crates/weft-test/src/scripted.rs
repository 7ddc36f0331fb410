//! A scripted proxy: speaks the control stream itself, registers as told, and answers every
//! config with whatever the test decides (ACK, NACK). For tests of what the control plane does
//! with proxies it cannot otherwise make misbehave.

use weft_api::proto::{self, control_message, distribution_client::DistributionClient, proxy_message};

/// Registers with `register` over `channel` (see `Control::channel`) and answers each config
/// with `respond`. The registration lasts until the returned task is dropped or aborted.
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
        while let Ok(Some(m)) = inbound.message().await {
            let Some(control_message::Msg::Config(cfg)) = m.msg else { continue };
            if tx.send(proto::ProxyMessage { msg: Some(respond(&cfg)) }).await.is_err() {
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
