//! viscsi's initiator library against real targets: tgtd and the `viscsi target` process.
//!
//! Each test runs against both: plain login with several LUNs, one-way and mutual CHAP
//! (tgt's outgoing account), wrong secrets refused, CRC32C header and data digests, and a
//! tshark capture of the initiator's own traffic (zero malformed PDUs, digests good); and 32
//! sessions at once against the viscsi target.

use std::time::Duration;

use bytes::Bytes;
use initiator::{
    discover, ChapConfig, Credentials, Digest, DiscoveryOptions, Identity, Isid, RecoveryPolicy,
    Session, SessionOptions,
};
use peer_harness::target::MIB;
use peer_harness::tshark::{analyze, Capture};
use peer_harness::{RunningTarget, TargetConfig, TargetKind};

const BLOCK: u32 = 512;

fn kinds() -> Vec<TargetKind> {
    vec![
        TargetKind::Viscsi {
            binary: env!("CARGO_BIN_EXE_viscsi").into(),
        },
        TargetKind::Tgtd,
    ]
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn options(target: &RunningTarget, name: &str) -> SessionOptions {
    SessionOptions::new(
        Identity::new(
            format!("iqn.2024-01.test.viscsi:{name}"),
            Isid(0x023d_0000_0001),
        ),
        target.portal(),
        target.iqn(),
    )
}

fn chap(user: &str, secret: &str, target: Option<(&str, &str)>) -> ChapConfig {
    ChapConfig {
        credentials: Credentials::new(user, secret.as_bytes()),
        target: target.map(|(u, s)| Credentials::new(u, s.as_bytes())),
        algorithms: Vec::new(),
    }
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

/// Writes and reads back a few sizes (up to 4 MiB, more than tgt's MaxBurstLength) on `lun`,
/// with several commands in flight.
async fn round_trip(s: &Session, lun: u64, seed: u64) {
    let sizes = [4096usize, 65536, 1 << 20, 4 << 20, 512, 300 * 1024];
    let mut jobs = Vec::new();
    let mut lba = 0u64;
    for (i, len) in sizes.iter().enumerate() {
        let data = pattern(*len, seed + i as u64);
        let s = s.clone();
        let at = lba;
        lba += (*len as u64).div_ceil(u64::from(BLOCK)) + 8;
        jobs.push(tokio::spawn(async move {
            s.write(lun, at, data.clone(), BLOCK).await.expect("write");
            (at, data)
        }));
    }
    for j in jobs {
        let (at, data) = j.await.expect("join");
        let got = s
            .read(lun, at, (data.len() / BLOCK as usize) as u32, BLOCK)
            .await
            .expect("read");
        assert!(got == data, "LUN {lun} block {at}: data differs");
    }
}

#[test]
fn plain_login_several_luns_and_discovery() {
    let rt = runtime();
    for kind in kinds() {
        let target = RunningTarget::start(
            &kind,
            TargetConfig::new("iqn.2024-01.test.viscsi:init-plain")
                .mem_lun(64 * MIB)
                .mem_lun(32 * MIB),
        );
        rt.block_on(async {
            let s = Session::connect(options(&target, "plain"))
                .await
                .expect("login");
            let luns = s.report_luns().await.expect("REPORT LUNS");
            for index in 0..2 {
                let lun = u64::from(target.lun_id(index));
                assert!(luns.contains(&lun), "{}: {luns:?}", kind.name());
                let cap = s.read_capacity(lun).await.expect("capacity");
                assert_eq!(cap.bytes(), if index == 0 { 64 * MIB } else { 32 * MIB });
                let inq = s.inquiry(lun).await.expect("inquiry");
                assert_eq!(inq.device_type, 0, "{inq:?}");
                round_trip(&s, lun, 10 + index as u64).await;
            }
            let p = s.params();
            eprintln!("{}: negotiated {p:?}", kind.name());
            s.logout().await.expect("logout");

            let found = discover(DiscoveryOptions {
                identity: Identity::new("iqn.2024-01.test.viscsi:disc", Isid(0x023d_0000_0009)),
                portal: target.portal(),
                chap: None,
                policy: RecoveryPolicy::default(),
            })
            .await
            .expect("discovery");
            assert!(found.iter().any(|t| t.name == target.iqn()), "{found:?}");
        });
    }
}

#[test]
fn one_way_and_mutual_chap_and_wrong_secrets() {
    let rt = runtime();
    for kind in kinds() {
        let target = RunningTarget::start(
            &kind,
            TargetConfig::new("iqn.2024-01.test.viscsi:init-chap")
                .mem_lun(16 * MIB)
                .chap("inuser", "insecret1234")
                .mutual_chap("outuser", "outsecret5678"),
        );
        rt.block_on(async {
            let mut o = options(&target, "chap-one");
            o.chap = Some(chap("inuser", "insecret1234", None));
            let s = Session::connect(o).await.expect("one-way CHAP");
            round_trip(&s, u64::from(target.lun_id(0)), 1).await;
            s.logout().await.expect("logout");

            let mut o = options(&target, "chap-mutual");
            o.chap = Some(chap(
                "inuser",
                "insecret1234",
                Some(("outuser", "outsecret5678")),
            ));
            let s = Session::connect(o).await.expect("mutual CHAP");
            s.test_unit_ready(u64::from(target.lun_id(0)))
                .await
                .expect("TUR");
            s.logout().await.expect("logout");

            let mut o = options(&target, "chap-wrong");
            o.chap = Some(chap("inuser", "wrongsecret99", None));
            let e = Session::connect(o)
                .await
                .err()
                .expect("wrong secret refused");
            assert!(e.is_auth(), "{}: {e}", kind.name());
            assert!(!format!("{e} {e:?}").contains("wrongsecret99"));

            let mut o = options(&target, "chap-wrong-target");
            o.chap = Some(chap(
                "inuser",
                "insecret1234",
                Some(("outuser", "notthesecret1")),
            ));
            let e = Session::connect(o)
                .await
                .err()
                .expect("wrong target secret");
            assert!(e.is_auth(), "{}: {e}", kind.name());
        });
    }
}

#[test]
fn crc32c_header_and_data_digests_with_a_clean_capture() {
    let rt = runtime();
    for kind in kinds() {
        let target = RunningTarget::start(
            &kind,
            TargetConfig::new("iqn.2024-01.test.viscsi:init-digest").mem_lun(64 * MIB),
        );
        let pcap = target.dir().join("initiator.pcapng");
        let capture = Capture::start(target.port(), &pcap);
        rt.block_on(async {
            let o = options(&target, "digests")
                .with_digests(vec![Digest::Crc32c], vec![Digest::Crc32c]);
            let s = Session::connect(o).await.expect("login with digests");
            let p = s.params();
            assert!(p.header_digest && p.data_digest, "{}: {p:?}", kind.name());
            round_trip(&s, u64::from(target.lun_id(0)), 3).await;
            s.logout().await.expect("logout");
            // And a session that lets the target choose (tgt answers CRC32C to None,CRC32C).
            let s = Session::connect(options(&target, "digests-any"))
                .await
                .expect("login");
            round_trip(&s, u64::from(target.lun_id(0)), 4).await;
            s.logout().await.expect("logout");
        });
        let pcap = capture.stop();
        let analysis = analyze(&pcap, target.port());
        println!("{} capture:\n{analysis}", kind.name());
        assert_eq!(analysis.malformed_iscsi(), 0, "{analysis}");
        assert_eq!(analysis.header_digests_bad, 0, "{analysis}");
        assert_eq!(analysis.data_digests_bad, 0, "{analysis}");
        assert!(analysis.header_digests_good > 0, "{analysis}");
        assert!(analysis.data_digests_good > 0, "{analysis}");
        assert!(
            analysis.opcode("0x05") > 0 || analysis.opcode("0x01") > 0,
            "{analysis}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn many_sessions_at_once_against_the_viscsi_target() {
    let rt = runtime();
    let target = RunningTarget::start(
        &kinds()[0],
        TargetConfig::new("iqn.2024-01.test.viscsi:init-many").mem_lun(256 * MIB),
    );
    let portal = target.portal();
    let iqn = target.iqn().to_string();
    let lun = u64::from(target.lun_id(0));
    rt.block_on(async {
        let jobs: Vec<_> = (0..32u64)
            .map(|i| {
                let (portal, iqn) = (portal.clone(), iqn.clone());
                tokio::spawn(async move {
                    let o = SessionOptions::new(
                        Identity::new(
                            format!("iqn.2024-01.test.viscsi:many{i}"),
                            Isid(0x023d_0000_1000 + i),
                        ),
                        portal,
                        iqn,
                    );
                    let s = Session::connect(o).await.expect("login");
                    let data = pattern(1 << 20, 100 + i);
                    let lba = i * 4096;
                    for _ in 0..4 {
                        s.write(lun, lba, data.clone(), BLOCK).await.expect("write");
                        let got = s.read(lun, lba, 2048, BLOCK).await.expect("read");
                        assert!(got == data, "session {i}: data differs");
                    }
                    s.logout().await.expect("logout");
                })
            })
            .collect();
        for j in jobs {
            j.await.expect("session");
        }
    });
}
