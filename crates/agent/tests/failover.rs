//! The agent in-process against viscsi's target in the same process, with test-double
//! offload adapters whose faults the test controls exactly: failover re-issues each command
//! once and loses none, only the failed adapter's VMs move, stale failure reports change
//! nothing, records survive a restart, and a VM whose path cannot come up is not stored.
//! The same behaviour with real processes (`viscsi host`, `viscsi hba`, tgtd) is tested in
//! `crates/viscsi/tests/peers_agent.rs`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent::model::{CreateVm, PathPolicy, VmState};
use agent::{Agent, AgentError, HostOptions};
use bytes::Bytes;
use datapath::software::SoftwareAdapter;
use datapath::{
    Adapter, AdapterHealth, AdapterInfo, AdapterKind, BoxFuture, ChapSettings, Command, Completion,
    DataPath, Health, InitiatorClient, PathError, PathInfo, PathStats, Secret, SessionState,
    TaskAttr, TmfFunction,
};
use peer_harness::TempDir;
use target::config::Limits;
use target::{ChapConfig as TargetChap, LunConfig, Target, TargetConfig, TargetDef};
use tokio::sync::watch;

const IQN: &str = "iqn.2024-01.test.viscsi:agent";

async fn serve_target(chap: Option<(&str, &str)>) -> (target::RunningTarget, SocketAddr) {
    let cfg = TargetConfig {
        portals: vec![SocketAddr::from(([127, 0, 0, 1], 0))],
        targets: vec![TargetDef {
            iqn: IQN.into(),
            alias: None,
            luns: vec![LunConfig::from_flag("0=mem:32MiB").expect("lun")],
            chap: chap
                .map(|(u, s)| {
                    vec![TargetChap {
                        user: u.into(),
                        secret: Some(s.into()),
                        secret_file: None,
                        secret_env: None,
                    }]
                })
                .unwrap_or_default(),
            mutual_chap: None,
            allowed_initiators: Vec::new(),
        }],
        discovery_chap: Vec::new(),
        limits: Limits::default(),
    };
    let running = Target::build(cfg)
        .expect("config")
        .serve()
        .await
        .expect("listen");
    let addr = running.local_addrs()[0];
    (running, addr)
}

/// An offload adapter double: paths are software sessions underneath; `hang` holds every
/// command until `fail`, which fails the adapter and every command in flight on it.
struct DoubleAdapter {
    name: String,
    inner: SoftwareAdapter,
    health: watch::Sender<AdapterHealth>,
    hung: Arc<AtomicBool>,
    vfs: u32,
    in_use: Arc<AtomicU32>,
}

impl DoubleAdapter {
    fn new(name: &str, vfs: u32) -> Arc<DoubleAdapter> {
        Arc::new(DoubleAdapter {
            name: name.into(),
            inner: SoftwareAdapter::new(),
            health: watch::Sender::new(AdapterHealth::Ok),
            hung: Arc::default(),
            vfs,
            in_use: Arc::default(),
        })
    }

    fn hang(&self) {
        self.hung.store(true, Ordering::SeqCst);
    }

    fn fail(&self, why: &str) {
        self.health.send_replace(AdapterHealth::Failed(why.into()));
    }
}

fn failed(h: &AdapterHealth) -> bool {
    matches!(h, AdapterHealth::Failed(_))
}

impl Adapter for DoubleAdapter {
    fn info(&self) -> AdapterInfo {
        AdapterInfo {
            name: self.name.clone(),
            kind: AdapterKind::Offload,
            model: "test double".into(),
            vfs_total: Some(self.vfs),
            vfs_in_use: self.in_use.load(Ordering::SeqCst),
            health: self.health.borrow().clone(),
            details: Vec::new(),
        }
    }

    fn watch_health(&self) -> watch::Receiver<AdapterHealth> {
        self.health.subscribe()
    }

    fn reaches<'a>(&'a self, portal: &'a str) -> BoxFuture<'a, bool> {
        self.inner.reaches(portal)
    }

