//! The generated protobuf code is checked in; this test regenerates it with protox (no protoc)
//! and fails when the checked-in copy has drifted from `proto/`. Run with
//! `WEFT_REGENERATE=1 cargo test -p weft-api --test codegen` to refresh it.

use std::path::{Path, PathBuf};

#[test]
fn generated_code_matches_proto() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let checked_in = root.join("src/gen/weft.v1.rs");
    let fresh = generate(&root.join("proto"), "weft.proto", "weft.v1.rs");
    if std::env::var_os("WEFT_REGENERATE").is_some() {
        std::fs::write(&checked_in, &fresh).expect("write generated code");
        return;
    }
    let current = std::fs::read_to_string(&checked_in).expect("read checked-in generated code");
    assert!(
        current == fresh,
        "{} is stale: regenerate with WEFT_REGENERATE=1 cargo test -p weft-api --test codegen",
        checked_in.display()
    );
}

/// Compiles `file` under `include` and returns the generated Rust for it.
pub fn generate(include: &Path, file: &str, output: &str) -> String {
    let descriptors = protox::compile([file], [include]).expect("proto compiles");
    let out: PathBuf = std::env::temp_dir().join(format!(
        "weft-codegen-{}-{}",
        std::process::id(),
        output.replace('.', "-")
    ));
    std::fs::create_dir_all(&out).unwrap();
    tonic_prost_build::configure()
        .build_transport(false)
        .out_dir(&out)
        .compile_fds(descriptors)
        .expect("codegen");
    let text = std::fs::read_to_string(out.join(output)).expect("generated file");
    std::fs::remove_dir_all(&out).ok();
    text
}
