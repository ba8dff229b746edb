//! Faults of the reference offload adapter under load: `crash`, `hang` and `link-down`
//! injected while 8 workers keep commands in flight through a VF. The driver must turn the
//! adapter's health to Failed within a second, fail every command in flight with
//! PathFailed (each worker's last command; none lost, none completed twice), fail new ones
//! the same way, and leave the target's session free for the VM's next path.

#[path = "hba_common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use datapath::software::SoftwareAdapter;
use datapath::{Adapter, AdapterHealth, DataPath, Health, PathError};
use hba::driver::{adapter_status, inject_fault, HbaAdapter};
use hba::protocol::Fault;
use peer_harness::RunningTarget;

const WORKERS: u64 = 8;

/// What one worker saw: commands completed, then the error that stopped it.
struct Outcome {
    completed: u64,
    error: PathError,
}

/// Writes and reads 64 KiB blocks in its own region until a command fails. A command that
/// neither completes nor fails within 5 s is lost: the test fails.
async fn worker(path: Arc<dyn DataPath>, lun: u64, id: u64) -> Outcome {
    let data = random_data(64 << 10, id + 1);
    let mut completed = 0;
    loop {
        let lba = id * 8192 + (completed % 64) * 128;
        let cmd = if completed % 2 == 0 {
            write16(lun, lba, data.clone())
        } else {
            read16(lun, lba, 64 << 10)
        };
        match tokio::time::timeout(Duration::from_secs(5), path.submit(cmd)).await {
            Ok(Ok(_)) => completed += 1,
            Ok(Err(error)) => return Outcome { completed, error },
            Err(_) => panic!("worker {id}: a command neither completed nor failed within 5 s"),
        }
    }
}

/// Health Failed, and how long after `since` it turned.
async fn wait_failed(adapter: &HbaAdapter, since: Instant) -> (String, Duration) {
    let mut health = adapter.watch_health();
    let state = tokio::time::timeout(
        Duration::from_secs(5),
        health.wait_for(|h| matches!(h, AdapterHealth::Failed(_))),
    )
    .await
    .expect("the adapter's failure was not detected within 5 s")
    .expect("health channel")
    .clone();
    let AdapterHealth::Failed(why) = state else {
        unreachable!()
    };
    (why, since.elapsed())
}

struct Loaded {
    adapter: Arc<HbaAdapter>,
    path: Arc<dyn DataPath>,
    client: datapath::InitiatorClient,
    lun: u64,
    workers: Vec<tokio::task::JoinHandle<Outcome>>,
    base: u64,
}

async fn start_load(target: &RunningTarget, hba: &Hba) -> Loaded {
    let adapter = HbaAdapter::connect(&hba.name, &hba.socket).await.unwrap();
    let client = client_for(target, "faulty");
    let path = adapter.open(&client, None).await.unwrap();
    let lun = lun_of(target, 0);
    ready(path.as_ref(), lun).await;
    let base = path.stats().commands;
    let workers = (0..WORKERS)
        .map(|id| tokio::spawn(worker(path.clone(), lun, id)))
        .collect();
    // Load for a while, so that commands are in flight when the fault comes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    Loaded {
        adapter,
        path,
        client,
        lun,
        workers,
        base,
    }
}

/// Every worker stopped with PathFailed; the counters add up (nothing completed twice).
async fn check_outcomes(l: &mut Loaded) {
    let mut completed = 0;
    for w in l.workers.drain(..) {
        let o = tokio::time::timeout(Duration::from_secs(5), w)
            .await
            .expect("worker stuck")
            .expect("worker panicked");
        assert!(
            matches!(o.error, PathError::PathFailed(_)),
            "in-flight command failed with {:?}, not PathFailed",
            o.error
        );
        assert!(o.error.is_path_failure());
        completed += o.completed;
    }
    assert!(completed > 0, "no load ran before the fault");
    let stats = l.path.stats();
    assert_eq!(
        stats.commands - l.base,
        completed,
        "completions counted by the path differ from those seen: {stats:?}"
    );
    assert_eq!(
        stats.errors, WORKERS,
        "each worker's last command (in flight, or submitted after the fault) fails once: {stats:?}"
    );
    // New commands fail the same way, at once.
    let started = Instant::now();
    let err = l
        .path
        .submit(read16(l.lun, 0, 4096))
        .await
        .expect_err("a failed path completes nothing");
    assert!(matches!(err, PathError::PathFailed(_)), "{err:?}");
    assert!(started.elapsed() < Duration::from_millis(100));
    assert!(matches!(l.path.health(), Health::Failed(_)));
    assert!(matches!(
        l.adapter.open(&l.client, None).await,
        Err(PathError::PathFailed(_))
    ));
    eprintln!("{completed} commands completed before the fault, {WORKERS} failed with PathFailed");
}

