//! Replays every checked-in fuzz input through its target, without libFuzzer: the seed corpus
//! and what coverage-guided runs added to it (`fuzz/corpus/TARGET/`), and every crash ever
//! found (`fuzz/regressions/TARGET/`). A target that panics on any of them fails the test,
//! naming the file.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use weft_fuzz::{TARGETS, framing};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

/// The files of `dir`, sorted; none when it does not exist.
fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn every_corpus_and_regression_file_replays_without_a_panic() {
    let mut failures = Vec::new();
    let mut replayed = 0;
    for target in TARGETS {
        let corpus = files(&fuzz_dir().join("corpus").join(target.name));
        assert!(
            corpus.len() >= 2,
            "fuzz/corpus/{} has {} inputs; every target keeps its seeds (cargo run -p weft-fuzz --bin weft-fuzz-seeds)",
            target.name,
            corpus.len()
        );
        let regressions = files(&fuzz_dir().join("regressions").join(target.name));
        for file in corpus.iter().chain(&regressions) {
            let data = std::fs::read(file).expect("a fuzz input reads");
            if catch_unwind(AssertUnwindSafe(|| (target.run)(&data))).is_err() {
                failures.push(file.display().to_string());
            }
            replayed += 1;
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {replayed} inputs panicked: {failures:#?}",
        failures.len()
    );
}

#[test]
fn every_target_has_a_libfuzzer_driver() {
    let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).expect("fuzz/Cargo.toml reads");
    let run = std::fs::read_to_string(fuzz_dir().join("run")).expect("fuzz/run reads");
    let listed = run
        .lines()
        .find(|l| l.starts_with("TARGETS=("))
        .expect("fuzz/run lists its targets");
    for target in TARGETS {
        assert!(
            manifest.contains(&format!("name = \"{}\"", target.name)),
            "fuzz/Cargo.toml has no bin {}",
            target.name
        );
        assert!(
            listed.split(['(', ')', ' ']).any(|t| t == target.name),
            "fuzz/run does not list {}",
            target.name
        );
        let driver = fuzz_dir().join("fuzz_targets").join(format!("{}.rs", target.name));
        let text = std::fs::read_to_string(&driver).unwrap_or_else(|e| panic!("{}: {e}", driver.display()));
        assert!(
            text.contains(&format!("weft_fuzz::{}::run(data)", target.name)),
            "{} must call weft_fuzz::{}::run",
            driver.display(),
            target.name
        );
    }
}

/// The resource seeds parse and validate, so the fuzzer starts from inputs that reach the store
/// and proxy round trips; only `examples/policies/bad-subset.yaml` is meant to be refused.
#[test]
fn the_resource_seeds_are_accepted_resources() {
    let seeds: Vec<PathBuf> = files(&fuzz_dir().join("corpus/resource"))
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("seed-")))
        .collect();
    assert!(seeds.len() >= 5, "{seeds:?}");
    for seed in seeds {
        let name = seed.file_name().unwrap_or_default().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&seed).expect("a seed reads");
        let parsed = weft_api::resource::parse_objects(&text, &name);
        assert_eq!(parsed.is_ok(), name != "seed-bad-subset.yaml", "{name}: {parsed:?}");
    }
}

/// A request smuggler controls TCP segmentation, so the framing scanner's outcome (verdicts and
/// the bytes hyper gets) must not depend on how the stream is cut: every framing input is
/// replayed with the connection delivering it, and hyper reading it, in reads of 1, 2, 3, 7
/// and 64 bytes and in seeded random sizes, against the whole stream in one read.
#[test]
fn every_framing_input_has_one_outcome_however_it_is_cut() {
    let fixed = [1usize, 2, 3, 7, 64];
    let seeds = [0u8, 1, 17, 42, 99, 128, 200, 255];
    let mut failures = Vec::new();
    for file in files(&fuzz_dir().join("corpus").join("framing")) {
        let data = std::fs::read(&file).expect("a fuzz input reads");
        let stream = data.get(1..).unwrap_or_default();
        let oracle = framing::outcome(stream, framing::whole(stream), framing::whole(stream));
        let mut check = |pattern: String, outcome: framing::Outcome| {
            if outcome != oracle {
                let name = file.file_name().unwrap_or_default().to_string_lossy();
                failures.push(format!("{name} {pattern}: {}", framing::difference(&oracle, &outcome)));
            }
        };
        for size in fixed {
            let cut = || std::iter::repeat(size);
            check(
                format!("delivered in {size}s"),
                framing::outcome(stream, framing::whole(stream), cut()),
            );
            check(format!("read in {size}s"), framing::outcome(stream, cut(), framing::whole(stream)));
            check(format!("both in {size}s"), framing::outcome(stream, cut(), cut()));
        }
        for seed in seeds {
            let (read, delivered) = (framing::read_sizes(seed), framing::read_sizes(seed.wrapping_mul(7)));
            check(format!("seed {seed}"), framing::outcome(stream, read.clone(), delivered.clone()));
            check(
                format!("delivered seed {seed}"),
                framing::outcome(stream, framing::whole(stream), delivered),
            );
        }
    }
    assert!(failures.is_empty(), "{} cuts changed the outcome: {failures:#?}", failures.len());
}
