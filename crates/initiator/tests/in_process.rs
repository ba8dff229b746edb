//! The initiator against viscsi's own target started in the same process: fast checks of
//! login variants, I/O with many commands in flight, discovery, many sessions, and recovery
//! across a target restart. The real-peer tests (tgtd, the viscsi binary, faults in network
//! namespaces) live in `crates/viscsi/tests/peers_initiator_*.rs`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use initiator::{
    discover, ChapConfig, Credentials, Digest, DiscoveryOptions, Error, Identity, Isid,
    RecoveryPolicy, Session, SessionOptions,
};
use target::config::Limits;
use target::{ChapConfig as TargetChap, LunConfig, Target, TargetConfig, TargetDef};

const IQN: &str = "iqn.2024-01.test.viscsi:inproc";
const BLOCK: u32 = 512;

fn lun(spec: &str) -> LunConfig {
    LunConfig::from_flag(spec).expect("lun flag")
}

fn config(port: u16, luns: Vec<LunConfig>) -> TargetConfig {
    TargetConfig {
        portals: vec![SocketAddr::from(([127, 0, 0, 1], port))],
        targets: vec![TargetDef {
            iqn: IQN.into(),
            alias: None,
            luns,
            chap: Vec::new(),
            mutual_chap: None,
            allowed_initiators: Vec::new(),
        }],
        discovery_chap: Vec::new(),
        limits: Limits::default(),
    }
}

async fn serve(cfg: TargetConfig) -> (target::RunningTarget, SocketAddr) {
    let running = Target::build(cfg)
        .expect("target config")
        .serve()
        .await
        .expect("listen");
    let addr = running.local_addrs()[0];
    (running, addr)
}

fn identity(name: &str, isid: u64) -> Identity {
    Identity::new(format!("iqn.2024-01.test.viscsi:{name}"), Isid(isid))
}

fn options(addr: SocketAddr, name: &str) -> SessionOptions {
    SessionOptions::new(identity(name, 0x023d_0000_0001), addr.to_string(), IQN)
}

