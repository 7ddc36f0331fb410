//! CSR handling: the CA signing a proxy's CSR ([`Ca::certify`](weft_control::ca::Ca::certify)).
//!
//! The input is a CSR as DER (wrapped in PEM here, so the fuzzer mutates the structure, not its
//! base64) or, when it starts with `-----BEGIN`, as PEM text. Property: whatever the CSR asks, a
//! certificate issued names exactly the identity the CA decided, once, and nothing else.

use crate::fixture;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use x509_parser::extensions::GeneralName;

const PEM_BEGIN: &str = "-----BEGIN";

pub fn run(data: &[u8]) {
    let pem = if data.starts_with(PEM_BEGIN.as_bytes()) {
        let Ok(text) = std::str::from_utf8(data) else { return };
        text.to_string()
    } else {
        pem(data)
    };
    let ca = fixture::ca();
    let Ok(issued) = ca.certify("default", "orders", "orders", &pem) else {
        return;
    };
    let identity = ca.identity("default", "orders");
    assert_eq!(issued.identity, identity);
    let der = weft_control::ca::pem_der(&issued.chain_pem).expect("the issued chain is PEM");
    let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("the issued certificate parses");
    let sans = cert
        .subject_alternative_name()
        .expect("one SAN extension")
        .expect("a SAN extension");
    let names: Vec<String> = sans
        .value
        .general_names
        .iter()
        .map(|name| match name {
            GeneralName::URI(uri) => uri.to_string(),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(names, [identity], "the certificate names other than the decided identity");
}

/// `der` as a PEM certificate request.
pub fn pem(der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|line| std::str::from_utf8(line).expect("base64 is ASCII"))
        .collect();
    format!(
        "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
        lines.join("\n")
    )
}
