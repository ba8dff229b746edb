//! Faults while writing: the initiator library writes sequence-stamped blocks with 8 commands
//! in flight while the target process is killed and restarted, or while the target's network
//! namespace drops every packet for three seconds. Afterwards every completed write reads back
//! as written (none lost; re-issued writes land once, on the same blocks), and the time from the
//! target being back to the first completed write is printed.
//!
//! Runs against tgtd and the `viscsi target` process. Needs root for the namespaces.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use initiator::{Identity, Isid, RecoveryPolicy, Session, SessionOptions};
use peer_harness::netns::NetNs;
use peer_harness::target::MIB;
use peer_harness::{RunningTarget, TargetConfig, TargetKind, TempDir};

const BLOCK: u32 = 512;
const WRITERS: u64 = 8;
const LUN_BYTES: u64 = 1024 * MIB;

enum Fault {
    KillAndRestart,
    Blackhole(Duration),
}

fn viscsi() -> TargetKind {
    TargetKind::Viscsi {
        binary: env!("CARGO_BIN_EXE_viscsi").into(),
    }
}

/// A LUN whose data survives a restart of the target process.
fn durable_config(kind: &TargetKind, iqn: &str, scratch: &TempDir) -> TargetConfig {
    match kind {
        // tgtd's memory LUNs are tmpfs files that outlive the daemon.
        TargetKind::Tgtd => TargetConfig::new(iqn).mem_lun(LUN_BYTES),
        TargetKind::Viscsi { .. } => {
            let file = scratch.join("lun.img");
            std::fs::File::create(&file)
                .and_then(|f| f.set_len(LUN_BYTES))
                .expect("LUN file");
            TargetConfig::new(iqn).file_lun(&file)
        }
    }
}

fn stamped_block(writer: u64, seq: u64) -> Bytes {
    let mut block = vec![0u8; 4096];
    for chunk in block.chunks_mut(16) {
        chunk[..8].copy_from_slice(&writer.to_be_bytes());
        chunk[8..].copy_from_slice(&seq.to_be_bytes());
    }
    Bytes::from(block)
}

fn run_fault(kind: TargetKind, fault: Fault) {
    let scratch = TempDir::new("faults");
    let iqn = "iqn.2024-01.test.viscsi:faults";
    let ns = matches!(fault, Fault::Blackhole(_)).then(NetNs::create);
    let mut config = durable_config(&kind, iqn, &scratch);
    if let Some(ns) = &ns {
        config = config.in_netns(ns);
    }
    let mut target = RunningTarget::start(&kind, config);
    let lun = u64::from(target.lun_id(0));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    let mut options = SessionOptions::new(
        Identity::new("iqn.2024-01.test.viscsi:faulty", Isid(0x023d_0000_0042)),
        target.portal(),
        iqn,
    );
    options.policy = RecoveryPolicy {
        connect_timeout: Duration::from_secs(2),
        login_timeout: Duration::from_secs(2),
        nop_interval: Some(Duration::from_millis(500)),
        nop_timeout: Duration::from_millis(500),
        backoff_initial: Duration::from_millis(5),
        backoff_max: Duration::from_millis(50),
        give_up_after: Some(Duration::from_secs(60)),
        max_attempts: None,
    };
    let session = rt.block_on(Session::connect(options)).expect("login");
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let s = session.clone();
            let stop = stop.clone();
            rt.spawn(async move {
                let mut done = Vec::new();
                let mut seq = 0u64;
                // Each writer owns a region and never writes a block twice.
                let region = LUN_BYTES / u64::from(BLOCK) / WRITERS;
                while !stop.load(Ordering::Relaxed) && seq * 8 < region {
                    let lba = w * region + seq * 8;
                    let data = stamped_block(w, seq);
                    s.write(lun, lba, data.clone(), BLOCK)
                        .await
                        .unwrap_or_else(|e| panic!("write {w}/{seq} failed: {e}"));
                    done.push((lba, data, Instant::now()));
                    seq += 1;
                }
                done
            })
        })
        .collect();

    std::thread::sleep(Duration::from_secs(1));
    let fault_at = Instant::now();
    let back = match fault {
        Fault::KillAndRestart => {
            target.kill();
            std::thread::sleep(Duration::from_millis(500));
            target.restart();
            Instant::now()
        }
        Fault::Blackhole(how_long) => {
            let ns = ns.as_ref().expect("namespace");
            ns.blackhole();
            std::thread::sleep(how_long);
            ns.heal();
            Instant::now()
        }
    };
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for w in writers {
        all.extend(rt.block_on(w).expect("writer task"));
    }
    let first_after = all
        .iter()
        .map(|(_, _, t)| *t)
        .filter(|t| *t >= back)
        .min()
        .expect("writes completed after the target was back");
    let during = all
        .iter()
        .filter(|(_, _, t)| *t >= fault_at && *t < back)
        .count();
    let stats = session.stats();
    let recovery_ms = (first_after - back).as_secs_f64() * 1000.0;
    println!(
        "{} {}: {} writes ({} while the target was away), first completed write {:.1} ms after \
         the target was back; recoveries {}, re-issued {}, failed attempts {}, last recovery {:?} µs",
        kind.name(),
        match fault {
            Fault::KillAndRestart => "kill+restart".to_string(),
            Fault::Blackhole(d) => format!("{} s blackhole", d.as_secs()),
        },
        all.len(),
        during,
        recovery_ms,
        stats.recoveries,
        stats.reissued,
        stats.failed_attempts,
        stats.last_recovery_us
    );
    assert!(stats.recoveries >= 1, "{stats:?}");
    assert!(
        recovery_ms < 3000.0,
        "first write {recovery_ms:.1} ms after the target was back"
    );
    // Every completed write is on the LUN, exactly as written.
    let all = Arc::new(all);
    rt.block_on(async {
        let checkers: Vec<_> = (0..8)
            .map(|part| {
                let (s, all) = (session.clone(), all.clone());
                tokio::spawn(async move {
                    for (lba, data, _) in all.iter().skip(part).step_by(8) {
                        let got = s.read(lun, *lba, 8, BLOCK).await.expect("read back");
                        assert!(got == *data, "block {lba} does not hold what was written");
                    }
                })
            })
            .collect();
        for c in checkers {
            c.await.expect("verification");
        }
        session.logout().await.expect("logout");
    });
    target.assert_alive();
}

#[test]
fn viscsi_target_killed_and_restarted_while_writing() {
    run_fault(viscsi(), Fault::KillAndRestart);
}

#[test]
fn tgtd_killed_and_restarted_while_writing() {
    run_fault(TargetKind::Tgtd, Fault::KillAndRestart);
}

#[test]
fn viscsi_target_blackholed_while_writing() {
    run_fault(viscsi(), Fault::Blackhole(Duration::from_secs(3)));
}

#[test]
fn tgtd_blackholed_while_writing() {
    run_fault(TargetKind::Tgtd, Fault::Blackhole(Duration::from_secs(3)));
}
