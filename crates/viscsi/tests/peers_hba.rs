//! The reference offload adapter as a separate process (`viscsi hba serve`) with its driver:
//! verified I/O through a VF against the viscsi target and tgtd, INQUIRY equal to the
//! software path's, two VMs on two VFs, capacity and authentication errors, garbage on the
//! sockets in both directions.

#[path = "hba_common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use common::*;
use datapath::software::SoftwareAdapter;
use datapath::{
    Adapter, AdapterHealth, AdapterKind, ChapSettings, DataPath, Health, PathError, Secret,
    TmfFunction,
};
use hba::driver::{adapter_status, DriverError, HbaAdapter};
use hba::protocol::{
    write_message, ControlRequest, FrameKind, FrameReader, Hello, Message, Reply, Request, VfState,
};
use peer_harness::{RunningTarget, TargetConfig, TargetKind, TempDir};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Mutex;

/// Writes random data of several sizes through a VF, reads it back through the VF and
/// through a direct software session, and compares.
async fn verified_io(target: &RunningTarget, hba: &Hba) {
    let adapter = HbaAdapter::connect(&hba.name, &hba.socket)
        .await
        .expect("connect");
    let client = client_for(target, "verified");
    let path = adapter.open(&client, None).await.expect("open");
    let info = path.info();
    assert_eq!(info.kind, AdapterKind::Offload);
    assert_eq!(info.adapter, hba.name);
    assert_eq!(info.vf, Some(0));
    assert_eq!(info.portal, target.portal());
    assert_eq!(path.health(), Health::Up);
    assert!(
        hba.log().contains("shm=true"),
        "the queue has no shared memory:\n{}",
        hba.log()
    );
    let lun = lun_of(target, 0);
    ready(path.as_ref(), lun).await;
    let base = path.stats().commands;
    let sizes = [512usize, 4096, 65536, 300 * 512, 1 << 20, 4 << 20];
    let mut lba = 8u64;
    let mut written = Vec::new();
    for (i, &size) in sizes.iter().enumerate() {
        let data = random_data(size, i as u64 + 1);
        good(path.as_ref(), write16(lun, lba, data.clone()))
            .await
            .expect("write");
        let back = good(path.as_ref(), read16(lun, lba, size as u32))
            .await
            .expect("read");
        assert!(
            back == data,
            "{size} bytes at LBA {lba} read back differently"
        );
        written.push((lba, data));
        lba += size as u64 / 512 + 8;
    }
    // Many at once, out of order.
    let futures: Vec<_> = written
        .iter()
        .map(|(lba, data)| {
            let p = path.clone();
            let (lba, data) = (*lba, data.clone());
            tokio::spawn(async move {
                let back = good(p.as_ref(), read16(lun, lba, data.len() as u32))
                    .await
                    .expect("read");
                assert!(back == data, "concurrent read at LBA {lba} differs");
            })
        })
        .collect();
    for f in futures {
        f.await.expect("reader");
    }
    let stats = path.stats();
    assert_eq!(stats.errors, 0);
    assert_eq!(stats.commands - base, 3 * sizes.len() as u64, "{stats:?}");
    let total: usize = sizes.iter().sum();
    assert_eq!(stats.bytes_written, total as u64);
    assert_eq!(stats.bytes_read, 2 * total as u64);

    // The same blocks as another initiator sees them.
    let software = SoftwareAdapter::new();
    let direct = software
        .open(&client_for(target, "checker"), None)
        .await
        .expect("software path");
    for (lba, data) in &written {
        let back = good(direct.as_ref(), read16(lun, *lba, data.len() as u32))
            .await
            .expect("direct read");
        assert!(back == *data, "LBA {lba}: the target holds other data");
    }
    direct.close().await.expect("close direct");

    let status = adapter_status(&hba.socket).await.expect("status");
    let vf = &status.vfs[0];
    assert_eq!(vf.state, VfState::LoggedIn);
    assert_eq!(vf.owner.as_deref(), Some(client.initiator_name.as_str()));
    assert_eq!(vf.target.as_deref(), Some(target.iqn()));
    assert!(vf.queue_open);
    assert_eq!(status.adapter.vfs_in_use, 1);

    path.close().await.expect("close");
    assert!(matches!(
        path.submit(read16(lun, 0, 512)).await,
        Err(PathError::Closed)
    ));
    let status = adapter_status(&hba.socket).await.expect("status");
    assert_eq!(status.adapter.vfs_in_use, 0, "{status:?}");
    assert_eq!(status.vfs[0].state, VfState::Free);
    assert_eq!(*adapter.watch_health().borrow(), AdapterHealth::Ok);
}