    fn open<'a>(
        &'a self,
        client: &'a InitiatorClient,
        state: Option<&'a SessionState>,
    ) -> BoxFuture<'a, Result<Arc<dyn DataPath>, PathError>> {
        Box::pin(async move {
            if self.in_use.load(Ordering::SeqCst) >= self.vfs {
                return Err(PathError::NoCapacity(self.name.clone()));
            }
            let inner = self.inner.open(client, state).await?;
            let vf = self.in_use.fetch_add(1, Ordering::SeqCst);
            let path: Arc<dyn DataPath> = Arc::new(DoublePath {
                inner,
                vf,
                adapter: self.name.clone(),
                health: self.health.subscribe(),
                hung: self.hung.clone(),
                in_use: self.in_use.clone(),
            });
            Ok(path)
        })
    }
}

struct DoublePath {
    inner: Arc<dyn DataPath>,
    vf: u32,
    adapter: String,
    health: watch::Receiver<AdapterHealth>,
    hung: Arc<AtomicBool>,
    in_use: Arc<AtomicU32>,
}

impl DataPath for DoublePath {
    fn info(&self) -> PathInfo {
        PathInfo {
            kind: AdapterKind::Offload,
            adapter: self.adapter.clone(),
            vf: Some(self.vf),
            ..self.inner.info()
        }
    }

    fn submit(&self, command: Command) -> BoxFuture<'static, Result<Completion, PathError>> {
        let mut health = self.health.clone();
        let hung = self.hung.load(Ordering::SeqCst);
        let inner = self.inner.submit(command);
        Box::pin(async move {
            let fault = async {
                let _ = health.wait_for(failed).await;
                Err(PathError::PathFailed("adapter failed".into()))
            };
            if hung {
                return fault.await;
            }
            tokio::select! {
                biased;
                r = fault => r,
                r = inner => r,
            }
        })
    }

    fn task_management(
        &self,
        f: TmfFunction,
        lun: u64,
    ) -> BoxFuture<'static, Result<(), PathError>> {
        self.inner.task_management(f, lun)
    }

    fn quiesce(&self) -> BoxFuture<'static, ()> {
        self.inner.quiesce()
    }

    fn resume(&self) {
        self.inner.resume()
    }

    fn export_state(&self) -> SessionState {
        self.inner.export_state()
    }

    fn health(&self) -> Health {
        self.inner.health()
    }

    fn stats(&self) -> PathStats {
        self.inner.stats()
    }

    fn close(&self) -> BoxFuture<'static, Result<(), PathError>> {
        self.in_use.fetch_sub(1, Ordering::SeqCst);
        self.inner.close()
    }
}

fn options(dir: &TempDir) -> HostOptions {
    HostOptions {
        name: "test-host".into(),
        state_dir: dir.join("state"),
        sysfs_root: dir.join("no-sysfs"),
        adapters: Vec::new(),
        migration: None,
    }
}

fn request(name: &str, addr: SocketAddr, path: PathPolicy, adapter: Option<&str>) -> CreateVm {
    CreateVm {
        name: name.into(),
        path,
        adapter: adapter.map(str::to_owned),
        portals: vec![addr.to_string()],
        target: Some(IQN.into()),
        luns: vec![0],
        ..CreateVm::default()
    }
}

fn write16(lba: u64, data: Bytes) -> Command {
    let mut cdb = [0u8; 16];
    cdb[0] = 0x8a;
    cdb[2..10].copy_from_slice(&lba.to_be_bytes());
    cdb[10..14].copy_from_slice(&(data.len() as u32 / 512).to_be_bytes());
    Command {
        lun: 0,
        cdb: Bytes::copy_from_slice(&cdb),
        data_out: data,
        read_len: 0,
        attr: TaskAttr::Simple,
    }
}

fn read16(lba: u64, blocks: u32) -> Command {
    let mut cdb = [0u8; 16];
    cdb[0] = 0x88;
    cdb[2..10].copy_from_slice(&lba.to_be_bytes());
    cdb[10..14].copy_from_slice(&blocks.to_be_bytes());
    Command {
        lun: 0,
        cdb: Bytes::copy_from_slice(&cdb),
        data_out: Bytes::new(),
        read_len: blocks * 512,
        attr: TaskAttr::Simple,
    }
}