fn pattern(len: usize, seed: u64) -> Bytes {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

fn scratch_dir(label: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("viscsi-initiator-{label}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_and_reads_back_with_many_commands_in_flight() {
    let (running, addr) = serve(config(0, vec![lun("0=mem:64MiB")])).await;
    let s = Session::connect(options(addr, "rw")).await.expect("login");
    let cap = s.read_capacity(0).await.expect("capacity");
    assert_eq!(cap.block_size, BLOCK);
    assert_eq!(cap.bytes(), 64 << 20);
    let inq = s.inquiry(0).await.expect("inquiry");
    assert_eq!(inq.device_type, 0);
    assert_eq!(s.report_luns().await.expect("report luns"), vec![0]);

    // Sizes around the negotiated segment and burst limits, 32 at once.
    let sizes = [
        512usize,
        4096,
        65536,
        262144,
        262144 + 512,
        1 << 20,
        3 << 20,
    ];
    let mut jobs = Vec::new();
    let mut lba = 0u64;
    for i in 0..32u64 {
        let len = sizes[i as usize % sizes.len()];
        let data = pattern(len, i + 1);
        let s = s.clone();
        let at = lba;
        lba += (len as u64) / u64::from(BLOCK);
        jobs.push(tokio::spawn(async move {
            s.write(0, at, data.clone(), BLOCK).await.expect("write");
            (at, data)
        }));
    }
    let mut written = Vec::new();
    for j in jobs {
        written.push(j.await.expect("join"));
    }
    for (at, data) in &written {
        let got = s
            .read(0, *at, (data.len() / BLOCK as usize) as u32, BLOCK)
            .await
            .expect("read");
        assert_eq!(&got[..], &data[..], "block {at}");
    }
    let stats = s.stats();
    assert_eq!(stats.recoveries, 0);
    assert!(stats.bytes_written >= written.iter().map(|(_, d)| d.len() as u64).sum::<u64>());
    s.logout().await.expect("logout");
    assert!(matches!(s.test_unit_ready(0).await, Err(Error::Closed)));
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crc32c_digests_when_offered_alone() {
    let (running, addr) = serve(config(0, vec![lun("0=mem:16MiB")])).await;
    let opts = options(addr, "digests").with_digests(vec![Digest::Crc32c], vec![Digest::Crc32c]);
    let s = Session::connect(opts).await.expect("login");
    let p = s.params();
    assert!(p.header_digest && p.data_digest, "{p:?}");
    let data = pattern(1 << 20, 7);
    s.write(0, 100, data.clone(), BLOCK).await.expect("write");
    assert_eq!(s.read(0, 100, 2048, BLOCK).await.expect("read"), data);
    // The same read as received: one segment per Data-In PDU (at most
    // MaxRecvDataSegmentLength each), equal to the data written.
    let segments = s.read_segments(0, 100, 2048, BLOCK).await.expect("read");
    let max = p.max_recv_data_segment_length as usize;
    assert!(segments.segments().len() >= (1 << 20) / max, "{segments:?}");
    assert!(segments.segments().iter().all(|b| b.len() <= max));
    assert_eq!(segments, data);
    let mut mine = vec![0u8; 1 << 20];
    segments.copy_to_slice(&mut mine);
    assert_eq!(mine, data);
    running.shutdown().await;
}

fn chap_target(port: u16, mutual: bool) -> TargetConfig {
    let mut cfg = config(port, vec![lun("0=mem:8MiB")]);
    cfg.targets[0].chap = vec![TargetChap::from_flag("vm1:insecret1234").unwrap()];
    if mutual {
        cfg.targets[0].mutual_chap = Some(TargetChap::from_flag("array:outsecret5678").unwrap());
    }
    cfg
}

fn chap(user: &str, secret: &str, target: Option<(&str, &str)>) -> ChapConfig {
    ChapConfig {
        credentials: Credentials::new(user, secret.as_bytes()),
        target: target.map(|(u, s)| Credentials::new(u, s.as_bytes())),
        algorithms: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chap_one_way_mutual_and_wrong_secrets() {
    let (running, addr) = serve(chap_target(0, true)).await;

    let mut one_way = options(addr, "chap1");
    one_way.chap = Some(chap("vm1", "insecret1234", None));
    let s = Session::connect(one_way).await.expect("one-way CHAP");
    s.test_unit_ready(0).await.expect("TUR");
    s.logout().await.expect("logout");

    let mut mutual = options(addr, "chap2");
    mutual.chap = Some(chap(
        "vm1",
        "insecret1234",
        Some(("array", "outsecret5678")),
    ));
    let s = Session::connect(mutual).await.expect("mutual CHAP");
    s.test_unit_ready(0).await.expect("TUR");
    s.logout().await.expect("logout");

    let mut wrong = options(addr, "chap3");
    wrong.chap = Some(chap("vm1", "wrongsecret99", None));
    let e = Session::connect(wrong)
        .await
        .err()
        .expect("wrong secret refused");
    assert!(e.is_auth(), "{e}");
    assert!(!e.to_string().contains("wrongsecret99"));

    let mut wrong_target = options(addr, "chap4");
    wrong_target.chap = Some(chap(
        "vm1",
        "insecret1234",
        Some(("array", "notthesecret1")),
    ));
    let e = Session::connect(wrong_target)
        .await
        .err()
        .expect("target with the wrong secret refused");
    assert!(e.is_auth(), "{e}");
    assert!(!format!("{e:?}").contains("notthesecret1"));

    let none = options(addr, "chap5");
    let e = Session::connect(none).await.err().expect("no CHAP refused");
    assert!(e.is_auth(), "{e}");
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_lists_the_target_and_its_portal() {
    let (running, addr) = serve(config(0, vec![lun("0=mem:8MiB")])).await;
    let found = discover(DiscoveryOptions {
        identity: identity("disc", 0x023d_0000_0002),
        portal: addr.to_string(),
        chap: None,
        policy: RecoveryPolicy::default(),
    })
    .await
    .expect("discovery");
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].name, IQN);
    assert!(
        found[0]
            .addresses
            .iter()
            .any(|(a, _)| a == &addr.to_string()),
        "{found:?}"
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_sessions_at_once() {
    let (running, addr) = serve(config(0, vec![lun("0=mem:64MiB")])).await;
    let mut jobs = Vec::new();
    for i in 0..24u64 {
        jobs.push(tokio::spawn(async move {
            let opts = SessionOptions::new(
                identity(&format!("many{i}"), 0x023d_0000_0100 + i),
                addr.to_string(),
                IQN,
            );
            let s = Session::connect(opts).await.expect("login");
            let data = pattern(256 * 1024, i + 100);
            let lba = i * 1024;
            for _ in 0..4 {
                s.write(0, lba, data.clone(), BLOCK).await.expect("write");
                assert_eq!(s.read(0, lba, 512, BLOCK).await.expect("read"), data);
            }
            s.logout().await.expect("logout");
        }));
    }
    for j in jobs {
        j.await.expect("session task");
    }
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_portal_is_a_prompt_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let started = Instant::now();
    let e = Session::connect(options(addr, "nobody"))
        .await
        .err()
        .expect("error");
    assert!(matches!(e, Error::Connect { .. }), "{e}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

/// Writes sequence-stamped blocks with 8 commands in flight while the target is stopped and
/// started again on the same port; every write completes exactly once and reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovers_across_a_target_restart_without_losing_writes() {
    let dir = scratch_dir("restart");
    let file = dir.join("lun.img");
    std::fs::File::create(&file)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    let lun_flag = format!("0=file:{}", file.display());
    let (running, addr) = serve(config(0, vec![lun(&lun_flag)])).await;
    let mut opts = options(addr, "restart");
    opts.policy = RecoveryPolicy {
        nop_interval: Some(Duration::from_millis(500)),
        nop_timeout: Duration::from_millis(500),
        ..RecoveryPolicy::default()
    };
    let s = Session::connect(opts).await.expect("login");

    let writers: Vec<_> = (0..8u64)
        .map(|w| {
            let s = s.clone();
            tokio::spawn(async move {
                let mut done = Vec::new();
                let started = Instant::now();
                let mut seq = 0u64;
                // Each writer owns 32 MiB and writes every block at most once.
                while started.elapsed() < Duration::from_millis(1500) && seq * 8 < 65536 {
                    let lba = w * 65536 + seq * 8;
                    let mut block = vec![0u8; 4096];
                    block[..8].copy_from_slice(&w.to_be_bytes());
                    block[8..16].copy_from_slice(&seq.to_be_bytes());
                    let data = Bytes::from(block);
                    s.write(0, lba, data.clone(), BLOCK)
                        .await
                        .unwrap_or_else(|e| {
                            panic!("write {w}/{seq} at {lba} ({:?}): {e}", started.elapsed())
                        });
                    done.push((lba, data, Instant::now()));
                    seq += 1;
                }
                done
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(400)).await;
    running.shutdown().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (running, _) = serve(config(addr.port(), vec![lun(&lun_flag)])).await;
    let back = Instant::now();

    let mut all = Vec::new();
    for w in writers {
        all.extend(w.await.expect("writer"));
    }
    let first_after = all
        .iter()
        .map(|(_, _, t)| *t)
        .filter(|t| *t >= back)
        .min()
        .expect("writes completed after the restart");
    let stats = s.stats();
    assert!(stats.recoveries >= 1, "{stats:?}");
    eprintln!(
        "restart: {} writes, first completion {:?} after the target was back, {stats:?}",
        all.len(),
        first_after - back
    );
    for (lba, data, _) in &all {
        assert_eq!(
            &s.read(0, *lba, 8, BLOCK).await.expect("read")[..],
            &data[..]
        );
    }
    running.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gives_up_when_the_policy_says_so() {
    let (running, addr) = serve(config(0, vec![lun("0=mem:8MiB")])).await;
    let mut opts = options(addr, "giveup");
    opts.policy = RecoveryPolicy {
        give_up_after: Some(Duration::from_millis(300)),
        ..RecoveryPolicy::default()
    };
    let s = Session::connect(opts).await.expect("login");
    s.test_unit_ready(0).await.expect("TUR");
    running.shutdown().await;
    let started = Instant::now();
    let e = s.test_unit_ready(0).await.expect_err("gave up");
    assert!(matches!(e, Error::SessionLost(_)), "{e}");
    assert!(started.elapsed() < Duration::from_secs(3));
    // Later commands fail at once.
    assert!(s.test_unit_ready(0).await.is_err());
}
