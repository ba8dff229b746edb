//! Replays the committed seed corpus and the minimised crashes of every fuzz target on stable,
//! so that a regression shows up in `cargo test` without libFuzzer.
//!
//! libFuzzer also fails an input that asks for a huge allocation (more than its RSS limit in
//! one `malloc`); on stable, with overcommit, such an allocation would just succeed, so this
//! test binary counts the largest single allocation of each input and fails it in the same
//! way.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::fs;
use std::path::{Path, PathBuf};

/// Largest single allocation one input may make (libFuzzer's default limit is 2 GiB).
const MAX_ALLOCATION: usize = 1 << 30;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|m| m.set(m.get().max(size)));
}

/// The system allocator, noting the largest request made on each thread.
struct Measuring;

// SAFETY: every method forwards to `System` with the caller's arguments unchanged; `note`
// neither allocates nor unwinds.
unsafe impl GlobalAlloc for Measuring {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Measuring = Measuring;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

/// Files directly under `dir`, sorted; an empty list if `dir` does not exist.
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

fn replay(target: &str) {
    let corpus = inputs(&fuzz_dir().join("corpus").join(target));
    assert!(
        !corpus.is_empty(),
        "fuzz/corpus/{target}/ is missing or empty"
    );
    let regressions = inputs(&fuzz_dir().join("regressions").join(target));
    let mut replayed = 0;
    let mut failures: Vec<String> = Vec::new();
    for path in corpus.iter().chain(&regressions) {
        let data = fs::read(path).unwrap();
        LARGEST.with(|m| m.set(0));
        let outcome = std::panic::catch_unwind(|| fuzz_targets::run(target, &data));
        match outcome {
            Ok(Some(())) => replayed += 1,
            Ok(None) => panic!("unknown target {target}"),
            Err(_) => failures.push(format!("{} panicked", path.display())),
        }
        let largest = LARGEST.with(Cell::get);
        if largest > MAX_ALLOCATION {
            failures.push(format!(
                "{} allocated {largest} bytes at once",
                path.display()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{target}: {} failing inputs:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(replayed > 0, "no input replayed for {target}");
    println!(
        "{target}: replayed {} corpus and {} regression inputs",
        corpus.len(),
        regressions.len()
    );
}

#[test]
fn pdu_stream() {
    replay("pdu_stream");
}

#[test]
fn text_negotiation() {
    replay("text_negotiation");
}

#[test]
fn target_login() {
    replay("target_login");
}

#[test]
fn target_full_feature() {
    replay("target_full_feature");
}

#[test]
fn scsi_cdb() {
    replay("scsi_cdb");
}

/// Every corpus and regression folder belongs to a known target.
#[test]
fn no_stray_folders() {
    for kind in ["corpus", "regressions"] {
        let Ok(entries) = fs::read_dir(fuzz_dir().join(kind)) else {
            continue;
        };
        for e in entries {
            let name = e.unwrap().file_name().into_string().unwrap();
            assert!(
                fuzz_targets::TARGETS.contains(&name.as_str()),
                "fuzz/{kind}/{name} is not a target"
            );
        }
    }
}

#[test]
fn initiator_login() {
    replay("initiator_login");
}

#[test]
fn initiator_session() {
    replay("initiator_session");
}
