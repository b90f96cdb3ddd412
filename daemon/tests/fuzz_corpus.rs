//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) through the
//! same entry points the cargo-fuzz targets call, so every input a fuzzer
//! ever kept, crash reproducers included, is rerun by the ordinary test
//! command on stable Rust. A missing or empty corpus directory fails: the
//! replay never passes by finding nothing.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use vpcgated::fuzzing;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| {
        panic!(
            "cannot read the corpus of fuzz target {target} at {}: {e}",
            dir.display()
        )
    });
    let mut files: Vec<PathBuf> = entries
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
    files.retain(|path| path.is_file());
    files.sort();
    assert!(
        !files.is_empty(),
        "the corpus of fuzz target {target} at {} is empty; commit one (see fuzz/README.md)",
        dir.display()
    );
    for path in &files {
        let data =
            std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| run(&data))) {
            eprintln!("fuzz target {target} failed on {}", path.display());
            std::panic::resume_unwind(panic);
        }
    }
    println!("fuzz target {target}: replayed {} inputs", files.len());
}

#[test]
fn packet_corpus() {
    replay("packet", fuzzing::packet);
}

#[test]
fn uapi_corpus() {
    replay("uapi", fuzzing::uapi);
}

#[test]
fn control_corpus() {
    replay("control", fuzzing::control);
}

#[test]
fn state_corpus() {
    replay("state", fuzzing::state);
}

#[test]
fn routes_msg_corpus() {
    replay("routes_msg", fuzzing::routes_msg);
}
