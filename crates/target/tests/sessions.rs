//! Session placement over real TCP: reinstatement of an initiator port ends the older session,
//! and a different ISID gets a session of its own. The initiator side is hand-built PDUs.

use std::time::Duration;

use bytes::BytesMut;
use iscsi_wire::*;
use target::{LunConfig, Target, TargetConfig, TargetDef};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const IQN: &str = "iqn.2024-01.org.viscsi:sessions";

async fn start() -> target::RunningTarget {
    let config = TargetConfig {
        portals: vec!["127.0.0.1:0".parse().unwrap()],
        targets: vec![TargetDef {
            iqn: IQN.into(),
            alias: None,
            luns: vec![LunConfig::from_flag("0=mem:16MiB").unwrap()],
            chap: Vec::new(),
            mutual_chap: None,
            allowed_initiators: Vec::new(),
        }],
        discovery_chap: Vec::new(),
        limits: Default::default(),
    };
    Target::build(config).unwrap().serve().await.unwrap()
}

/// Logs in straight to full feature phase; returns the stream and the TSIH.
async fn login(addr: std::net::SocketAddr, isid: u64) -> (TcpStream, u16) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let text = b"InitiatorName=iqn.2024-01.org.viscsi:tester\0TargetName=iqn.2024-01.org.viscsi:sessions\0SessionType=Normal\0";
    let req = LoginRequest {
        transit: true,
        csg: 1,
        nsg: 3,
        isid: Isid(isid),
        itt: 1,
        cmd_sn: 1,
        ..Default::default()
    };
    let mut out = Vec::new();
    encode_pdu(&req.to_bhs(), &[], text, FrameLimits::default(), &mut out);
    s.write_all(&out).await.unwrap();
    let pdu = read_pdu(&mut s).await.expect("a login response");
    let Ok(Header::LoginResponse(resp)) = Header::parse(&pdu.bhs) else {
        panic!("not a login response")
    };
    assert_eq!(resp.status, LoginStatus::SUCCESS);
    assert!(resp.transit && resp.nsg == 3);
    (s, resp.tsih)
}

async fn read_pdu(s: &mut TcpStream) -> Option<RawPdu> {
    let mut dec = FrameDecoder::new(FrameLimits {
        max_recv_data_segment_len: 1 << 24,
        ..Default::default()
    });
    let mut buf = BytesMut::new();
    loop {
        if let Some(item) = dec.decode(&mut buf).unwrap() {
            return item.ok();
        }
        let n = tokio::time::timeout(Duration::from_secs(5), s.read_buf(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
    }
}

#[tokio::test]
async fn same_initiator_port_reinstates_and_ends_the_old_session() {
    let target = start().await;
    let addr = target.local_addrs()[0];
    let (mut first, tsih1) = login(addr, 0x0002_3d00_0001).await;
    let (mut other, tsih_other) = login(addr, 0x0002_3d00_0002).await;
    let (_second, tsih2) = login(addr, 0x0002_3d00_0001).await;
    assert_ne!(tsih1, 0);
    assert_ne!(tsih1, tsih2);
    assert_ne!(tsih_other, tsih2);
    // The reinstated session's connection is closed by the target.
    assert!(
        read_pdu(&mut first).await.is_none(),
        "the old session must end"
    );
    // A different ISID is another initiator port: its session lives on and answers a NOP-Out.
    let nop = NopOut {
        immediate: true,
        itt: 9,
        ttt: RESERVED_TAG,
        cmd_sn: 1,
        ..Default::default()
    };
    let mut out = Vec::new();
    encode_pdu(&nop.to_bhs(), &[], b"", FrameLimits::default(), &mut out);
    other.write_all(&out).await.unwrap();
    let reply = read_pdu(&mut other).await.expect("NOP-In");
    assert_eq!(reply.bhs.opcode(), Opcode::NOP_IN);
    target.shutdown().await;
}
