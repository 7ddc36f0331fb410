//! The control plane reaching etcd over TLS with a client certificate (`--store-ca`,
//! `--store-cert`, `--store-key`; issue #16 part 1): a real etcd that serves clients over TLS
//! only and requires client certificates (`--client-cert-auth`), its PKI made by the test.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;
use weft_test::etcd::EtcdCluster;
use weft_test::pki::Pki;
use weft_test::{Control, Process, eventually};

const BIN: &str = env!("CARGO_BIN_EXE_weft");

const POLICY: &str =
    "apiVersion: weft/v1\nkind: TrafficPolicy\nmetadata: {name: orders}\nspec: {service: orders, routes: [{timeout: 2s}]}\n";

fn tls_flags(ca: &Path, cert: &Path, key: &Path) -> Vec<String> {
    [("--store-ca", ca), ("--store-cert", cert), ("--store-key", key)]
        .iter()
        .flat_map(|(flag, path)| [flag.to_string(), path.display().to_string()])
        .collect()
}

/// `weft control` on `store` with `flags`, expected to exit at once: its exit status and output.
fn control_exits(store: &str, flags: &[String]) -> Output {
    let dir = std::env::temp_dir().join(format!("weft-store-tls-{}-{}", std::process::id(), flags.len()));
    let out = Command::new(BIN)
        .args([
            "control",
            "--data-dir",
            &dir.display().to_string(),
            "--api",
            "127.0.0.1:0",
            "--grpc",
            "127.0.0.1:0",
        ])
        .args(["--store", store])
        .args(flags)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    out
}

#[tokio::test]
async fn a_control_plane_reaches_etcd_over_tls_with_a_client_certificate() {
    let pki = Pki::new("etcd test CA");
    let etcd = EtcdCluster::start_tls(1, &pki).await;
    let tls = etcd.tls().clone();
    let control = Control::start_on_store(BIN, &etcd.url(), None, &tls_flags(&tls.ca, &tls.cert, &tls.key)).await;
    // Writes wait for the replica to win the leader's lease, itself kept in etcd.
    let applied = eventually(Duration::from_secs(15), "a write through TLS to etcd", || async {
        let (status, applied) = control.post("/api/v1/resources", POLICY).await;
        (status == 200).then_some(applied)
    })
    .await;
    let revision = applied["revision"].as_u64().expect("a revision");
    let resources = control.get("/api/v1/resources").await;
    assert!(resources.to_string().contains("\"timeout\":\"2s\""), "{resources}");

    // The same etcd over plaintext gRPC: etcd serves TLS only, so nothing answers, and the
    // replica never becomes ready (it waits for the store) while it says why.
    let dir = std::env::temp_dir().join(format!("weft-store-tls-plain-{}", std::process::id()));
    let args: Vec<String> = [
        "control",
        "--data-dir",
        &dir.display().to_string(),
        "--api",
        "127.0.0.1:0",
        "--grpc",
        "127.0.0.1:0",
        "--store",
        &etcd.url(),
    ]
    .map(String::from)
    .to_vec();
    let mut plain = Process::spawn(BIN, "control-plaintext", &args);
    let gone = plain.wait(Duration::from_secs(10));
    let log = plain.log_text();
    drop(plain);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        gone.is_none_or(|code| code != 0),
        "a replica that cannot reach etcd does not start as if it could: {log}"
    );
    assert!(log.contains("etcd at") && log.contains("connection"), "says why: {log}");

    // A CA that did not sign etcd's certificate: the replica refuses etcd, and says so.
    let other = Pki::new("another CA");
    let other_ca = dir.join("other-ca.pem");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(&other_ca, &other.cert_pem).unwrap();
    let out = control_exits(&etcd.url(), &tls_flags(&other_ca, &tls.cert, &tls.key));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("certificate") && stderr.contains("UnknownIssuer"),
        "says why: {stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    // The first replica's revision is still the newest: the others wrote nothing.
    let status = control.get("/api/v1/status").await;
    assert_eq!(Control::revision_of(&status), revision, "{status}");
}

#[tokio::test]
async fn bad_store_tls_files_are_refused_at_start_naming_the_flag_and_the_file() {
    let pki = Pki::new("etcd test CA");
    let dir = std::env::temp_dir().join(format!("weft-store-tls-files-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert_pem, key_pem) = pki.leaf_pem(&["127.0.0.1"]);
    let (_, other_key_pem) = pki.leaf_pem(&["127.0.0.1"]);
    let file = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let (ca, cert, key) = (
        file("ca.pem", &pki.cert_pem),
        file("cert.pem", &cert_pem),
        file("key.pem", &key_pem),
    );
    let other_key = file("other-key.pem", &other_key_pem);
    let not_pem = file("not.pem", "hello\n");
    let missing = dir.join("missing.pem");
    let store = "etcd://127.0.0.1:1";
    let cases = [
        (tls_flags(&missing, &cert, &key), "--store-ca", &missing, "cannot read"),
        (tls_flags(&not_pem, &cert, &key), "--store-ca", &not_pem, "no certificate"),
        (tls_flags(&ca, &not_pem, &key), "--store-cert", &not_pem, "no certificate"),
        (tls_flags(&ca, &cert, &not_pem), "--store-key", &not_pem, "no private key"),
        (
            tls_flags(&ca, &cert, &other_key),
            "--store-key",
            &other_key,
            "does not go with --store-cert",
        ),
    ];
    for (flags, flag, path, why) in cases {
        let out = control_exits(store, &flags);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flags:?}: {stderr}");
        let named = format!("{flag} {}", path.display());
        assert!(
            stderr.contains(&named) && stderr.contains(why),
            "{flags:?}: expected {named:?} and {why:?} in: {stderr}"
        );
    }
    // A client certificate needs its key and a CA: clap says so before anything starts.
    let out = control_exits(store, &["--store-cert".into(), cert.display().to_string()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--store-key") && stderr.contains("--store-ca"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}