/// Submits like a guest does: a UNIT ATTENTION (the first command of a new I_T nexus gets
/// one) is retried.
async fn submit(vm: &agent::Vm, command: Command) -> Result<Completion, PathError> {
    loop {
        let c = vm.submit(command.clone()).await?;
        let unit_attention = c.status.0 == 2 && c.sense.get(2).is_some_and(|k| k & 0x0f == 6);
        if !unit_attention {
            return Ok(c);
        }
    }
}

fn stamped(vm: u64, seq: u64) -> Bytes {
    let mut b = vec![0u8; 4096];
    for c in b.chunks_mut(16) {
        c[..8].copy_from_slice(&vm.to_be_bytes());
        c[8..].copy_from_slice(&seq.to_be_bytes());
    }
    Bytes::from(b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_adapter_moves_exactly_its_vms_and_loses_no_write() {
    let (_target, addr) = serve_target(None).await;
    let dir = TempDir::new("agent-failover");
    let (fa, fb) = (DoubleAdapter::new("fa", 4), DoubleAdapter::new("fb", 4));
    let agent = Agent::start_with(
        options(&dir),
        vec![
            ("fa".into(), fa.clone() as Arc<dyn Adapter>),
            ("fb".into(), fb.clone() as Arc<dyn Adapter>),
        ],
    )
    .await
    .expect("agent");
    for (name, adapter) in [("vm-0", "fa"), ("vm-1", "fa"), ("vm-2", "fb")] {
        let v = agent
            .create_vm(request(name, addr, PathPolicy::Offload, Some(adapter)))
            .await
            .expect("create");
        let p = v.path.expect("path");
        assert_eq!(
            (p.kind, p.adapter.as_str()),
            (AdapterKind::Offload, adapter)
        );
    }
    // 8 writers per VM, each rewriting its 16 slots in turn.
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<HashMap<u64, (u64, u64)>>> = Arc::default();
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for vm_id in 0..3u64 {
        for w in 0..8u64 {
            let vm = agent.vm(&format!("vm-{vm_id}")).expect("vm");
            let (stop, acked, done) = (stop.clone(), acked.clone(), done.clone());
            tasks.push(tokio::spawn(async move {
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    seq += 1;
                    let lba = ((vm_id * 8 + w) * 16 + seq % 16) * 8;
                    let c = submit(&vm, write16(lba, stamped(vm_id, seq)))
                        .await
                        .unwrap_or_else(|e| panic!("vm-{vm_id}: write failed: {e}"));
                    assert_eq!(c.status.0, 0);
                    acked.lock().unwrap().insert(lba, (vm_id, seq));
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Hang first, so that commands are certainly held on the adapter, then fail it.
    fa.hang();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = done.load(Ordering::Relaxed);
    fa.fail("test fault");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("writer");
    }
    assert!(
        done.load(Ordering::Relaxed) > before,
        "no progress after the fault"
    );
    // Every acknowledged slot holds its last acknowledged write.
    let vm = agent.vm("vm-2").expect("vm");
    let acked = acked.lock().unwrap().clone();
    for (&lba, &(vm_id, seq)) in &acked {
        let c = submit(&vm, read16(lba, 8)).await.expect("read");
        assert!(
            c.data.to_bytes() == stamped(vm_id, seq),
            "lba {lba} is not seq {seq}"
        );
    }
    let mut reissued = 0;
    for name in ["vm-0", "vm-1"] {
        let v = agent.vm(name).expect("vm").view();
        assert_eq!(
            v.path.as_ref().map(|p| p.kind),
            Some(AdapterKind::Software),
            "{name}"
        );
        assert_eq!(v.metrics.failovers, 1);
        assert_eq!(v.metrics.errors, 0);
        assert!(
            v.path_reason.contains("failover from offload fa/vf"),
            "{}",
            v.path_reason
        );
        let event = v
            .history
            .iter()
            .find(|e| e.kind == "failover")
            .expect("failover event");
        assert!(
            event.message.starts_with("offload fa/vf"),
            "{}",
            event.message
        );
        reissued += v.reissued;
    }
    assert!(
        reissued >= 2,
        "held commands must have been re-issued ({reissued})"
    );
    let v = agent.vm("vm-2").expect("vm").view();
    assert_eq!(v.path.map(|p| p.adapter), Some("fb".to_string()));
    assert_eq!(v.metrics.failovers, 0);
    assert_eq!(v.reissued, 0);
    let adapters = agent.adapters();
    assert!(adapters
        .unavailable
        .iter()
        .any(|(n, why)| n == "fa" && why.contains("test fault")));
    assert!(adapters.adapters.iter().all(|a| a.info.name != "fa"));
    // Reported as metrics too.
    let text = agent.metrics_text();
    assert!(
        text.contains("viscsi_vm_failovers_total{host=\"test-host\",vm=\"vm-0\"} 1"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_failure_report_changes_nothing() {
    let (_target, addr) = serve_target(None).await;
    let dir = TempDir::new("agent-stale");
    let fa = DoubleAdapter::new("fa", 2);
    let agent = Agent::start_with(
        options(&dir),
        vec![("fa".into(), fa.clone() as Arc<dyn Adapter>)],
    )
    .await
    .expect("agent");
    agent
        .create_vm(request("vm", addr, PathPolicy::Auto, None))
        .await
        .expect("create");
    let vm = agent.vm("vm").expect("vm");
    // Generation 1 is the first path; a report about generation 0 is stale.
    vm.failover(0, "stale").await;
    assert_eq!(vm.view().metrics.failovers, 0);
    vm.failover(1, "first").await;
    vm.failover(1, "again").await;
    let v = vm.view();
    assert_eq!(v.metrics.failovers, 1);
    assert_eq!(v.path.map(|p| p.kind), Some(AdapterKind::Software));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(fa.info().vfs_in_use, 0, "the failed path gives its VF back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_survive_a_restart_and_failed_creates_store_nothing() {
    let secret = "right-secret-1234";
    let (_target, addr) = serve_target(Some(("vmuser", secret))).await;
    let dir = TempDir::new("agent-restart");
    let chap = |s: &str| ChapSettings {
        user: "vmuser".into(),
        secret: Secret::Value(s.into()),
        target_user: None,
        target_secret: None,
    };
    let (name, isid) = {
        let agent = Agent::start(options(&dir)).await.expect("agent");
        let mut req = request("keep", addr, PathPolicy::Auto, None);
        req.chap = Some(chap(secret));
        let v = agent.create_vm(req).await.expect("create");
        let mut bad = request("refused", addr, PathPolicy::Auto, None);
        bad.chap = Some(chap("wrong-secret-5678"));
        match agent.create_vm(bad).await {
            Err(AgentError::Unavailable(why)) => {
                assert!(why.contains("authentication failed"), "{why}");
                assert!(!why.contains("wrong-secret"), "{why}");
            }
            other => panic!("wrong secret accepted: {:?}", other.map(|v| v.name)),
        }
        let vm = agent.vm("keep").expect("vm");
        submit(&vm, write16(0, stamped(1, 1))).await.expect("write");
        agent.shutdown().await;
        (v.client.initiator_name, v.client.isid)
    };
    let agent = Agent::start(options(&dir)).await.expect("agent again");
    let names: Vec<String> = agent.vms().iter().map(|v| v.name().to_owned()).collect();
    assert_eq!(names, ["keep"], "only the created VM is stored");
    let vm = agent.vm("keep").expect("vm");
    for _ in 0..100 {
        if vm.state() == VmState::Running {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let v = vm.view();
    assert_eq!(v.state, VmState::Running, "{:?}", v.history);
    assert_eq!((&v.client.initiator_name, &v.client.isid), (&name, &isid));
    assert!(v.history.iter().any(|e| e.kind == "restored"));
    let c = submit(&vm, read16(0, 8)).await.expect("read");
    assert!(c.data.to_bytes() == stamped(1, 1));
    // The stored secret is never shown.
    let shown = serde_json::to_string(&v.client).unwrap();
    assert!(!shown.contains(secret), "{shown}");
}
