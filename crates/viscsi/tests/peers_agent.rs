//! Host agents as processes (`viscsi host`), with the reference offload adapter as a process
//! (`viscsi hba serve`), against the `viscsi target` process and tgtd.
//!
//! - Two hosts: host A with an offload adapter, host B with software only. A VM on each
//!   path writes and reads with verification, and both see the same LUN identity (INQUIRY,
//!   VPD 0x83, capacity) and the same persistent reservations.
//! - An adapter fault (crash, hang, link down) during load: the VMs on that adapter continue
//!   on the software path with every write acknowledged and read back as the last one
//!   written (nothing lost, nothing re-applied out of order); a VM on another adapter keeps
//!   running there.
//! - An agent restart (SIGKILL and SIGTERM): VM records survive and sessions come back.
//! - Bad input: malformed requests, unknown VM, invalid IQN, duplicate InitiatorName, wrong
//!   CHAP secret, an adapter socket that speaks garbage: clear errors, nothing changed, the
//!   agent stays up.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent::client::ControlClient;
use agent::model::{CreateVm, PathPolicy, ScsiPassthrough, ScsiResult, VmView};
use base64::Engine;
use datapath::{ChapSettings, Secret};
use peer_harness::agent::{HostAgent, ReferenceHba};
use peer_harness::target::MIB;
use peer_harness::{hex, pattern};
use peer_harness::{RunningTarget, TargetConfig, TargetKind, TempDir};

const BIN: &str = env!("CARGO_BIN_EXE_viscsi");

