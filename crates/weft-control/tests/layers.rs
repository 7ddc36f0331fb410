//! The control plane's modules import only downward (the check is [`weft_test::layers`]).
//!
//! `cargo test -p weft-control --test layers -- --nocapture` prints the modules floor by floor
//! (each one stands above everything it uses) with what each imports, on standard error.

#[test]
fn modules_import_only_downward() {
    weft_test::layers::check(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
}
