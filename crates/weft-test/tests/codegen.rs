//! Generated protobuf code is checked in. This test regenerates every proto of the workspace
//! with protox (no protoc) and fails when a checked-in copy has drifted. Refresh with
//! `WEFT_REGENERATE=1 cargo test -p weft-test --test codegen`.

use std::path::{Path, PathBuf};

#[test]
fn generated_code_matches_proto() {
    let crates = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut stale = Vec::new();
    // weft's own services use weft-api's lean codec (small buffers per stream); the others
    // keep tonic's.
    for (krate, proto, output, codec) in [
        ("weft-api", "weft.proto", "weft.v1.rs", "crate::codec::Lean"),
        (
            "weft-api",
            "otlp_trace.proto",
            "opentelemetry.proto.collector.trace.v1.rs",
            "tonic_prost::ProstCodec",
        ),
        ("weft-test", "echo.proto", "weft.test.rs", "tonic_prost::ProstCodec"),
        ("weft-control", "etcd.proto", "etcdserverpb.rs", "tonic_prost::ProstCodec"),
    ] {
        let root = crates.join(krate);
        let checked_in = root.join("src/gen").join(output);
        let fresh = generate(&root.join("proto"), proto, output, codec);
        if std::env::var_os("WEFT_REGENERATE").is_some() {
            std::fs::write(&checked_in, &fresh).expect("write generated code");
            continue;
        }
        let current = std::fs::read_to_string(&checked_in).unwrap_or_default();
        if current != fresh {
            stale.push(checked_in.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "stale generated code in {stale:?}: regenerate with WEFT_REGENERATE=1 cargo test -p weft-test --test codegen"
    );
}

/// Compiles `file` under `include` and returns the generated Rust for it, its services using
/// `codec`.
fn generate(include: &Path, file: &str, output: &str, codec: &str) -> String {
    let descriptors = protox::compile([file], [include]).expect("proto compiles");
    let out: PathBuf = std::env::temp_dir().join(format!("weft-codegen-{}-{}", std::process::id(), output.replace('.', "-")));
    std::fs::create_dir_all(&out).unwrap();
    tonic_prost_build::configure()
        .build_transport(false)
        .codec_path(codec)
        .out_dir(&out)
        .compile_fds(descriptors)
        .expect("codegen");
    let text = std::fs::read_to_string(out.join(output)).expect("generated file");
    std::fs::remove_dir_all(&out).ok();
    text
}