fn viscsi() -> TargetKind {
    TargetKind::Viscsi { binary: BIN.into() }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

fn unb64(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(s.as_bytes())
        .expect("base64 from the agent")
}

/// The sense key of hex sense data (fixed or descriptor format).
fn sense_key(hex: &str) -> Option<u8> {
    let byte = |i: usize| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok();
    match byte(0)? & 0x7f {
        0x70 | 0x71 => byte(2).map(|b| b & 0x0f),
        0x72 | 0x73 => byte(1).map(|b| b & 0x0f),
        _ => None,
    }
}

/// A VM's SCSI commands through an agent's control API.
struct VmScsi {
    client: ControlClient,
    vm: String,
    lun: u64,
}

impl VmScsi {
    /// One command; a UNIT ATTENTION (the first command of a new I_T nexus gets one) is
    /// retried, as a guest does.
    async fn raw(&self, cdb: &[u8], data: &[u8], read_len: u32) -> Result<ScsiResult, String> {
        loop {
            let r: ScsiResult = self
                .client
                .post(
                    &format!("/v1/vms/{}/scsi", self.vm),
                    &ScsiPassthrough {
                        lun: self.lun,
                        cdb: hex(cdb),
                        data: b64(data),
                        read_len,
                    },
                )
                .await?;
            let unit_attention = r.status == 2 && sense_key(&r.sense) == Some(6);
            if !unit_attention {
                return Ok(r);
            }
        }
    }

    /// The command must end GOOD; returns its data.
    async fn good(&self, cdb: &[u8], data: &[u8], read_len: u32) -> Vec<u8> {
        let r = self
            .raw(cdb, data, read_len)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", self.vm));
        assert_eq!(
            r.status,
            0,
            "{}: CDB {} sense {}",
            self.vm,
            hex(cdb),
            r.sense
        );
        unb64(&r.data)
    }

    async fn inquiry(&self) -> Vec<u8> {
        self.good(&[0x12, 0, 0, 0, 96, 0], &[], 96).await
    }

    async fn vpd(&self, page: u8) -> Vec<u8> {
        self.good(&[0x12, 1, page, 0x01, 0, 0], &[], 256).await
    }

    async fn capacity(&self) -> Vec<u8> {
        let mut cdb = [0u8; 16];
        cdb[0] = 0x9e;
        cdb[1] = 0x10;
        cdb[13] = 32;
        self.good(&cdb, &[], 32).await
    }

    fn rw16(op: u8, lba: u64, blocks: u32) -> [u8; 16] {
        let mut cdb = [0u8; 16];
        cdb[0] = op;
        cdb[2..10].copy_from_slice(&lba.to_be_bytes());
        cdb[10..14].copy_from_slice(&blocks.to_be_bytes());
        cdb
    }

    async fn write(&self, lba: u64, data: &[u8]) -> Result<ScsiResult, String> {
        self.raw(&Self::rw16(0x8a, lba, data.len() as u32 / 512), data, 0)
            .await
    }

    async fn read(&self, lba: u64, blocks: u32) -> Vec<u8> {
        self.good(&Self::rw16(0x88, lba, blocks), &[], blocks * 512)
            .await
    }

    /// PERSISTENT RESERVE OUT with a 24-byte parameter list.
    async fn pr_out(&self, action: u8, kind: u8, key: u64, sa_key: u64) -> ScsiResult {
        let cdb = [0x5f, action, kind, 0, 0, 0, 0, 0, 24, 0];
        let mut params = [0u8; 24];
        params[..8].copy_from_slice(&key.to_be_bytes());
        params[8..16].copy_from_slice(&sa_key.to_be_bytes());
        self.raw(&cdb, &params, 0).await.expect("PR OUT")
    }

    /// PERSISTENT RESERVE IN (READ KEYS = 0, READ RESERVATION = 1) without the generation.
    async fn pr_in(&self, action: u8) -> Vec<u8> {
        let d = self
            .good(&[0x5e, action, 0, 0, 0, 0, 0, 1, 0, 0], &[], 256)
            .await;
        let len = u32::from_be_bytes([d[4], d[5], d[6], d[7]]) as usize;
        d[8..(8 + len).min(d.len())].to_vec()
    }
}

fn create_request(name: &str, target: &RunningTarget, path: PathPolicy) -> CreateVm {
    CreateVm {
        name: name.into(),
        path,
        portals: vec![target.portal()],
        target: Some(target.iqn().into()),
        luns: vec![u64::from(target.lun_id(0))],
        ..CreateVm::default()
    }
}

async fn create(client: &ControlClient, req: &CreateVm) -> VmView {
    client
        .post("/v1/vms", req)
        .await
        .unwrap_or_else(|e| panic!("create {}: {e}", req.name))
}

async fn show(client: &ControlClient, vm: &str) -> VmView {
    client
        .get(&format!("/v1/vms/{vm}"))
        .await
        .unwrap_or_else(|e| panic!("show {vm}: {e}"))
}

fn path_of(v: &VmView) -> String {
    match &v.path {
        Some(p) => match p.vf {
            Some(vf) => format!("{} {}/vf{vf}", p.kind, p.adapter),
            None => p.kind.to_string(),
        },
        None => "none".into(),
    }
}

fn two_hosts_same_lun(kind: TargetKind) {
    let dir = TempDir::new("agents");
    let target = RunningTarget::start(
        &kind,
        TargetConfig::new("iqn.2024-01.test.viscsi:agents").mem_lun(64 * MIB),
    );
    let hba = ReferenceHba::start(Path::new(BIN), &dir, "hba0", 4);
    let mut host_a = HostAgent::start(
        Path::new(BIN),
        &dir,
        "host-a",
        &[("hba0", hba.socket())],
        &[],
    );
    let mut host_b = HostAgent::start(Path::new(BIN), &dir, "host-b", &[], &[]);
    let rt = runtime();
    rt.block_on(async {
        let a = ControlClient::new(host_a.socket());
        let b = ControlClient::new(host_b.socket());
        let va = create(&a, &create_request("vm-a", &target, PathPolicy::Auto)).await;
        let vb = create(&b, &create_request("vm-b", &target, PathPolicy::Auto)).await;
        assert_eq!(
            path_of(&va).split('/').next(),
            Some("offload hba0"),
            "{va:?}"
        );
        assert!(va.path_reason.contains("free VF"), "{}", va.path_reason);
        assert_eq!(path_of(&vb), "software");
        assert!(
            vb.path_reason.contains("no offload adapter"),
            "{}",
            vb.path_reason
        );
        assert_ne!(va.client.initiator_name, vb.client.initiator_name);

        let lun = u64::from(target.lun_id(0));
        let sa = VmScsi {
            client: a.clone(),
            vm: "vm-a".into(),
            lun,
        };
        let sb = VmScsi {
            client: b.clone(),
            vm: "vm-b".into(),
            lun,
        };
        // The same LUN identity on both paths.
        assert_eq!(sa.inquiry().await, sb.inquiry().await);
        let vpd83 = sa.vpd(0x83).await;
        assert!(vpd83.len() > 8, "VPD 0x83 too short: {vpd83:?}");
        assert_eq!(vpd83, sb.vpd(0x83).await);
        assert_eq!(sa.capacity().await, sb.capacity().await);

        // Writes on either path read back on the other, several sizes.
        for (i, blocks) in [1u32, 8, 256, 2048].into_iter().enumerate() {
            let data = pattern(blocks as usize * 512, i as u64);
            let (w, r) = if i % 2 == 0 { (&sa, &sb) } else { (&sb, &sa) };
            let lba = 4096 * i as u64;
            let res = w.write(lba, &data).await.expect("write");
            assert_eq!(res.status, 0, "write sense {}", res.sense);
            assert!(r.read(lba, blocks).await == data, "{blocks} blocks differ");
        }

        // The same persistent reservations.
        let (key_a, key_b) = (0xaaaa_0000_0000_0001u64, 0xbbbb_0000_0000_0002u64);
        assert_eq!(sa.pr_out(0x00, 0, 0, key_a).await.status, 0, "register A");
        assert_eq!(sb.pr_out(0x00, 0, 0, key_b).await.status, 0, "register B");
        let keys = sa.pr_in(0x00).await;
        assert_eq!(keys, sb.pr_in(0x00).await);
        let mut listed: Vec<u64> = keys
            .chunks(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8-byte key")))
            .collect();
        listed.sort();
        assert_eq!(listed, vec![key_a, key_b]);
        // A takes a Write Exclusive reservation; B sees it and conflicts on write.
        assert_eq!(sa.pr_out(0x01, 0x01, key_a, 0).await.status, 0, "reserve");
        let held = sb.pr_in(0x01).await;
        assert_eq!(held, sa.pr_in(0x01).await);
        assert_eq!(&held[..8], &key_a.to_be_bytes());
        let denied = sb.write(0, &[0u8; 512]).await.expect("write");
        assert_eq!(denied.status, 0x18, "B must get RESERVATION CONFLICT");
        assert_eq!(sa.write(0, &[1u8; 512]).await.expect("write").status, 0);
        assert_eq!(sa.pr_out(0x02, 0x01, key_a, 0).await.status, 0, "release");
        assert_eq!(sb.write(0, &[2u8; 512]).await.expect("write").status, 0);
        for (s, key) in [(&sa, key_a), (&sb, key_b)] {
            assert_eq!(s.pr_out(0x00, 0, key, 0).await.status, 0, "unregister");
        }

        // Metrics show the VM's path and its commands.
        let text = a.metrics().await.expect("metrics");
        assert!(text.contains("viscsi_vm_data_path{"), "{text}");
        assert!(text.contains("kind=\"offload\""), "{text}");
    });
    // The operator's view.
    let list = host_a.cli(&["vm", "list"]);
    list.assert_success();
    assert!(
        list.stdout.contains("vm-a") && list.stdout.contains("offload hba0/vf"),
        "{}",
        list.stdout
    );
    let shown = host_b.cli(&["vm", "show", "vm-b"]);
    shown.assert_success();
    assert!(shown.stdout.contains("software"), "{}", shown.stdout);
    let adapters = host_a.cli(&["adapters"]);
    adapters.assert_success();
    assert!(
        adapters.stdout.contains("hba0") && adapters.stdout.contains("vm-a"),
        "{}",
        adapters.stdout
    );
    // Delete logs out and frees the VF.
    let deleted = host_a.cli(&["vm", "delete", "vm-a"]);
    deleted.assert_success();
    let listed = host_a.cli(&["vm", "list", "--json"]);
    assert!(!listed.stdout.contains("vm-a"), "{}", listed.stdout);
    host_a.assert_alive();
    host_b.assert_alive();
}

#[test]
fn two_hosts_offload_and_software_see_the_same_lun_viscsi_target() {
    two_hosts_same_lun(viscsi());
}

#[test]
fn two_hosts_offload_and_software_see_the_same_lun_tgtd() {
    two_hosts_same_lun(TargetKind::Tgtd);
}

/// One 4 KiB block stamped with (vm, writer, seq) in every 32 bytes.
fn stamped(vm: u64, writer: u64, seq: u64) -> Vec<u8> {
    let mut block = vec![0u8; 4096];
    for c in block.chunks_mut(32) {
        c[..8].copy_from_slice(&vm.to_be_bytes());
        c[8..16].copy_from_slice(&writer.to_be_bytes());
        c[16..24].copy_from_slice(&seq.to_be_bytes());
        c[24..].copy_from_slice(b"viscsi!!");
    }
    block
}

const SLOTS: u64 = 32;
const WRITERS: u64 = 4;

/// Writers of one VM: each rewrites its own 32 slots in turn, one write at a time, and
/// remembers the last acknowledged sequence number per slot. Returns the writes that failed.
async fn writers(
    scsi: Arc<VmScsi>,
    vm_id: u64,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<HashMap<u64, u64>>>,
    done: Arc<AtomicU64>,
) -> Vec<String> {
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let (scsi, stop, acked, done) = (scsi.clone(), stop.clone(), acked.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                seq += 1;
                let slot = w * SLOTS + seq % SLOTS;
                let lba = (vm_id * WRITERS * SLOTS + slot) * 8;
                match scsi.write(lba, &stamped(vm_id, w, seq)).await {
                    Ok(r) if r.status == 0 => {
                        acked.lock().unwrap().insert(lba, seq);
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => {
                        failures.push(format!("lba {lba}: status {} sense {}", r.status, r.sense))
                    }
                    Err(e) => failures.push(format!("lba {lba}: {e}")),
                }
            }
            failures
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("writer"));
    }
    all
}

/// Every acknowledged slot holds exactly its last acknowledged write.
async fn verify(scsi: &VmScsi, vm_id: u64, acked: &HashMap<u64, u64>) {
    assert!(!acked.is_empty(), "no write was acknowledged");
    for (&lba, &seq) in acked {
        let writer = lba / 8 % (WRITERS * SLOTS) / SLOTS;
        let got = scsi.read(lba, 8).await;
        assert!(
            got == stamped(vm_id, writer, seq),
            "lba {lba}: expected seq {seq}, found seq {}",
            u64::from_be_bytes(got[16..24].try_into().unwrap())
        );
    }
}

fn adapter_fault_during_load(fault: &str) {
    let dir = TempDir::new("agent-fault");
    let target = RunningTarget::start(
        &viscsi(),
        TargetConfig::new("iqn.2024-01.test.viscsi:fault").mem_lun(64 * MIB),
    );
    let mut hba0 = ReferenceHba::start(Path::new(BIN), &dir, "hba0", 4);
    let hba1 = ReferenceHba::start(Path::new(BIN), &dir, "hba1", 4);
    let mut host = HostAgent::start(
        Path::new(BIN),
        &dir,
        "host-a",
        &[("hba0", hba0.socket()), ("hba1", hba1.socket())],
        &[],
    );
    let rt = runtime();
    rt.block_on(async {
        let c = ControlClient::new(host.socket());
        let lun = u64::from(target.lun_id(0));
        // vm-0 and vm-1 on hba0, vm-2 on hba1.
        let mut names = Vec::new();
        for (i, adapter) in ["hba0", "hba0", "hba1"].iter().enumerate() {
            let name = format!("vm-{i}");
            let mut req = create_request(&name, &target, PathPolicy::Offload);
            req.adapter = Some(adapter.to_string());
            let v = create(&c, &req).await;
            assert!(path_of(&v).starts_with(&format!("offload {adapter}/")), "{v:?}");
            names.push(name);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut loads = Vec::new();
        let mut state = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let scsi = Arc::new(VmScsi { client: c.clone(), vm: name.clone(), lun });
            let acked = Arc::new(Mutex::new(HashMap::new()));
            let done = Arc::new(AtomicU64::new(0));
            loads.push(tokio::spawn(writers(
                scsi.clone(),
                i as u64,
                stop.clone(),
                acked.clone(),
                done.clone(),
            )));
            state.push((scsi, acked, done));
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
        let before: Vec<u64> = state.iter().map(|s| s.2.load(Ordering::Relaxed)).collect();
        let out = hba0.fault(fault);
        assert!(out.success() || fault == "crash", "fault {fault}: {}", out.combined());
        let t0 = Instant::now();
        // The affected VMs move; wait until both are on the software path.
        loop {
            let on_sw = [show(&c, "vm-0").await, show(&c, "vm-1").await]
                .iter()
                .all(|v| path_of(v) == "software");
            if on_sw {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "VMs did not fail over");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let moved_after = t0.elapsed();
        tokio::time::sleep(Duration::from_millis(700)).await;
        stop.store(true, Ordering::Relaxed);
        for (i, l) in loads.into_iter().enumerate() {
            let failures = l.await.expect("load");
            assert!(failures.is_empty(), "vm-{i}: {} failed writes: {:?}", failures.len(), &failures[..failures.len().min(5)]);
        }
        for (i, (scsi, acked, done)) in state.iter().enumerate() {
            let n = done.load(Ordering::Relaxed);
            assert!(n > before[i], "vm-{i} made no progress after the fault");
            let acked = acked.lock().unwrap().clone();
            verify(scsi, i as u64, &acked).await;
        }
        let mut reissued = 0;
        for name in ["vm-0", "vm-1"] {
            let v = show(&c, name).await;
            assert_eq!(v.metrics.failovers, 1, "{name}: {:?}", v.history);
            let failover = v.history.iter().find(|e| e.kind == "failover").expect("failover event");
            assert!(failover.message.contains("hba0"), "{}", failover.message);
            reissued += v.reissued;
        }
        let unaffected = show(&c, "vm-2").await;
        assert!(path_of(&unaffected).starts_with("offload hba1/"), "{unaffected:?}");
        assert_eq!(unaffected.metrics.failovers, 0);
        assert!(unaffected.history.iter().all(|e| e.kind != "failover"));
        if fault == "hang" {
            assert!(reissued >= 1, "a hang holds commands: some must have been re-issued");
        }
        let total: u64 = state.iter().map(|s| s.2.load(Ordering::Relaxed)).sum();
        eprintln!(
            "{fault}: VMs on hba0 on the software path {:.0} ms after the fault; {total} writes acknowledged and verified, {reissued} re-issued, 0 failed",
            moved_after.as_secs_f64() * 1e3
        );
        let adapters = host.cli(&["adapters"]);
        assert!(adapters.stdout.contains("unavailable: hba0"), "{}", adapters.stdout);
    });
    if fault == "crash" {
        // A restarted adapter is taken back; new VMs may use it again.
        hba0.restart();
        rt.block_on(async {
            let c = ControlClient::new(host.socket());
            let t0 = Instant::now();
            loop {
                let req = {
                    let mut r = create_request("vm-new", &target, PathPolicy::Offload);
                    r.adapter = Some("hba0".into());
                    r
                };
                match c.post::<_, VmView>("/v1/vms", &req).await {
                    Ok(v) => {
                        assert!(path_of(&v).starts_with("offload hba0/"), "{v:?}");
                        break;
                    }
                    Err(e) => assert!(
                        t0.elapsed() < Duration::from_secs(10),
                        "hba0 not taken back: {e}"
                    ),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
    }
    host.assert_alive();
}

#[test]
fn adapter_crash_during_load_moves_only_its_vms() {
    adapter_fault_during_load("crash");
}

#[test]
fn adapter_hang_during_load_moves_only_its_vms() {
    adapter_fault_during_load("hang");
}

#[test]
fn adapter_link_down_during_load_moves_only_its_vms() {
    adapter_fault_during_load("link-down");
}

#[test]
fn agent_restart_takes_its_vms_back() {
    let dir = TempDir::new("agent-restart");
    let target = RunningTarget::start(
        &viscsi(),
        TargetConfig::new("iqn.2024-01.test.viscsi:restart").mem_lun(16 * MIB),
    );
    let hba = ReferenceHba::start(Path::new(BIN), &dir, "hba0", 2);
    let mut host = HostAgent::start(
        Path::new(BIN),
        &dir,
        "host-a",
        &[("hba0", hba.socket())],
        &[],
    );
    let rt = runtime();
    let lun = u64::from(target.lun_id(0));
    let before = rt.block_on(async {
        let c = ControlClient::new(host.socket());
        let off = create(&c, &create_request("vm-off", &target, PathPolicy::Offload)).await;
        let sw = create(&c, &create_request("vm-sw", &target, PathPolicy::Software)).await;
        let s = VmScsi {
            client: c.clone(),
            vm: "vm-off".into(),
            lun,
        };
        assert_eq!(
            s.write(0, &pattern(4096, 7)).await.expect("write").status,
            0
        );
        (off, sw)
    });
    for restart in ["kill", "term"] {
        match restart {
            "kill" => host.kill_and_restart(),
            _ => host.stop_and_restart(),
        }
        rt.block_on(async {
            let c = ControlClient::new(host.socket());
            let t0 = Instant::now();
            for old in [&before.0, &before.1] {
                loop {
                    let v = show(&c, &old.name).await;
                    if v.path.is_some() {
                        assert_eq!(v.client.initiator_name, old.client.initiator_name);
                        assert_eq!(v.client.isid, old.client.isid);
                        assert_eq!(
                            path_of(&v).split('/').next(),
                            path_of(old).split('/').next(),
                            "{restart}: {v:?}"
                        );
                        assert!(v.history.iter().any(|e| e.kind == "restored"));
                        break;
                    }
                    assert!(
                        t0.elapsed() < Duration::from_secs(10),
                        "{restart}: {} not back: {v:?}",
                        old.name
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            let s = VmScsi {
                client: c.clone(),
                vm: "vm-off".into(),
                lun,
            };
            assert!(
                s.read(0, 8).await == pattern(4096, 7),
                "{restart}: data differs"
            );
            let s = VmScsi {
                client: c.clone(),
                vm: "vm-sw".into(),
                lun,
            };
            assert!(
                s.read(0, 8).await == pattern(4096, 7),
                "{restart}: data differs"
            );
        });
    }
    host.assert_alive();
}

#[test]
fn bad_input_gets_clear_errors_and_changes_nothing() {
    let dir = TempDir::new("agent-bad");
    let secret = "correct-horse-battery";
    let target = RunningTarget::start(
        &viscsi(),
        TargetConfig::new("iqn.2024-01.test.viscsi:bad")
            .mem_lun(16 * MIB)
            .chap("vmuser", secret),
    );
    // An "adapter" that answers with junk.
    let junk_socket = dir.join("junk.sock");
    let junk = std::os::unix::net::UnixListener::bind(&junk_socket).expect("junk socket");
    std::thread::spawn(move || {
        for mut s in junk.incoming().flatten() {
            use std::io::Write;
            let _ = s.write_all(b"\xff\xff\xff\xffHTTP/1.1 200 OK\r\n\r\nhello there");
        }
    });
    let mut host = HostAgent::start(
        Path::new(BIN),
        &dir,
        "host-a",
        &[("junk", &junk_socket)],
        &[],
    );
    let rt = runtime();
    rt.block_on(async {
        let c = ControlClient::new(host.socket());
        let chap = |s: &str| ChapSettings {
            user: "vmuser".into(),
            secret: Secret::Value(s.into()),
            target_user: None,
            target_secret: None,
        };
        let mut good = create_request("vm-1", &target, PathPolicy::Auto);
        good.chap = Some(chap(secret));
        let v = create(&c, &good).await;
        assert_eq!(path_of(&v), "software", "the junk adapter must not be used");

        let expect = |r: Result<(u16, bytes::Bytes), String>, status: u16, needle: &str| {
            let (code, body) = r.expect("the agent answers");
            let text = String::from_utf8_lossy(&body).into_owned();
            assert_eq!(code, status, "{text}");
            assert!(text.contains(needle), "expected {needle:?} in {text}");
            assert!(
                !text.contains(secret) && !text.contains("wrong-secret-123"),
                "secret leaked: {text}"
            );
        };
        use agent::client::Method;
        let post = |body: &str| c.request(Method::POST, "/v1/vms", Some(body.as_bytes().to_vec()));
        expect(post("{not json").await, 400, "malformed request");
        expect(
            post("{\"name\": \"x\", \"bogus\": 1}").await,
            400,
            "unknown field",
        );
        expect(
            c.request(Method::GET, "/v1/vms/nope", None).await,
            404,
            "no VM named nope",
        );
        expect(
            c.request(Method::DELETE, "/v1/vms/nope", None).await,
            404,
            "no VM named nope",
        );
        expect(
            c.request(Method::GET, "/v1/nothing", None).await,
            404,
            "no such endpoint",
        );
        expect(
            c.request(Method::PUT, "/v1/vms", None).await,
            405,
            "not allowed",
        );
        expect(
            c.request(Method::POST, "/v1/vms", Some(vec![b' '; 3 << 20]))
                .await,
            413,
            "larger than",
        );
        let mut bad = create_request("vm-2", &target, PathPolicy::Auto);
        bad.initiator_name = Some("not-an-iqn".into());
        expect(
            post(&serde_json::to_string(&bad).unwrap()).await,
            400,
            "initiator_name",
        );
        let mut bad = create_request("../etc", &target, PathPolicy::Auto);
        bad.chap = Some(chap(secret));
        expect(
            post(&serde_json::to_string(&bad).unwrap()).await,
            400,
            "VM name",
        );
        let mut dup = create_request("vm-3", &target, PathPolicy::Auto);
        dup.initiator_name = Some(v.client.initiator_name.clone());
        dup.chap = Some(chap(secret));
        expect(
            post(&serde_json::to_string(&dup).unwrap()).await,
            409,
            "already used by VM vm-1",
        );
        let mut again = create_request("vm-1", &target, PathPolicy::Auto);
        again.chap = Some(chap(secret));
        expect(
            post(&serde_json::to_string(&again).unwrap()).await,
            409,
            "exists",
        );
        let mut wrong = create_request("vm-4", &target, PathPolicy::Auto);
        wrong.chap = Some(chap("wrong-secret-123"));
        expect(
            post(&serde_json::to_string(&wrong).unwrap()).await,
            422,
            "authentication failed",
        );
        let mut offload = create_request("vm-5", &target, PathPolicy::Offload);
        offload.chap = Some(chap(secret));
        expect(
            post(&serde_json::to_string(&offload).unwrap()).await,
            422,
            "no offload adapter",
        );
        let bad_scsi = ScsiPassthrough {
            lun: 0,
            cdb: "zz".into(),
            data: String::new(),
            read_len: 0,
        };
        expect(
            c.request(
                Method::POST,
                "/v1/vms/vm-1/scsi",
                Some(serde_json::to_vec(&bad_scsi).unwrap()),
            )
            .await,
            400,
            "cdb",
        );
        // Raw garbage on the control socket does not hurt the agent.
        {
            use tokio::io::AsyncWriteExt;
            let mut s = tokio::net::UnixStream::connect(host.socket())
                .await
                .unwrap();
            let _ = s.write_all(b"\x00\x01garbage\r\n\r\n\xff").await;
        }
        // Nothing changed: one VM, still working.
        let vms: Vec<VmView> = c.get("/v1/vms").await.unwrap();
        assert_eq!(
            vms.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
            ["vm-1"]
        );
        let s = VmScsi {
            client: c.clone(),
            vm: "vm-1".into(),
            lun: u64::from(target.lun_id(0)),
        };
        assert_eq!(s.inquiry().await.len(), 96);
        let adapters: agent::model::AdaptersView = c.get("/v1/adapters").await.unwrap();
        let (name, why) = adapters
            .unavailable
            .first()
            .expect("junk listed as unavailable");
        assert_eq!(name, "junk");
        assert!(!why.is_empty() && !why.contains('\n'), "{why}");
    });
    // CLI errors: one line each.
    for (args, needle) in [
        (vec!["vm", "show", "nope"], "no VM named nope"),
        (
            vec![
                "vm",
                "create",
                "vm-9",
                "--portal",
                "127.0.0.1:1",
                "--target",
                "bad name",
            ],
            "target",
        ),
        (vec!["vm", "create", "vm-9"], "--url"),
    ] {
        let out = host.cli(&args);
        out.assert_failure();
        assert!(
            out.stderr.trim().lines().count() == 1 && out.stderr.contains(needle),
            "{args:?}: {}",
            out.stderr
        );
    }
    let unreachable = peer_harness::run_with_timeout(
        std::process::Command::new(BIN)
            .args(["vm", "list", "--socket"])
            .arg(dir.join("none.sock")),
        Duration::from_secs(10),
    );
    unreachable.assert_failure();
    assert!(
        unreachable.stderr.contains("cannot reach the host agent"),
        "{}",
        unreachable.stderr
    );
    host.assert_alive();
    assert!(!host.log().contains(secret), "secret in the agent's log");
}