#[test]
fn verified_io_against_viscsi_target() {
    let target = start_target(&viscsi_target(), "iqn.2024-01.test.hba:verified");
    let hba = Hba::start("hba0", 2);
    runtime().block_on(verified_io(&target, &hba));
}

#[test]
fn verified_io_against_tgtd() {
    let target = start_target(&TargetKind::Tgtd, "iqn.2024-01.test.hba:tgtd");
    let hba = Hba::start("hba0", 2);
    runtime().block_on(verified_io(&target, &hba));
}

#[test]
fn inquiry_through_a_vf_equals_the_software_path() {
    let target = start_target(&viscsi_target(), "iqn.2024-01.test.hba:inquiry");
    let hba = Hba::start("hba0", 2);
    runtime().block_on(async {
        let adapter = HbaAdapter::connect("hba0", &hba.socket).await.unwrap();
        let lun = lun_of(&target, 0);
        let offload = adapter.open(&client_for(&target, "a"), None).await.unwrap();
        let software = SoftwareAdapter::new()
            .open(&client_for(&target, "b"), None)
            .await
            .unwrap();
        let via_vf = good(offload.as_ref(), inquiry_cmd(lun)).await.unwrap();
        let direct = good(software.as_ref(), inquiry_cmd(lun)).await.unwrap();
        assert!(via_vf.len() >= 36);
        assert_eq!(via_vf, direct);
        // VPD page 0x83 (device identification) too.
        let mut vpd = inquiry_cmd(lun);
        vpd.cdb = bytes::Bytes::from_static(&[0x12, 1, 0x83, 0x10, 0, 0]);
        vpd.read_len = 4096;
        assert_eq!(
            good(offload.as_ref(), vpd.clone()).await.unwrap(),
            good(software.as_ref(), vpd).await.unwrap()
        );
        // Task management goes through too.
        offload
            .task_management(TmfFunction::LOGICAL_UNIT_RESET, u64::from(target.lun_id(0)))
            .await
            .expect("LUN reset");
        offload.close().await.unwrap();
        software.close().await.unwrap();
    });
}

#[test]
fn two_vms_on_two_vfs_concurrently() {
    let target = start_target(&viscsi_target(), "iqn.2024-01.test.hba:two");
    let hba = Hba::start("hba0", 4);
    runtime().block_on(async {
        let adapter = HbaAdapter::connect("hba0", &hba.socket).await.unwrap();
        let lun = lun_of(&target, 0);
        let a = adapter
            .open(&client_for(&target, "vm-a"), None)
            .await
            .unwrap();
        let b = adapter
            .open(&client_for(&target, "vm-b"), None)
            .await
            .unwrap();
        assert_ne!(a.info().vf, b.info().vf);
        assert_ne!(a.info().isid, b.info().isid);
        ready(a.as_ref(), lun).await;
        ready(b.as_ref(), lun).await;
        let (base_a, base_b) = (a.stats().commands, b.stats().commands);
        assert_eq!(adapter.info().vfs_total, Some(4));
        let run = |path: Arc<dyn DataPath>, base: u64, seed: u64| {
            tokio::spawn(async move {
                let mut tasks = Vec::new();
                for i in 0..16u64 {
                    let p = path.clone();
                    tasks.push(tokio::spawn(async move {
                        let lba = base + i * 256;
                        let data = random_data(64 << 10, seed * 100 + i);
                        for _ in 0..8 {
                            good(p.as_ref(), write16(lun, lba, data.clone()))
                                .await
                                .unwrap();
                            let back = good(p.as_ref(), read16(lun, lba, 64 << 10)).await.unwrap();
                            assert!(back == data, "LBA {lba} differs");
                        }
                    }));
                }
                for t in tasks {
                    t.await.unwrap();
                }
            })
        };
        let (ra, rb) = tokio::join!(run(a.clone(), 0, 1), run(b.clone(), 16384, 2));
        ra.unwrap();
        rb.unwrap();
        assert_eq!(a.stats().commands - base_a, 16 * 8 * 2);
        assert_eq!(b.stats().commands - base_b, 16 * 8 * 2);
        let status = adapter.status().await.unwrap();
        let busy: Vec<_> = status
            .vfs
            .iter()
            .filter(|v| v.state == VfState::LoggedIn)
            .collect();
        assert_eq!(busy.len(), 2);
        let by_vf = |p: &Arc<dyn DataPath>| {
            let vf = p.info().vf.unwrap();
            busy.iter().find(|v| v.index == vf).unwrap().stats.commands
        };
        assert_eq!(by_vf(&a), a.stats().commands);
        assert_eq!(by_vf(&b), b.stats().commands);
        a.close().await.unwrap();
        b.close().await.unwrap();
    });
}

