//! Live migration of a VM's storage session between two `viscsi host` agents, driven through
//! the CLI (`viscsi migrate`), against `viscsi target` and tgtd.
//!
//! - All four pairings under load: a VMM stand-in on the VM's vhost-user-scsi socket writes
//!   stamped 4 KiB blocks at QD8 while the VM goes offload→software, software→software,
//!   software→offload and offload→offload between hosts A and B; after each migration the
//!   VMM moves to the destination's socket. At the end every block holds the last write
//!   acknowledged for it: nothing lost, duplicated or reordered, and no write failed.
//! - A persistent reservation made on host A holds on host B (same I_T nexus): the VM still
//!   writes, another initiator still gets RESERVATION CONFLICT.
//! - The fence: a session with the VM's identity that never logged out (a source host whose
//!   logout was lost) is ended by the target when the destination logs in; its writes fail.
//!   And a source agent restarted after the switchover does not log in again.
//! - Failures before the switchover leave the VM running on the source with nothing lost:
//!   the destination dies mid-migration, cannot reach the target (it runs in a network
//!   namespace), has the wrong CHAP secret, or holds another cluster key.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use peer_harness::agent::{HostAgent, ReferenceHba};
use peer_harness::netns::NetNs;
use peer_harness::ports::lease_tcp_port;
use peer_harness::target::MIB;
use peer_harness::{RunningTarget, TargetConfig, TargetKind, TempDir};
use serde_json::Value;
use vhost_driver::stamped::Workload;

const BIN: &str = env!("CARGO_BIN_EXE_viscsi");
const LUN_BYTES: u64 = 64 * MIB;
const IQN: &str = "iqn.2024-01.test.viscsi:migration";

fn viscsi() -> TargetKind {
    TargetKind::Viscsi { binary: BIN.into() }
}

fn tgtd() -> TargetKind {
    TargetKind::Tgtd
}

fn cli(host: &HostAgent, args: &[&str]) -> String {
    let out = host.cli(args);
    assert!(out.success(), "viscsi {args:?}: {out}");
    out.stdout.clone()
}

fn json(host: &HostAgent, args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.push("--json");
    let text = cli(host, &args);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: {e}: {text}"))
}

/// One agent with its migration listener.
struct Host {
    agent: HostAgent,
    /// `host:port` of its migration listener.
    addr: String,
    _port: peer_harness::ports::PortLease,
}

/// Starts an agent taking migrations on `ip` (a fresh port), with `key`.
fn host(
    dir: &TempDir,
    name: &str,
    adapters: &[(&str, &Path)],
    key: &Path,
    ip: &str,
    env: &[(&str, &str)],
    netns: Option<&NetNs>,
) -> Host {
    let port = lease_tcp_port();
    let addr = format!("{ip}:{}", port.get());
    let key = key.display().to_string();
    let agent = HostAgent::start_with(
        Path::new(BIN),
        dir,
        name,
        adapters,
        &["--cluster-key", &key, "--migration-listen", &addr],
        env,
        netns,
    );
    // The control socket answers before the migration listener is bound.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(Instant::now() < deadline, "{name} never listened on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
    Host {
        agent,
        addr,
        _port: port,
    }
}

fn new_key(dir: &TempDir, name: &str) -> PathBuf {
    let path = dir.join(name);
    let out = std::process::Command::new(BIN)
        .args(["cluster-key"])
        .arg(&path)
        .output()
        .expect("viscsi cluster-key");
    assert!(out.status.success(), "cluster-key: {out:?}");
    path
}

/// Creates a VM on `host`; with `socket`, with a vhost-user-scsi bus there.
fn create_vm(host: &HostAgent, target: &RunningTarget, name: &str, path: &str, extra: &[&str]) {
    let portal = target.portal();
    let lun = target.lun_id(0).to_string();
    let mut args = vec![
        "vm",
        "create",
        name,
        "--portal",
        &portal,
        "--target",
        target.iqn(),
        "--lun",
        &lun,
        "--path",
        path,
    ];
    args.extend_from_slice(extra);
    cli(host, &args);
}

