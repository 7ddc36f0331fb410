//! CSR handling: the CA signing a proxy's CSR, driven through
//! [`weft_control::fuzz::csr`] (the CA is private to the control plane).
//!
//! The input is a CSR as DER (wrapped in PEM there, so the fuzzer mutates the structure, not
//! its base64) or, when it starts with `-----BEGIN`, as PEM text. Property: whatever the CSR
//! asks, a certificate issued names exactly the identity the CA decided, once, and nothing else.

pub fn run(data: &[u8]) {
    weft_control::fuzz::csr(data);
}
