//! `viscsi demo`: the whole system in one process, with nothing to set up.
//!
//! A viscsi target with a memory LUN, host A with a reference offload adapter, host B with
//! the software path only, and a VM whose workload writes stamped blocks through its
//! vhost-user-scsi bus. The VM migrates A→B→A under load, then A's adapter loses its link;
//! each step prints the data path in use and the storage blackout, and at the end every
//! block is read back and checked.
//!
//! `--bench N` instead migrates the VM N times per pairing (offload→software,
//! software→offload, software→software, offload→offload) and prints the blackout
//! percentiles: host B then has an adapter too.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agent::inventory::AdapterConfig;
use agent::migration::channel::ClusterKey;
use agent::model::{CreateVm, Frontend, FrontendKind, MigrateRequest, MigrationPhase, PathPolicy};
use agent::{Agent, HostOptions, MigrationOptions};
use clap::Args;
use target::{LunConfig, Target, TargetConfig, TargetDef};

use vhost_driver::stamped::{self as workload, Workload};

const VM: &str = "demo-vm";
const TARGET_IQN: &str = "iqn.2024-01.org.viscsi:demo";
const LUN_MIB: u64 = 64;

#[derive(Args)]
pub struct DemoArgs {
    /// Seconds of workload before and between the steps.
    #[arg(long, default_value_t = 1.5)]
    dwell: f64,
    /// Run the blackout benchmark instead: N migrations per pairing.
    #[arg(long, value_name = "N")]
    bench: Option<usize>,
}