fn with_bus(socket: &Path) -> Vec<String> {
    vec![
        "--frontend".into(),
        "scsi".into(),
        "--vhost-socket".into(),
        socket.display().to_string(),
        "--queues".into(),
        "1".into(),
    ]
}

/// `viscsi migrate`; returns the migration view once switched over (or abandoned: then
/// the CLI fails and the error is returned).
fn migrate(from: &HostAgent, vm: &str, to: &str, extra: &[&str]) -> Result<Value, String> {
    let mut args = vec!["migrate", vm, "--to", to, "--json"];
    args.extend_from_slice(extra);
    let out = from.cli(&args);
    if out.success() {
        Ok(serde_json::from_str(&out.stdout).expect("migration JSON"))
    } else {
        Err(format!("{}{}", out.stdout, out.stderr))
    }
}

/// Polls `viscsi migrations VM` on `host` until `phase`.
fn wait_phase(host: &HostAgent, vm: &str, phase: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let views = json(host, &["migrations", vm]);
        let view = views[0].clone();
        if view["phase"] == phase {
            return view;
        }
        assert!(
            Instant::now() < deadline,
            "migration of {vm} never reached {phase}: {view}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn path_kind(view: &Value) -> String {
    view["path"]["kind"].as_str().unwrap_or("none").to_owned()
}

fn assert_gone(host: &HostAgent, vm: &str) {
    let out = host.cli(&["vm", "show", vm]);
    assert!(
        !out.success() && out.stderr.contains("no VM named"),
        "VM {vm} should be gone from the source: {out}"
    );
}

fn finish(load: Workload) {
    let report = load.stop().expect("workload");
    assert!(report.writes > 1000, "only {} writes", report.writes);
    assert_eq!(report.errors, 0, "writes failed");
    assert!(
        report.mismatches.is_empty(),
        "{} of {} blocks wrong: {:?}",
        report.mismatches.len(),
        report.blocks_checked,
        &report.mismatches[..report.mismatches.len().min(10)]
    );
    eprintln!(
        "workload: {} writes, {} blocks verified",
        report.writes, report.blocks_checked
    );
}

fn four_pairings(kind: TargetKind) {
    let dir = TempDir::new("migration");
    let target = RunningTarget::start(&kind, TargetConfig::new(IQN).mem_lun(LUN_BYTES));
    let hba_a = ReferenceHba::start(Path::new(BIN), &dir, "hba-a", 4);
    let hba_b = ReferenceHba::start(Path::new(BIN), &dir, "hba-b", 4);
    let key = new_key(&dir, "cluster.key");
    let a = host(
        &dir,
        "host-a",
        &[("hba-a", hba_a.socket())],
        &key,
        "127.0.0.1",
        &[],
        None,
    );
    let b = host(
        &dir,
        "host-b",
        &[("hba-b", hba_b.socket())],
        &key,
        "127.0.0.1",
        &[],
        None,
    );
    let sock_a = dir.join("vm-on-a.sock");
    let sock_b = dir.join("vm-on-b.sock");
    let bus: Vec<String> = with_bus(&sock_a);
    let bus: Vec<&str> = bus.iter().map(String::as_str).collect();
    create_vm(&a.agent, &target, "vm1", "auto", &bus);
    let shown = json(&a.agent, &["vm", "show", "vm1"]);
    assert_eq!(path_kind(&shown), "offload", "{shown}");
    let load = Workload::start(&sock_a, target.lun_id(0) as u16, LUN_BYTES).expect("workload");
    std::thread::sleep(Duration::from_millis(300));

    let steps = [
        (&a, &b, &sock_b, "software", "offload"),
        (&b, &a, &sock_a, "software", "software"),
        (&a, &b, &sock_b, "offload", "software"),
        (&b, &a, &sock_a, "offload", "offload"),
    ];
    for (from, to, socket, dest_kind, source_kind) in steps {
        let before = load.completions();
        let socket_arg = socket.display().to_string();
        load.arm();
        let view = migrate(
            &from.agent,
            "vm1",
            &to.addr,
            &["--path", dest_kind, "--vhost-socket", &socket_arg],
        )
        .unwrap_or_else(|e| panic!("{source_kind}->{dest_kind}: {e}"));
        let blackout = load.disarm();
        assert!(
            view["from_path"]
                .as_str()
                .unwrap_or("")
                .starts_with(source_kind),
            "{view}"
        );
        assert!(
            view["to_path"]
                .as_str()
                .unwrap_or("")
                .starts_with(dest_kind),
            "{view}"
        );
        let held = view["switchover_ms"].as_f64().expect("switchover_ms");
        // The VM's VMM moves to the destination's socket; the source then forgets the VM.
        if let Err(e) = load.move_to(socket) {
            panic!("VMM move: {e}; workload: {:?}", load.stop().err());
        }
        let done = wait_phase(&from.agent, "vm1", "completed");
        assert_gone(&from.agent, "vm1");
        let there = json(&to.agent, &["vm", "show", "vm1"]);
        assert_eq!(path_kind(&there), dest_kind, "{there}");
        assert_eq!(there["state"], "running", "{there}");
        let history: Vec<String> = there["history"]
            .as_array()
            .expect("history")
            .iter()
            .map(|e| e["message"].as_str().unwrap_or("").to_owned())
            .collect();
        assert!(
            history.iter().any(|m| m.contains("commands held")),
            "no switchover in the history: {history:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
        assert!(load.completions() > before + 100, "the workload stalled");
        eprintln!(
            "{} {source_kind}->{dest_kind}: commands held {held:.2} ms, longest pause seen by the VM {:.2} ms, {} forwarded",
            kind.name(),
            blackout.as_secs_f64() * 1e3,
            done["forwarded"]
        );
    }
    finish(load);
}

#[test]
fn all_four_pairings_under_load() {
    four_pairings(viscsi());
}

#[test]
fn all_four_pairings_under_load_tgtd() {
    four_pairings(tgtd());
}

/// One SCSI command through `vm scsi`; returns (status, data).
fn vm_scsi(
    host: &HostAgent,
    vm: &str,
    lun: u32,
    cdb: &str,
    data: Option<&Path>,
    read_len: u32,
) -> (u8, Vec<u8>) {
    let read_len = read_len.to_string();
    let lun = lun.to_string();
    let mut args = vec![
        "vm",
        "scsi",
        vm,
        "--lun",
        &lun,
        "--cdb",
        cdb,
        "--read-len",
        &read_len,
    ];
    let data_arg;
    if let Some(d) = data {
        data_arg = d.display().to_string();
        args.push("--data-file");
        args.push(&data_arg);
    }
    // The first command of a new nexus may meet a UNIT ATTENTION.
    for _ in 0..4 {
        let v = json(host, &args);
        let status = v["status"].as_u64().expect("status") as u8;
        let sense = v["sense"].as_str().unwrap_or("");
        if status == 2 && sense.get(4..6).is_some_and(|k| k.ends_with('6')) {
            continue;
        }
        use base64::Engine;
        let data = base64::engine::general_purpose::STANDARD
            .decode(v["data"].as_str().unwrap_or(""))
            .expect("base64");
        return (status, data);
    }
    panic!("UNIT ATTENTION four times")
}

fn pr_out_data(dir: &TempDir, name: &str, key: u64, sa_key: u64) -> PathBuf {
    let mut data = vec![0u8; 24];
    data[..8].copy_from_slice(&key.to_be_bytes());
    data[8..16].copy_from_slice(&sa_key.to_be_bytes());
    let path = dir.join(name);
    std::fs::write(&path, data).expect("write PR data");
    path
}

fn reservation(kind: TargetKind) {
    const KEY: u64 = 0xabad_cafe_0000_0001;
    let dir = TempDir::new("migration-pr");
    let target = RunningTarget::start(&kind, TargetConfig::new(IQN).mem_lun(LUN_BYTES));
    let lun = target.lun_id(0);
    let hba_b = ReferenceHba::start(Path::new(BIN), &dir, "hba-b", 4);
    let key = new_key(&dir, "cluster.key");
    let a = host(&dir, "host-a", &[], &key, "127.0.0.1", &[], None);
    let b = host(
        &dir,
        "host-b",
        &[("hba-b", hba_b.socket())],
        &key,
        "127.0.0.1",
        &[],
        None,
    );
    // The agent keeps a reservation made with the client's own key.
    create_vm(
        &a.agent,
        &target,
        "holder",
        "software",
        &["--reservation-key", "abadcafe00000001"],
    );
    create_vm(&a.agent, &target, "intruder", "software", &[]);
    let block = dir.join("block");
    std::fs::write(&block, vec![0x5a; 512]).expect("block");
    let write10 = "2a000000001000000100";
    // REGISTER, then RESERVE (Write Exclusive) as the holder.
    let register = pr_out_data(&dir, "register", 0, KEY);
    assert_eq!(
        vm_scsi(
            &a.agent,
            "holder",
            lun,
            "5f000000000000001800",
            Some(&register),
            0
        )
        .0,
        0
    );
    let reserve = pr_out_data(&dir, "reserve", KEY, 0);
    assert_eq!(
        vm_scsi(
            &a.agent,
            "holder",
            lun,
            "5f010100000000001800",
            Some(&reserve),
            0
        )
        .0,
        0
    );
    assert_eq!(
        vm_scsi(&a.agent, "intruder", lun, write10, Some(&block), 0).0,
        0x18,
        "no conflict before"
    );

    // Migrate the holder to B's offload adapter.
    let view = migrate(&a.agent, "holder", &b.addr, &["--path", "offload"]).expect("migrate");
    assert!(
        view["to_path"]
            .as_str()
            .unwrap_or("")
            .starts_with("offload"),
        "{view}"
    );
    wait_phase(&a.agent, "holder", "completed");

    // The reservation is still the holder's: READ RESERVATION shows the key, the holder
    // writes, the intruder does not.
    let (status, data) = vm_scsi(&b.agent, "holder", lun, "5e010000000000001800", None, 24);
    assert_eq!(status, 0);
    assert!(data.len() >= 24, "READ RESERVATION: {data:02x?}");
    assert_eq!(
        u32::from_be_bytes(data[4..8].try_into().unwrap()),
        16,
        "no reservation: {data:02x?}"
    );
    assert_eq!(u64::from_be_bytes(data[8..16].try_into().unwrap()), KEY);
    assert_eq!(data[21] & 0x0f, 1, "type Write Exclusive");
    assert_eq!(
        vm_scsi(&b.agent, "holder", lun, write10, Some(&block), 0).0,
        0,
        "holder cannot write after migration"
    );
    assert_eq!(
        vm_scsi(&a.agent, "intruder", lun, write10, Some(&block), 0).0,
        0x18,
        "no conflict after"
    );
    // Clean up the reservation (tgtd keeps it in memory across tests otherwise).
}

#[test]
fn reservation_survives_migration() {
    reservation(viscsi());
}

#[test]
fn reservation_survives_migration_tgtd() {
    reservation(tgtd());
}

/// The target ends a session that never logged out once the destination logs in with the
/// same InitiatorName + ISID; that session's writes fail and do not land.
fn fence(kind: TargetKind) {
    let dir = TempDir::new("migration-fence");
    let target = RunningTarget::start(&kind, TargetConfig::new(IQN).mem_lun(LUN_BYTES));
    let hba = ReferenceHba::start(Path::new(BIN), &dir, "hba0", 4);
    let lun = u64::from(target.lun_id(0));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        use datapath::Adapter;
        let client =
            datapath::InitiatorClient::new_for_vm("fenced", vec![target.portal()], IQN.into());
        for (round, offload) in [(0u64, false), (1, true)] {
            // The stale source: the VM's identity, no recovery (a host that lost its path).
            let mut options = client.session_options(&target.portal()).expect("options");
            options.policy.max_attempts = Some(0);
            let stale = initiator::Session::connect(options)
                .await
                .expect("stale login");
            let capacity = stale.read_capacity(lun).await;
            let block_size = match capacity {
                Ok(c) => c.block_size,
                Err(_) => stale.read_capacity(lun).await.expect("capacity").block_size,
            };
            // The destination logs in with the same identity.
            let mut keep_adapter = None;
            let dest: std::sync::Arc<dyn datapath::DataPath> = if offload {
                let adapter = hba::driver::HbaAdapter::connect("hba0", hba.socket())
                    .await
                    .expect("adapter");
                let path = adapter.open(&client, None).await.expect("offload login");
                keep_adapter = Some(adapter);
                path
            } else {
                datapath::software::SoftwareAdapter::new()
                    .open(&client, None)
                    .await
                    .expect("software login")
            };
            let lba = 100 + round;
            let old = Bytes::from(vec![0xee; block_size as usize]);
            let fenced = stale.write(lun, lba, old.clone(), block_size).await;
            assert!(
                fenced.is_err(),
                "the stale session still writes ({} destination)",
                if offload { "offload" } else { "software" }
            );
            // The destination writes and reads its own data; the stale write never landed.
            let mine = Bytes::from(vec![0x11; block_size as usize]);
            let write = datapath::Command {
                lun: scsi::lun::encode(lun),
                cdb: Bytes::from(write16(lba, 1)),
                data_out: mine.clone(),
                read_len: 0,
                attr: datapath::TaskAttr::Simple,
            };
            let mut done = dest.submit(write.clone()).await.expect("destination write");
            if done.status.0 == 2 {
                done = dest.submit(write).await.expect("destination write");
            }
            assert_eq!(done.status.0, 0);
            let read = datapath::Command {
                lun: scsi::lun::encode(lun),
                cdb: Bytes::from(read16(lba, 1)),
                data_out: Bytes::new(),
                read_len: block_size,
                attr: datapath::TaskAttr::Simple,
            };
            let got = dest.submit(read).await.expect("destination read");
            assert_eq!(got.data.to_bytes(), mine);
            let _ = dest.close().await;
            drop(keep_adapter);
        }
    });
}

