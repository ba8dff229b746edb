//! Random inputs for every target: plain random bytes, and seeds with random bytes flipped,
//! so that the state machines get past their first checks. Deterministic (fixed seed), fast.

use fuzz_targets::seeds;

/// xorshift64*: enough randomness for smoke fuzzing, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

const CASES: usize = 2000;

fn random_bytes(target: &str) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ target.len() as u64);
    for _ in 0..CASES {
        let len = rng.below(600);
        let data = rng.bytes(len);
        fuzz_targets::run(target, &data).unwrap();
    }
}

fn mutated_seeds(target: &str) {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d ^ target.len() as u64);
    let seeds: Vec<Vec<u8>> = seeds::all()
        .into_iter()
        .filter(|s| s.target == target)
        .map(|s| s.bytes)
        .collect();
    assert!(!seeds.is_empty());
    for _ in 0..CASES {
        let mut data = seeds[rng.below(seeds.len())].clone();
        for _ in 0..1 + rng.below(4) {
            match rng.below(4) {
                0 if !data.is_empty() => {
                    let i = rng.below(data.len());
                    data[i] = rng.next() as u8;
                }
                1 if !data.is_empty() => {
                    let i = rng.below(data.len());
                    data[i] ^= 1 << rng.below(8);
                }
                2 if !data.is_empty() => {
                    let i = rng.below(data.len());
                    data.truncate(i);
                }
                _ => {
                    let i = rng.below(data.len() + 1);
                    let n = 1 + rng.below(8);
                    let extra = rng.bytes(n);
                    data.splice(i..i, extra);
                }
            }
        }
        fuzz_targets::run(target, &data).unwrap();
    }
}

#[test]
fn pdu_stream() {
    random_bytes("pdu_stream");
    mutated_seeds("pdu_stream");
}

#[test]
fn text_negotiation() {
    random_bytes("text_negotiation");
    mutated_seeds("text_negotiation");
}

#[test]
fn target_login() {
    random_bytes("target_login");
    mutated_seeds("target_login");
}

#[test]
fn target_full_feature() {
    random_bytes("target_full_feature");
    mutated_seeds("target_full_feature");
}

#[test]
fn scsi_cdb() {
    random_bytes("scsi_cdb");
    mutated_seeds("scsi_cdb");
}

#[test]
fn initiator_login() {
    random_bytes("initiator_login");
    mutated_seeds("initiator_login");
}

#[test]
fn initiator_session() {
    random_bytes("initiator_session");
    mutated_seeds("initiator_session");
}
