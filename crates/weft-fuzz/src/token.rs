//! Join tokens: the format a proxy reads ([`weft_api::token`]) and the control plane's check of
//! signature and expiry, driven through [`weft_control::fuzz::token`].
//!
//! Properties: readable claims are the claims the token's own signed part encodes (nothing is
//! read from outside it); the control plane accepts a token only with exactly those claims.

pub fn run(data: &[u8]) {
    weft_control::fuzz::token(data);
}