fn rw16(opcode: u8, lba: u64, blocks: u32) -> Vec<u8> {
    let mut c = vec![0u8; 16];
    c[0] = opcode;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

fn write16(lba: u64, blocks: u32) -> Vec<u8> {
    rw16(0x8a, lba, blocks)
}

fn read16(lba: u64, blocks: u32) -> Vec<u8> {
    rw16(0x88, lba, blocks)
}

#[test]
fn the_target_fences_a_source_that_did_not_log_out() {
    fence(viscsi());
}

#[test]
fn the_target_fences_a_source_that_did_not_log_out_tgtd() {
    fence(tgtd());
}

/// A source agent restarted after the switchover (the VMM still on it) does not take the
/// session back: the VM keeps running on the destination without a recovery.
#[test]
fn a_restarted_source_does_not_log_in_again() {
    let dir = TempDir::new("migration-restart");
    let target = RunningTarget::start(&viscsi(), TargetConfig::new(IQN).mem_lun(LUN_BYTES));
    let lun = target.lun_id(0);
    let key = new_key(&dir, "cluster.key");
    let mut a = host(&dir, "host-a", &[], &key, "127.0.0.1", &[], None);
    let b = host(&dir, "host-b", &[], &key, "127.0.0.1", &[], None);
    let sock_a = dir.join("vm-on-a.sock");
    let bus = with_bus(&sock_a);
    let bus: Vec<&str> = bus.iter().map(String::as_str).collect();
    create_vm(&a.agent, &target, "vm1", "software", &bus);
    // A VMM attached to A's bus (idle), which stays there.
    let vmm = vhost_driver::Driver::connect(&sock_a, Default::default()).expect("attach");
    migrate(&a.agent, "vm1", &b.addr, &[]).expect("migrate");
    // The VMM is still on A: A forwards.
    wait_phase(&a.agent, "vm1", "forwarding");
    a.agent.kill_and_restart();
    drop(vmm);
    let shown = json(&a.agent, &["vm", "show", "vm1"]);
    assert_eq!(shown["state"], "moved", "{shown}");
    assert!(shown["path"].is_null(), "{shown}");
    std::thread::sleep(Duration::from_secs(1));
    let there = json(&b.agent, &["vm", "show", "vm1"]);
    assert_eq!(
        there["path_stats"]["recoveries"], 0,
        "B's session was disturbed: {there}"
    );
    let (status, _) = vm_scsi(&b.agent, "vm1", lun, "000000000000", None, 0);
    assert_eq!(status, 0, "TEST UNIT READY on B");
    let out = a
        .agent
        .cli(&["vm", "scsi", "vm1", "--lun", "0", "--cdb", "000000000000"]);
    assert!(!out.success(), "the moved VM answered on A: {out}");
}

/// Starts a migration that must be abandoned, checks the VM runs on, unchanged, on A.
fn expect_abandoned(a: &Host, to: &str, load: &Workload, what: &str, expect: &str) {
    let before = load.completions();
    let err = migrate(&a.agent, "vm1", to, &["--path", "software"]).expect_err(what);
    assert!(
        err.contains(expect),
        "{what}: expected {expect:?} in: {err}"
    );
    let view = wait_phase(&a.agent, "vm1", "abandoned");
    eprintln!("{what}: abandoned: {}", view["error"]);
    let shown = json(&a.agent, &["vm", "show", "vm1"]);
    assert_eq!(shown["state"], "running", "{what}: {shown}");
    assert_eq!(path_kind(&shown), "offload", "{what}: {shown}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        load.completions() > before + 100,
        "{what}: the workload stalled"
    );
}

#[test]
fn failed_migrations_leave_the_vm_on_the_source() {
    let dir = TempDir::new("migration-fail");
    let target = RunningTarget::start(
        &viscsi(),
        TargetConfig::new(IQN)
            .mem_lun(LUN_BYTES)
            .chap("vmuser", "right-secret-123"),
    );
    let hba = ReferenceHba::start(Path::new(BIN), &dir, "hba-a", 4);
    let key = new_key(&dir, "cluster.key");
    let a = host(
        &dir,
        "host-a",
        &[("hba-a", hba.socket())],
        &key,
        "127.0.0.1",
        &[("VM_CHAP", "right-secret-123")],
        None,
    );
    // The VM's CHAP secret comes from each agent's environment.
    let client = serde_json::json!({
        "version": 1,
        "initiator_name": "iqn.2024-01.test.viscsi:vm1",
        "isid": "80aabbccdd01",
        "portals": [target.portal()],
        "target": IQN,
        "luns": [0],
        "chap": { "user": "vmuser", "secret": { "env": "VM_CHAP" } },
    });
    let client_file = dir.join("client.json");
    std::fs::write(&client_file, client.to_string()).expect("client file");
    let sock_a = dir.join("vm-on-a.sock");
    let client_arg = client_file.display().to_string();
    let mut args = vec!["--client-file".to_string(), client_arg];
    args.extend(with_bus(&sock_a));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut create = vec!["vm", "create", "vm1", "--path", "auto"];
    create.extend_from_slice(&args);
    cli(&a.agent, &create);
    let load = Workload::start(&sock_a, target.lun_id(0) as u16, LUN_BYTES).expect("workload");
    std::thread::sleep(Duration::from_millis(300));

    // Another cluster key: the channel refuses.
    let other_key = new_key(&dir, "other.key");
    let stranger = host(
        &dir,
        "stranger",
        &[],
        &other_key,
        "127.0.0.1",
        &[("VM_CHAP", "right-secret-123")],
        None,
    );
    expect_abandoned(
        &a,
        &stranger.addr,
        &load,
        "wrong cluster key",
        "not the same cluster key",
    );
    drop(stranger);

    // Wrong CHAP secret on the destination: its trial login is refused.
    let wrong = host(
        &dir,
        "wrong-chap",
        &[],
        &key,
        "127.0.0.1",
        &[("VM_CHAP", "wrong-secret-456")],
        None,
    );
    expect_abandoned(
        &a,
        &wrong.addr,
        &load,
        "wrong CHAP on the destination",
        "authentication failed",
    );
    assert!(
        json(&wrong.agent, &["vm", "list"])
            .as_array()
            .is_some_and(Vec::is_empty),
        "the refused VM stayed on the destination"
    );
    drop(wrong);

    // The destination cannot reach the target: it runs in a namespace of its own.
    let ns = NetNs::create();
    let isolated = host(
        &dir,
        "isolated",
        &[],
        &key,
        &ns.inside_addr,
        &[("VM_CHAP", "right-secret-123")],
        Some(&ns),
    );
    expect_abandoned(
        &a,
        &isolated.addr,
        &load,
        "destination cannot reach the target",
        "no data path here",
    );
    drop(isolated);

    // The destination dies while preparing.
    let mut dying = host(
        &dir,
        "dying",
        &[],
        &key,
        "127.0.0.1",
        &[
            ("VM_CHAP", "right-secret-123"),
            ("VISCSI_MIGRATION_PREPARE_DELAY_MS", "2000"),
        ],
        None,
    );
    let to = dying.addr.clone();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        dying.agent.kill();
        dying
    });
    expect_abandoned(&a, &to, &load, "destination died mid-migration", "closed");
    drop(killer.join());

    finish(load);
}