pub fn run(args: DemoArgs) -> Result<(), String> {
    if !(0.0..=600.0).contains(&args.dwell) {
        return Err("--dwell must be 0 to 600 seconds".into());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let dir = std::env::temp_dir().join(format!("viscsi-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let result = runtime.block_on(async {
        let world = World::start(&dir, args.bench.is_some()).await?;
        let outcome = match args.bench {
            Some(n) => bench(&world, n).await,
            None => demo(&world, Duration::from_secs_f64(args.dwell)).await,
        };
        world.stop().await;
        outcome
    });
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// The target, the adapters and the two agents.
struct World {
    target: target::RunningTarget,
    portal: SocketAddr,
    a: Agent,
    b: Agent,
    b_addr: SocketAddr,
    a_addr: SocketAddr,
    /// The reference adapters' sockets (host A's first).
    adapters: Vec<PathBuf>,
    stop_adapters: tokio::sync::watch::Sender<bool>,
}

impl World {
    async fn start(dir: &Path, adapter_on_b: bool) -> Result<World, String> {
        let config = TargetConfig {
            portals: vec!["127.0.0.1:0".parse().map_err(|_| "bad address")?],
            targets: vec![TargetDef {
                iqn: TARGET_IQN.into(),
                alias: None,
                luns: vec![LunConfig::from_flag(&format!("0=mem:{LUN_MIB}MiB"))?],
                chap: Vec::new(),
                mutual_chap: None,
                allowed_initiators: Vec::new(),
            }],
            discovery_chap: Vec::new(),
            limits: Default::default(),
        };
        let target = Target::build(config)
            .map_err(|e| e.to_string())?
            .serve()
            .await
            .map_err(|e| e.to_string())?;
        let portal = *target.local_addrs().first().ok_or("target has no portal")?;

        let (stop_adapters, stopped) = tokio::sync::watch::channel(false);
        let mut adapters = Vec::new();
        for name in ["ref-a", "ref-b"]
            .iter()
            .take(if adapter_on_b { 2 } else { 1 })
        {
            let socket = dir.join(format!("{name}.sock"));
            let config = hba::device::DeviceConfig {
                socket: socket.clone(),
                name: (*name).into(),
                vfs: 4,
            };
            let mut stopped = stopped.clone();
            tokio::spawn(async move {
                let until = async move {
                    let _ = stopped.wait_for(|s| *s).await;
                };
                if let Err(e) = hba::device::serve_until(config, until).await {
                    tracing::error!(error = %e, "reference adapter stopped");
                }
            });
            adapters.push(socket);
        }
        // The adapters listen once their sockets exist.
        for socket in &adapters {
            let deadline = Instant::now() + Duration::from_secs(5);
            while !socket.exists() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }

        let key = ClusterKey::from_bytes(ClusterKey::generate_file_contents().trim().as_bytes());
        let host = |name: &str, adapter: Option<(&str, &PathBuf)>| HostOptions {
            name: name.into(),
            state_dir: dir.join(name),
            sysfs_root: dir.join("no-sysfs"),
            adapters: adapter
                .map(|(n, s)| {
                    vec![AdapterConfig {
                        name: n.into(),
                        socket: s.clone(),
                    }]
                })
                .unwrap_or_default(),
            migration: Some(MigrationOptions {
                key: key.clone(),
                listen: Some("127.0.0.1:0".into()),
                peers: BTreeMap::new(),
            }),
        };
        let a = Agent::start(host("host-a", Some(("ref-a", &adapters[0])))).await?;
        let b = Agent::start(host("host-b", adapters.get(1).map(|s| ("ref-b", s)))).await?;
        let a_addr = a.migration_addr().ok_or("host A takes no migrations")?;
        let b_addr = b.migration_addr().ok_or("host B takes no migrations")?;
        Ok(World {
            target,
            portal,
            a,
            b,
            a_addr,
            b_addr,
            adapters,
            stop_adapters,
        })
    }

    async fn stop(self) {
        self.a.shutdown().await;
        self.b.shutdown().await;
        let _ = self.stop_adapters.send(true);
        self.target.shutdown().await;
    }

    /// Creates the VM on host A and starts its workload.
    async fn create_vm(&self) -> Result<Workload, String> {
        let request = CreateVm {
            name: VM.into(),
            portals: vec![self.portal.to_string()],
            target: Some(TARGET_IQN.into()),
            luns: vec![0],
            frontend: Some(Frontend {
                kind: FrontendKind::Scsi,
                socket: None,
                queues: Some(1),
                memory_mib: Some(16),
            }),
            ..Default::default()
        };
        self.a.create_vm(request).await.map_err(|e| e.to_string())?;
        let socket = self.socket(&self.a)?;
        tokio::task::spawn_blocking(move || Workload::start(&socket, 0, LUN_MIB << 20))
            .await
            .map_err(|e| e.to_string())?
    }

    fn socket(&self, agent: &Agent) -> Result<PathBuf, String> {
        agent
            .vm(VM)
            .and_then(|vm| vm.record().frontend.and_then(|f| f.socket))
            .ok_or_else(|| format!("VM {VM} has no socket on {}", agent.name()))
    }

    fn addr_of(&self, agent: &Agent) -> SocketAddr {
        if agent.name() == self.a.name() {
            self.a_addr
        } else {
            self.b_addr
        }
    }
}

/// The data path a VM is on, as `offload ref-a/vf0` or `software`.
fn path_of(agent: &Agent) -> String {
    agent
        .vm(VM)
        .and_then(|vm| vm.view().path)
        .map(|p| match p.vf {
            Some(vf) => format!("offload {}/vf{vf}", p.adapter),
            None => p.kind.to_string(),
        })
        .unwrap_or_else(|| "none".into())
}

/// One migration's figures.
struct Moved {
    /// Commands held on the source (drain, hand-over, login), as the agent measured it.
    held: Duration,
    /// The longest pause between two completions the VM saw.
    blackout: Duration,
    /// The VMM's own move of its rings (not storage).
    vmm: Duration,
    forwarded: u64,
}

/// Migrates the VM from `from` to `to` under load, then moves the workload's rings.
async fn migrate(
    world: &World,
    load: &Workload,
    from: &Agent,
    to: &Agent,
    path: Option<PathPolicy>,
) -> Result<Moved, String> {
    if let Ok(mut g) = load.gaps.lock() {
        g.arm();
    }
    let request = MigrateRequest {
        to: world.addr_of(to).to_string(),
        path,
        ..Default::default()
    };
    from.migrate(VM, request).await.map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let view = loop {
        let view = from.migration(VM).ok_or("migration vanished")?;
        if matches!(
            view.phase,
            MigrationPhase::Forwarding | MigrationPhase::Completed | MigrationPhase::Abandoned
        ) {
            break view;
        }
        if Instant::now() > deadline {
            return Err("migration did not switch over within 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    if view.phase == MigrationPhase::Abandoned {
        return Err(format!(
            "migration abandoned: {}",
            view.error.unwrap_or_default()
        ));
    }
    // Let the workload run on the forwarded path a little before its VMM moves.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let blackout = load.gaps.lock().map(|mut g| g.disarm()).unwrap_or_default();
    let socket = world.socket(to)?;
    let vmm = {
        let orders = load.orders.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        orders
            .send(workload::Order::MoveTo(socket, tx))
            .map_err(|_| "the workload stopped")?;
        tokio::task::spawn_blocking(move || {
            rx.recv_timeout(Duration::from_secs(30))
                .map_err(|_| "the workload did not move".to_string())?
        })
        .await
        .map_err(|e| e.to_string())??
    };
    // The source forgets the VM once its VMM has left.
    let deadline = Instant::now() + Duration::from_secs(10);
    let done = loop {
        let view = from.migration(VM).ok_or("migration vanished")?;
        if view.phase == MigrationPhase::Completed {
            break view;
        }
        if Instant::now() > deadline {
            return Err("the source did not retire the VM".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    Ok(Moved {
        held: Duration::from_secs_f64(done.switchover_ms.unwrap_or(0.0) / 1e3),
        blackout,
        vmm,
        forwarded: done.forwarded,
    })
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

async fn demo(world: &World, dwell: Duration) -> Result<(), String> {
    let started = Instant::now();
    println!("viscsi demo: one process, two hosts, one VM");
    println!(
        "  target   viscsi target {TARGET_IQN} on {}, LUN 0: {LUN_MIB} MiB in memory",
        world.portal
    );
    println!("  host A   reference offload adapter ref-a (4 VFs) + software path");
    println!("  host B   software path only");
    let load = world.create_vm().await?;
    println!(
        "1. VM {VM} created on host A: data path {}; its workload writes stamped 4 KiB blocks at QD8 through vhost-user-scsi",
        path_of(&world.a)
    );
    tokio::time::sleep(dwell).await;

    let m = migrate(world, &load, &world.a, &world.b, None).await?;
    println!(
        "2. migrated A -> B under load: now {} on host B; storage blackout {} (commands held {}), {} commands forwarded by A until the VMM moved ({} VMM pause)",
        path_of(&world.b),
        ms(m.blackout),
        ms(m.held),
        m.forwarded,
        ms(m.vmm)
    );
    tokio::time::sleep(dwell).await;

    let m = migrate(world, &load, &world.b, &world.a, None).await?;
    println!(
        "3. migrated B -> A under load: now {} on host A; storage blackout {} (commands held {}), {} forwarded",
        path_of(&world.a),
        ms(m.blackout),
        ms(m.held),
        m.forwarded
    );
    tokio::time::sleep(dwell).await;

    if let Ok(mut g) = load.gaps.lock() {
        g.arm();
    }
    hba::driver::inject_fault(&world.adapters[0], hba::protocol::Fault::LinkDown)
        .await
        .map_err(|e| format!("cannot inject the fault: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while path_of(&world.a) != "software" {
        if Instant::now() > deadline {
            return Err("the VM did not fail over within 30 s".into());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let blackout = load.gaps.lock().map(|mut g| g.disarm()).unwrap_or_default();
    println!(
        "4. adapter ref-a lost its link: the VM failed over to {} on host A; storage blackout {}",
        path_of(&world.a),
        ms(blackout)
    );
    tokio::time::sleep(dwell).await;

    let report = tokio::task::spawn_blocking(move || load.stop())
        .await
        .map_err(|e| e.to_string())??;
    let verdict = if report.mismatches.is_empty() && report.errors == 0 {
        "OK: nothing lost, duplicated or reordered"
    } else {
        "FAILED"
    };
    println!(
        "5. verified: {} writes acknowledged, {} errors; {} blocks read back, {} wrong — {verdict}",
        report.writes,
        report.errors,
        report.blocks_checked,
        report.mismatches.len()
    );
    for m in report.mismatches.iter().take(10) {
        println!("     {m}");
    }
    if let Some(vm) = world.a.vm(VM) {
        println!("history of {VM}:");
        for e in vm.view().history {
            println!("  {:<10} {}", e.kind, e.message);
        }
    }
    println!("done in {:.1} s", started.elapsed().as_secs_f64());
    if verdict == "FAILED" {
        return Err("verification failed".into());
    }
    Ok(())
}

/// Percentiles of a sample, in ms.
fn percentiles(samples: &mut [Duration]) -> (f64, f64, f64) {
    samples.sort();
    let at = |q: f64| {
        let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    (at(0.5), at(0.99), at(1.0))
}

async fn bench(world: &World, n: usize) -> Result<(), String> {
    if n == 0 {
        return Err("--bench needs at least 1 migration".into());
    }
    let load = world.create_vm().await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut blackouts: BTreeMap<String, Vec<Duration>> = BTreeMap::new();
    let mut held: BTreeMap<String, Vec<Duration>> = BTreeMap::new();
    // Each round trip A→B→A gives one migration of each direction of the pair.
    let series = [
        (PathPolicy::Offload, PathPolicy::Software, n),
        (PathPolicy::Software, PathPolicy::Software, n.div_ceil(2)),
        (PathPolicy::Offload, PathPolicy::Offload, n.div_ceil(2)),
    ];
    let kind = |agent: &Agent| {
        path_of(agent)
            .split(' ')
            .next()
            .unwrap_or("none")
            .to_owned()
    };
    for (on_a, on_b, rounds) in series {
        for _ in 0..rounds {
            for (from, to, to_kind) in [(&world.a, &world.b, on_b), (&world.b, &world.a, on_a)] {
                let before = kind(from);
                let m = migrate(world, &load, from, to, Some(to_kind)).await?;
                let pairing = format!("{before}->{}", kind(to));
                blackouts
                    .entry(pairing.clone())
                    .or_default()
                    .push(m.blackout);
                held.entry(pairing).or_default().push(m.held);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    let report = tokio::task::spawn_blocking(move || load.stop())
        .await
        .map_err(|e| e.to_string())??;
    println!("storage blackout under 4 KiB QD8 writes (longest pause between completions the VM saw), per pairing:");
    println!(
        "{:<20} {:>6} {:>9} {:>9} {:>9}   {:>14}",
        "pairing", "n", "p50 ms", "p99 ms", "max ms", "held p50/p99"
    );
    for (pairing, samples) in &mut blackouts {
        let (p50, p99, max) = percentiles(samples);
        let (h50, h99, _) =
            percentiles(held.get_mut(pairing).map(|v| &mut v[..]).unwrap_or(&mut []));
        println!(
            "{pairing:<20} {:>6} {p50:>9.2} {p99:>9.2} {max:>9.2}   {h50:>6.2}/{h99:.2}",
            samples.len()
        );
    }
    println!(
        "{} writes, {} errors, {} blocks verified, {} wrong",
        report.writes,
        report.errors,
        report.blocks_checked,
        report.mismatches.len()
    );
    if !report.mismatches.is_empty() || report.errors > 0 {
        return Err("verification failed".into());
    }
    Ok(())
}
