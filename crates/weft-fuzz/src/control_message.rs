//! Protobuf from the control plane, as a proxy receives it: a `ControlMessage` decoded with
//! prost; a config converted with [`MeshConfig::try_from`] (the conversion whose refusal is a
//! NACK) and, when accepted, each service's policy compiled into routes as the proxy does before
//! it swaps the config in.
//!
//! Property: an accepted service converts back to the same wire form and then to the same
//! domain value (what the control plane sends is what the proxy runs).

use prost::Message;
use weft_api::mesh::MeshConfig;
use weft_api::proto::{self, ControlMessage, control_message::Msg};
use weft_proxy::route;

pub fn run(data: &[u8]) {
    let Ok(msg) = ControlMessage::decode(data) else { return };
    let Some(Msg::Config(config)) = msg.msg else { return };
    let Ok(config) = MeshConfig::try_from(config) else { return };
    for service in config.services.values() {
        route::compile(service.policy.as_ref());
        let back = MeshConfig::try_from(proto::ProxyConfig {
            services: vec![proto::Service::from(service.as_ref())],
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("an accepted service is refused once re-encoded: {e}"));
        assert_eq!(&back.services[&service.key()], service, "a service changed through its wire form");
    }
}