/// The destination switches but its answer is lost with the channel: the source asks again
/// on a new channel, learns the destination has the VM, and forwards to it instead of taking
/// the session back.
#[test]
fn a_lost_switch_answer_leaves_the_vm_with_the_destination() {
    let dir = TempDir::new("migration-lost");
    let target = RunningTarget::start(&viscsi(), TargetConfig::new(IQN).mem_lun(LUN_BYTES));
    let key = new_key(&dir, "cluster.key");
    let a = host(&dir, "host-a", &[], &key, "127.0.0.1", &[], None);
    let b = host(
        &dir,
        "host-b",
        &[],
        &key,
        "127.0.0.1",
        &[("VISCSI_MIGRATION_DROP_SWITCHED", "1")],
        None,
    );
    let sock_a = dir.join("vm-on-a.sock");
    let sock_b = dir.join("vm-on-b.sock");
    let bus = with_bus(&sock_a);
    let bus: Vec<&str> = bus.iter().map(String::as_str).collect();
    create_vm(&a.agent, &target, "vm1", "software", &bus);
    let load = Workload::start(&sock_a, target.lun_id(0) as u16, LUN_BYTES).expect("workload");
    std::thread::sleep(Duration::from_millis(300));
    let socket_arg = sock_b.display().to_string();
    let view = migrate(&a.agent, "vm1", &b.addr, &["--vhost-socket", &socket_arg])
        .expect("migration with a lost answer");
    assert_eq!(view["phase"], "forwarding", "{view}");
    std::thread::sleep(Duration::from_millis(300));
    let before = load.completions();
    std::thread::sleep(Duration::from_millis(300));
    assert!(load.completions() > before + 100, "forwarding stalled");
    if let Err(e) = load.move_to(&sock_b) {
        panic!("VMM move: {e}; workload: {:?}", load.stop().err());
    }
    wait_phase(&a.agent, "vm1", "completed");
    let there = json(&b.agent, &["vm", "show", "vm1"]);
    assert_eq!(there["state"], "running", "{there}");
    assert_eq!(there["path_stats"]["recoveries"], 0, "contended: {there}");
    finish(load);
}
