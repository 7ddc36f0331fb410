//! The join token's format: `weft1.<claims>.<signature>`, the claims being base64url JSON.
//!
//! The control plane signs tokens (HMAC with a key only it holds) and verifies them; a proxy
//! cannot verify the signature, but it reads the claims to learn which CA to pin
//! (`ca`, the SHA-256 fingerprint of the root's DER) before it trusts the control plane at all.
//! What a proxy reads from a token it could not verify decides only what it will *accept*, never
//! what it is granted: the control plane checks the signature.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

/// The first segment of every join token.
pub const PREFIX: &str = "weft1";

/// What a token says: which workload holds it, until when, and the CA that serves it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claims {
    /// The token's id: its record in the control plane's store (revocation, use count).
    pub jti: String,
    pub ns: String,
    pub name: String,
    /// Service account: the last segment of the SPIFFE ID.
    pub sa: String,
    /// Expiry, unix seconds.
    pub exp: u64,
    /// SHA-256 of the DER of the CA root that signs the control plane's serving certificate,
    /// lowercase hex.
    pub ca: String,
}

/// Why a string is not a readable join token. Never carries the token itself.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("not a weft join token (expected {PREFIX}.<claims>.<signature>)")]
    Format,
    #[error("the token's claims are unreadable")]
    Claims,
}

// === impl Claims ===

impl Claims {
    /// `NAMESPACE/NAME`.
    pub fn workload(&self) -> String {
        format!("{}/{}", self.ns, self.name)
    }

    /// The signed part of a token: `weft1.<claims>`.
    pub fn signed_part(&self) -> String {
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(self).expect("claims serialize"));
        format!("{PREFIX}.{body}")
    }
}

/// Splits a token into its signed part (`weft1.<claims>`), its claims and its signature bytes,
/// without checking the signature.
pub fn split(token: &str) -> Result<(&str, Claims, Vec<u8>), TokenError> {
    let mut parts = token.split('.');
    let (Some(PREFIX), Some(body), Some(sig), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(TokenError::Format);
    };
    let signed = &token[..PREFIX.len() + 1 + body.len()];
    let sig = URL_SAFE_NO_PAD.decode(sig).map_err(|_| TokenError::Format)?;
    let claims = URL_SAFE_NO_PAD
        .decode(body)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or(TokenError::Claims)?;
    Ok((signed, claims, sig))
}

/// The claims of a token, unverified: what a proxy learns from its own token.
pub fn peek(token: &str) -> Result<Claims, TokenError> {
    split(token).map(|(_, claims, _)| claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> Claims {
        Claims {
            jti: "t1".into(),
            ns: "default".into(),
            name: "orders".into(),
            sa: "orders".into(),
            exp: 1,
            ca: "ab".repeat(32),
        }
    }

    #[test]
    fn a_token_splits_into_its_signed_part_claims_and_signature() {
        let c = claims();
        let token = format!("{}.{}", c.signed_part(), URL_SAFE_NO_PAD.encode([1u8, 2, 3]));
        let (signed, read, sig) = split(&token).unwrap();
        assert_eq!((signed, &read, sig.as_slice()), (c.signed_part().as_str(), &c, &[1u8, 2, 3][..]));
        assert_eq!(peek(&token).unwrap().workload(), "default/orders");
    }

    #[test]
    fn anything_else_is_refused_without_echoing_it() {
        for bad in [
            "",
            "s3cr3t",
            "weft1.s3cr3t",
            "weft2.e30.s3cr3t",
            "weft1.e30.AA.s3cr3t",
            "weft1.s3cr3t!.AA",
            "weft1.e30.s3cr3t!",
        ] {
            let err = peek(bad).expect_err(bad).to_string();
            assert!(!err.contains("s3cr3t"), "{bad}: {err}");
        }
        // Valid base64 and JSON, but not the claims of a token.
        assert_eq!(peek("weft1.e30.AA"), Err(TokenError::Claims));
    }
}
