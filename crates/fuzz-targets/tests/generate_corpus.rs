//! Writes the seed corpus to `fuzz/corpus/<target>/<name>` (replacing the seeds there).
//!
//! `cargo test -p fuzz-targets --test generate_corpus -- --ignored`

use std::fs;
use std::path::Path;

#[test]
#[ignore = "writes fuzz/corpus; run by hand after changing the seeds"]
fn generate_corpus() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
    for target in fuzz_targets::TARGETS {
        let dir = root.join(target);
        if dir.exists() {
            fs::remove_dir_all(&dir).unwrap();
        }
        fs::create_dir_all(&dir).unwrap();
    }
    for seed in fuzz_targets::seeds::all() {
        assert!(
            fuzz_targets::TARGETS.contains(&seed.target),
            "{}",
            seed.target
        );
        fs::write(root.join(seed.target).join(&seed.name), &seed.bytes).unwrap();
    }
}