#[test]
fn no_free_vf_is_no_capacity_and_a_closed_path_frees_its_vf() {
    let target = start_target(&viscsi_target(), "iqn.2024-01.test.hba:capacity");
    let hba = Hba::start("hba0", 1);
    runtime().block_on(async {
        let adapter = HbaAdapter::connect("hba0", &hba.socket).await.unwrap();
        let first = adapter
            .open(&client_for(&target, "one"), None)
            .await
            .unwrap();
        let err = adapter
            .open(&client_for(&target, "two"), None)
            .await
            .err()
            .expect("no capacity");
        assert!(
            matches!(err, PathError::NoCapacity(ref n) if n == "hba0"),
            "{err}"
        );
        assert_eq!(err.to_string(), "no free virtual function on hba0");
        first.close().await.unwrap();
        let second = adapter
            .open(&client_for(&target, "two"), None)
            .await
            .expect("the VF is free again");
        // A path dropped without close gives its VF back too.
        drop(second);
        let mut freed = false;
        for _ in 0..100 {
            if adapter.status().await.unwrap().adapter.vfs_in_use == 0 {
                freed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(freed, "dropped path kept its VF");
    });
}

#[test]
fn unreachable_portal_is_unreachable_and_probe_says_so() {
    let target = start_target(&viscsi_target(), "iqn.2024-01.test.hba:unreach");
    let hba = Hba::start("hba0", 1);
    runtime().block_on(async {
        let adapter = HbaAdapter::connect("hba0", &hba.socket).await.unwrap();
        assert!(adapter.reaches(&target.portal()).await);
        // A port nobody listens on.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        assert!(!adapter.reaches(&closed).await);
        let mut client = client_for(&target, "lost");
        client.portals = vec![closed];
        let err = adapter
            .open(&client, None)
            .await
            .err()
            .expect("unreachable");
        assert!(matches!(err, PathError::Unreachable(_)), "{err}");
        assert_eq!(adapter.status().await.unwrap().adapter.vfs_in_use, 0);
    });
}

#[test]
fn chap_secrets_are_resolved_on_the_host_and_a_wrong_one_is_auth() {
    let target = RunningTarget::start(
        &viscsi_target(),
        TargetConfig::new("iqn.2024-01.test.hba:chap")
            .mem_lun(16 << 20)
            .chap("vmuser", "right-secret-123"),
    );
    let hba = Hba::start("hba0", 2);
    let dir = TempDir::new("hba-chap");
    let secret_file = dir.join("secret");
    std::fs::write(&secret_file, "right-secret-123\n").unwrap();
    runtime().block_on(async {
        let adapter = HbaAdapter::connect("hba0", &hba.socket).await.unwrap();
        let mut client = client_for(&target, "chap");
        client.chap = Some(ChapSettings {
            user: "vmuser".into(),
            secret: Secret::Value("wrong-secret-456".into()),
            target_user: None,
            target_secret: None,
        });
        let err = adapter.open(&client, None).await.err().expect("refused");
        assert!(matches!(err, PathError::Auth { .. }), "{err}");
        assert!(!err.to_string().contains("wrong-secret"), "{err}");
        let status = adapter.status().await.unwrap();
        assert_eq!(status.adapter.vfs_in_use, 0, "the VF was not freed");
        assert!(status.vfs.iter().all(|v| v.state == VfState::Free));

        // The right secret, from a file only the host reads.
        client.chap.as_mut().unwrap().secret = Secret::File(secret_file.clone());
        let path = adapter.open(&client, None).await.expect("login with CHAP");
        let lun = lun_of(&target, 0);
        let data = random_data(8192, 7);
        good(path.as_ref(), write16(lun, 0, data.clone()))
            .await
            .unwrap();
        assert_eq!(
            good(path.as_ref(), read16(lun, 0, 8192)).await.unwrap(),
            data
        );
        path.close().await.unwrap();
    });
    assert!(!hba.log().contains("right-secret"), "secret in the log");
}

/// A listener in the test that says `junk` to whoever connects.
async fn fake_adapter(junk: Vec<u8>) -> (TempDir, std::path::PathBuf) {
    let dir = TempDir::new("hba-fake");
    let socket = dir.join("fake.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let junk = junk.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(&junk).await;
                // Keep the connection open, silent.
                tokio::time::sleep(Duration::from_secs(30)).await;
            });
        }
    });
    (dir, socket)
}

