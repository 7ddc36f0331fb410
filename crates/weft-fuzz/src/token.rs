//! Join tokens: the format a proxy reads ([`weft_api::token`]) and the control plane's check of
//! signature and expiry ([`Ca::verify_token`](weft_control::ca::Ca::verify_token)).
//!
//! Properties: readable claims are the claims the token's own signed part encodes (nothing is
//! read from outside it); the control plane accepts a token only with exactly those claims.

use crate::fixture;
use weft_api::token::{peek, split};

pub fn run(data: &[u8]) {
    let Ok(token) = std::str::from_utf8(data) else { return };
    let verified = fixture::ca().verify_token(token);
    let Ok((signed, claims, _signature)) = split(token) else {
        assert!(verified.is_err(), "the control plane accepted a token a proxy cannot read");
        return;
    };
    assert!(token.starts_with(signed), "the signed part is not the token's start");
    let reread = peek(&format!("{}.AA", claims.signed_part())).expect("claims written by the code read back");
    assert_eq!(reread, claims, "claims changed through their own encoding");
    if let Ok(accepted) = verified {
        assert_eq!(accepted, claims, "the control plane read other claims than the proxy");
    }
}