/// After the adapter failed, the VM's identity logs in on the software path and works
/// undisturbed: the adapter's VF no longer holds (or takes back) the session.
async fn software_path_takes_over(
    target: &RunningTarget,
    l: &Loaded,
    during: impl std::future::Future<Output = ()>,
) {
    let software = SoftwareAdapter::new()
        .open(&l.client, None)
        .await
        .expect("the VM's identity logs in on the software path");
    let lun = l.lun;
    let io = {
        let p = software.clone();
        tokio::spawn(async move {
            let until = Instant::now() + Duration::from_millis(1500);
            let mut n = 0u64;
            while Instant::now() < until {
                let data = random_data(4096, n);
                good(p.as_ref(), write16(lun, 100_000 + n % 64 * 8, data))
                    .await
                    .expect("software path write");
                n += 1;
            }
            n
        })
    };
    during.await;
    let n = io.await.unwrap();
    assert!(n > 0);
    let stats = software.stats();
    assert_eq!(
        stats.recoveries, 0,
        "the software path's session was taken away (by the adapter's VF?)"
    );
    software.close().await.unwrap();
    let _ = target;
}

#[test]
fn crash_under_load() {
    let target = start_target(&viscsi_target(), "iqn.2024-01.test.hba:crash");
    let mut hba = Hba::start("hba0", 2);
    runtime().block_on(async {
        let mut l = start_load(&target, &hba).await;
        let at = Instant::now();
        inject_fault(&hba.socket, Fault::Crash).await.unwrap();
        let (why, after) = wait_failed(&l.adapter, at).await;
        eprintln!("crash detected after {after:?}: {why}");
        assert!(after < Duration::from_secs(1), "{after:?}");
        assert!(why.contains("gone") || why.contains("VF"), "{why}");
        check_outcomes(&mut l).await;
        software_path_takes_over(&target, &l, async {}).await;
    });
    let status = hba
        .daemon
        .wait_timeout(Duration::from_secs(5))
        .expect("the adapter exited");
    assert_eq!(status.code(), Some(101), "{status:?}");
}

#[test]
fn hang_under_load_then_recover() {
    let target = start_target(&viscsi_target(), "iqn.2024-01.test.hba:hang");
    let hba = Hba::start("hba0", 2);
    runtime().block_on(async {
        let mut l = start_load(&target, &hba).await;
        let at = Instant::now();
        inject_fault(&hba.socket, Fault::Hang).await.unwrap();
        let (why, after) = wait_failed(&l.adapter, at).await;
        eprintln!("hang detected after {after:?}: {why}");
        assert!(after < Duration::from_millis(1200), "{after:?}");
        assert!(why.contains("hung"), "{why}");
        check_outcomes(&mut l).await;
        // A hung adapter answers no status.
        assert!(adapter_status(&hba.socket).await.is_err());
        // The VM moves to the software path; the adapter recovers meanwhile and must not
        // take the session back.
        let socket = hba.socket.clone();
        software_path_takes_over(&target, &l, async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            inject_fault(&socket, Fault::Recover).await.unwrap();
        })
        .await;
        // The failed driver's VFs were freed; the adapter serves a new driver.
        let status = adapter_status(&hba.socket).await.unwrap();
        assert_eq!(status.adapter.vfs_in_use, 0, "{status:?}");
        let again = HbaAdapter::connect("hba0", &hba.socket).await.unwrap();
        let path = again
            .open(&client_for(&target, "after"), None)
            .await
            .unwrap();
        ready(path.as_ref(), l.lun).await;
        good(path.as_ref(), read16(l.lun, 0, 4096)).await.unwrap();
        path.close().await.unwrap();
    });
    assert!(hba.log().contains("fault injected"), "{}", hba.log());
}

#[test]
fn link_down_under_load_then_up() {
    let target = start_target(&viscsi_target(), "iqn.2024-01.test.hba:link");
    let hba = Hba::start("hba0", 2);
    runtime().block_on(async {
        let mut l = start_load(&target, &hba).await;
        let at = Instant::now();
        inject_fault(&hba.socket, Fault::LinkDown).await.unwrap();
        let (why, after) = wait_failed(&l.adapter, at).await;
        eprintln!("link down detected after {after:?}: {why}");
        assert!(after < Duration::from_secs(1), "{after:?}");
        assert!(why.contains("link down"), "{why}");
        check_outcomes(&mut l).await;
        // While the link is down: a new driver connects (the adapter is alive) but cannot
        // reach the portal or bring up a VF.
        let probe = HbaAdapter::connect("hba0", &hba.socket).await.unwrap();
        assert!(!probe.reaches(&target.portal()).await);
        assert!(!probe.info().details.contains(&("link".into(), "up".into())));
        let err = probe
            .open(&client_for(&target, "down"), None)
            .await
            .err()
            .expect("no login while the link is down");
        assert!(matches!(err, PathError::PathFailed(_)), "{err:?}");
        // The VM moves to the software path while the link comes back.
        let socket = hba.socket.clone();
        software_path_takes_over(&target, &l, async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            inject_fault(&socket, Fault::LinkUp).await.unwrap();
        })
        .await;
        assert!(probe.reaches(&target.portal()).await);
        let path = probe.open(&client_for(&target, "up"), None).await.unwrap();
        ready(path.as_ref(), l.lun).await;
        good(path.as_ref(), read16(l.lun, 0, 4096)).await.unwrap();
        path.close().await.unwrap();
    });
}