#[test]
fn a_socket_that_speaks_garbage_is_a_clear_error() {
    runtime().block_on(async {
        // Text.
        let (_d, socket) = fake_adapter(b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec()).await;
        let err = HbaAdapter::connect("x", &socket).await.err().expect("garbage");
        assert!(matches!(err, DriverError::NotAnAdapter { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("does not speak the viscsi adapter protocol"), "{msg}");
        assert!(!msg.contains('\n'));
        // A frame of an unknown kind, then an oversized one.
        let (_d, socket) = fake_adapter(vec![0, 0, 0, 1, 0x99]).await;
        let err = HbaAdapter::connect("x", &socket).await.err().expect("garbage");
        assert!(err.to_string().contains("unknown frame kind 0x99"), "{err}");
        let (_d, socket) = fake_adapter(vec![0x7f, 0xff, 0xff, 0xff, 1]).await;
        let err = HbaAdapter::connect("x", &socket).await.err().expect("garbage");
        assert!(err.to_string().contains("over the limit"), "{err}");
        // Valid frame, JSON of something else.
        let mut frame = BytesMut::new();
        let body = br#"{"id":0,"result":{"Ok":{"reply":"hello","protocol":99,"adapter":{"name":"x","model":"m","firmware":"f","protocol":99,"vfs_total":1,"vfs_in_use":0,"link_up":true}}}}"#;
        frame.put_u32(body.len() as u32 + 1);
        frame.put_u8(FrameKind::CONTROL_REPLY.0);
        frame.extend_from_slice(body);
        let (_d, socket) = fake_adapter(frame.to_vec()).await;
        let err = HbaAdapter::connect("x", &socket).await.err().expect("version");
        assert!(matches!(err, DriverError::Version { .. }), "{err}");
        assert!(err.to_string().contains("protocol version 99"), "{err}");
        // Silence: a timeout, not a hang.
        let (_d, socket) = fake_adapter(Vec::new()).await;
        let started = std::time::Instant::now();
        let err = HbaAdapter::connect("x", &socket).await.err().expect("silent");
        assert!(matches!(err, DriverError::Timeout { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
        // Nobody there.
        let err = HbaAdapter::connect("x", std::path::Path::new("/nonexistent/hba.sock"))
            .await
            .err()
            .expect("absent");
        assert!(matches!(err, DriverError::Connect { .. }), "{err}");
    });
}

#[test]
fn bad_frames_to_the_adapter_drop_only_that_connection() {
    let target = start_target(&viscsi_target(), "iqn.2024-01.test.hba:garbage");
    let hba = Hba::start("hba0", 2);
    runtime().block_on(async {
        let adapter = HbaAdapter::connect("hba0", &hba.socket).await.unwrap();
        let path = adapter
            .open(&client_for(&target, "survivor"), None)
            .await
            .unwrap();
        let lun = lun_of(&target, 0);
        let junk: [&[u8]; 5] = [
            // Oversized length.
            &[0xff, 0xff, 0xff, 0xff, 0x01],
            // Unknown kind.
            &[0, 0, 0, 2, 0x42, 0],
            // A hello that is not JSON.
            &[0, 0, 0, 4, 0x01, b'{', b'x', b'}'],
            // A truncated frame, then EOF.
            &[0, 0, 1, 0, 0x01, b'{'],
            // A queue message before the hello.
            &[0, 0, 0, 1, 0x10],
        ];
        for bytes in junk {
            let mut s = tokio::net::UnixStream::connect(&hba.socket).await.unwrap();
            s.write_all(bytes).await.unwrap();
            s.shutdown().await.unwrap();
            let mut rest = Vec::new();
            let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
                .await
                .expect("the adapter closes a connection that breaks the protocol");
            assert!(n.is_ok());
        }
        // A queue that turns to garbage after its hello (VF 1, set up by hand).
        let (mut control, control_reader) = raw_connection(&hba.socket, None).await;
        let client = client_for(&target, "victim");
        let vf = match raw_request(
            &mut control,
            &control_reader,
            1,
            Request::AllocVf {
                owner: "victim".into(),
            },
        )
        .await
        {
            Reply::Vf { vf } => vf,
            other => panic!("{other:?}"),
        };
        raw_request(
            &mut control,
            &control_reader,
            2,
            Request::ProgramVf {
                vf,
                client: Box::new(client),
            },
        )
        .await;
        for bytes in [
            &[0xffu8, 0xff, 0xff, 0xff][..],
            &[0, 0, 0, 30, 0x10, 1, 2, 3][..],
        ] {
            let (mut queue, mut reader) = raw_connection(&hba.socket, Some(vf)).await;
            queue.write_all(bytes).await.unwrap();
            queue.shutdown().await.unwrap();
            let end = tokio::time::timeout(Duration::from_secs(5), reader.lock().await.next())
                .await
                .expect("the adapter closes a queue that breaks the protocol");
            assert!(matches!(end, Ok(None)), "{end:?}");
            let _ = &mut reader;
            // The VF takes a new queue.
            let mut open = false;
            for _ in 0..100 {
                let status = adapter.status().await.unwrap();
                if !status.vfs[vf as usize].queue_open {
                    open = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(open, "the queue stays attached");
        }
        // The adapter, the first driver and its path are fine.
        assert_eq!(*adapter.watch_health().borrow(), AdapterHealth::Ok);
        good(path.as_ref(), write16(lun, 0, random_data(4096, 1)))
            .await
            .unwrap();
        let status = adapter.status().await.unwrap();
        assert_eq!(status.vfs[0].state, VfState::LoggedIn);
        assert!(
            hba.log().contains("dropping the connection"),
            "{}",
            hba.log()
        );
        path.close().await.unwrap();
    });
}

type SharedReader = Arc<Mutex<FrameReader<OwnedReadHalf>>>;

/// A connection to the adapter after its hello, spoken by hand.
async fn raw_connection(
    socket: &std::path::Path,
    queue: Option<u32>,
) -> (OwnedWriteHalf, SharedReader) {
    let s = tokio::net::UnixStream::connect(socket).await.unwrap();
    let (r, w) = s.into_split();
    let reader = Arc::new(Mutex::new(FrameReader::new(r)));
    let mut w = w;
    let hello = Request::Hello(Hello::new("test", queue));
    raw_request(&mut w, &reader, 0, hello).await;
    (w, reader)
}

async fn raw_request(
    w: &mut OwnedWriteHalf,
    reader: &SharedReader,
    id: u64,
    request: Request,
) -> Reply {
    write_message(w, &Message::Request(ControlRequest { id, request }))
        .await
        .unwrap();
    loop {
        match reader.lock().await.next_message().await.unwrap() {
            Some(Message::Reply(r)) if r.id == id => return r.result.expect("request refused"),
            Some(Message::Event(_)) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}
