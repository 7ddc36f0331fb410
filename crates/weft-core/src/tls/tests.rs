use super::*;
use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};

/// A root: its DER, PEM, and issuer.
struct Root {
    der: CertificateDer<'static>,
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn root(name: &str) -> Root {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    let cert = params.self_signed(&key).unwrap();
    let pem = cert.pem();
    Root {
        der: cert.der().clone(),
        issuer: Issuer::from_ca_cert_pem(&pem, key).unwrap(),
        pem,
    }
}

/// A serving leaf for 127.0.0.1 and localhost, or a client leaf with one SPIFFE ID.
fn leaf(root: &Root, client: bool) -> CertificateDer<'static> {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    if client {
        params.subject_alt_names = vec![SanType::URI("spiffe://weft.local/ns/default/sa/web".try_into().unwrap())];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    } else {
        params.subject_alt_names = vec![
            SanType::DnsName("localhost".try_into().unwrap()),
            SanType::IpAddress("127.0.0.1".parse().unwrap()),
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    }
    params.signed_by(&key, &root.issuer).unwrap().der().clone()
}

fn name(s: &str) -> ServerName<'static> {
    ServerName::try_from(s.to_string()).unwrap()
}

fn check(v: &PinnedVerifier, chain: &[CertificateDer<'static>], server: &str) -> Result<(), rustls::Error> {
    v.verify_server_cert(&chain[0], &chain[1..], &name(server), &[], UnixTime::now())
        .map(|_| ())
}

#[test]
fn fingerprints_are_hex_sha256_of_the_der() {
    // SHA-256 of the empty input.
    assert_eq!(fingerprint(b""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
}

#[test]
fn the_pinned_ca_in_the_chain_and_the_dialled_name_are_both_required() {
    let mesh = root("mesh");
    let v = PinnedVerifier::new(&fingerprint(&mesh.der));
    let chain = [leaf(&mesh, false), mesh.der.clone()];
    assert!(check(&v, &chain, "127.0.0.1").is_ok());
    assert!(check(&v, &chain, "localhost").is_ok());

    // Another name than the certificate's.
    let err = check(&v, &chain, "10.1.2.3").unwrap_err().to_string();
    assert!(err.contains("not valid for 10.1.2.3"), "{err}");

    // The root left out of the chain: nothing is trusted on first use.
    let err = check(&v, &chain[..1], "127.0.0.1").unwrap_err().to_string();
    assert!(err.contains("presented no CA certificate"), "{err}");

    // A chain whose root has the pinned fingerprint's place taken by another CA.
    let other = root("impostor");
    let err = check(&v, &[leaf(&other, false), other.der.clone()], "127.0.0.1")
        .unwrap_err()
        .to_string();
    let (pinned, presented) = (fingerprint(&mesh.der), fingerprint(&other.der));
    assert!(err.contains(&pinned) && err.contains(&presented), "names both fingerprints: {err}");
    assert_eq!(v.take_refusal().as_deref(), Some(err.trim_start_matches("unexpected error: ")));
    assert_eq!(v.take_refusal(), None, "a refusal is reported once");

    // The pinned root presented beside a leaf it did not sign.
    let err = check(&v, &[leaf(&other, false), mesh.der.clone()], "127.0.0.1")
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not verify against the pinned CA"), "{err}");
}

#[test]
fn a_trust_bundle_received_later_replaces_the_pin() {
    let old = root("old");
    let new = root("new");
    let v = PinnedVerifier::new(&fingerprint(&old.der));
    let from_new = [leaf(&new, false), new.der.clone()];
    assert!(check(&v, &from_new, "127.0.0.1").is_err(), "not trusted before the bundle");
    v.trust_bundle(&format!("{}{}", old.pem, new.pem)).unwrap();
    assert!(check(&v, &from_new, "127.0.0.1").is_ok(), "the rotation's new root");
    // The bundle needs no CA in the chain: its roots are the anchors.
    assert!(check(&v, &from_new[..1], "127.0.0.1").is_ok());
    // Once the rotation retires the old root, the pin no longer vouches for it.
    v.trust_bundle(&new.pem).unwrap();
    let err = check(&v, &[leaf(&old, false), old.der.clone()], "127.0.0.1").unwrap_err();
    assert!(err.to_string().contains("trust bundle"), "{err}");
}

#[test]
fn client_certificates_are_optional_but_must_verify_against_the_current_roots() {
    let mesh = root("mesh");
    let other = root("other");
    let v = RootsClientVerifier::new(&mesh.pem).unwrap();
    assert!(v.offer_client_auth() && !v.client_auth_mandatory());
    let client = leaf(&mesh, true);
    assert!(v.verify_client_cert(&client, &[], UnixTime::now()).is_ok());
    assert!(v.verify_client_cert(&leaf(&other, true), &[], UnixTime::now()).is_err());
    // A serving certificate is not a client certificate.
    assert!(v.verify_client_cert(&leaf(&mesh, false), &[], UnixTime::now()).is_err());
    v.set_roots(&other.pem).unwrap();
    assert!(v.verify_client_cert(&client, &[], UnixTime::now()).is_err(), "the old root is gone");
    assert!(v.verify_client_cert(&leaf(&other, true), &[], UnixTime::now()).is_ok());
}

#[test]
fn pem_errors_name_the_file() {
    let err = certs_from_pem("not pem", "/etc/weft/ca.pem").unwrap_err().to_string();
    assert_eq!(err, "/etc/weft/ca.pem: holds no certificate");
}
