//! The target role as a conversation in memory: PDUs in, PDUs and events out.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use iscsi_wire::*;

use super::*;
use crate::keys::{self, NegotiationConfig};

fn portal() -> Arc<PortalConfig> {
    Arc::new(PortalConfig {
        targets: vec![TargetEntry {
            name: "iqn.2024-01.test:disk".into(),
            alias: None,
            auth: AuthPolicy::default(),
            allowed_initiators: Vec::new(),
        }],
        discovery_auth: AuthPolicy::default(),
        negotiation: NegotiationConfig::default(),
        portal_group_tag: 1,
        addresses: vec!["127.0.0.1:3260,1".into()],
        command_window: 32,
        nop_in_interval: Some(Duration::from_secs(5)),
        nop_in_timeout: Duration::from_secs(5),
    })
}

fn pdu(bhs: Bhs, data: &[u8]) -> Result<RawPdu, PduError> {
    let mut bhs = bhs;
    bhs.set_data_segment_len(data.len() as u32);
    Ok(RawPdu {
        bhs,
        ahs: Bytes::new(),
        data: Bytes::copy_from_slice(data),
    })
}

fn text(pairs: &[(&str, &str)]) -> Vec<u8> {
    keys::encode_text(pairs)
}

fn sent(conn: &mut TargetConnection) -> Vec<(Header, Bytes)> {
    std::iter::from_fn(|| conn.poll_transmit())
        .map(|o| (Header::parse(&o.bhs).unwrap(), o.data))
        .collect()
}

/// Logs in (security stage skipped, straight to operational and full feature) and returns the
/// connection in full feature phase.
fn logged_in(extra: &[(&str, &str)]) -> TargetConnection {
    let mut conn = TargetConnection::new(portal());
    let now = Instant::now();
    let mut offers = vec![
        ("InitiatorName", "iqn.2024-01.test:init"),
        ("TargetName", "iqn.2024-01.test:disk"),
        ("SessionType", "Normal"),
        ("AuthMethod", "None"),
    ];
    let login = LoginRequest {
        transit: true,
        csg: 0,
        nsg: 1,
        isid: Isid(0x23d000001),
        itt: 1,
        cid: 1,
        cmd_sn: 10,
        ..Default::default()
    };
    conn.handle_pdu(pdu(login.to_bhs(), &text(&offers)), now);
    let out = sent(&mut conn);
    let Header::LoginResponse(r) = &out[0].0 else {
        panic!("expected a login response, got {out:?}")
    };
    assert_eq!(r.status, LoginStatus::SUCCESS);
    assert!(r.transit);
    offers = extra.to_vec();
    let login = LoginRequest {
        transit: true,
        csg: 1,
        nsg: 3,
        isid: Isid(0x23d000001),
        itt: 1,
        cid: 1,
        cmd_sn: 10,
        exp_stat_sn: 1,
        ..Default::default()
    };
    conn.handle_pdu(pdu(login.to_bhs(), &text(&offers)), now);
    let Some(Event::SessionRequested(req)) = conn.poll_event() else {
        panic!("no session request")
    };
    assert_eq!(req.initiator_name, "iqn.2024-01.test:init");
    conn.accept_session(7);
    let out = sent(&mut conn);
    let Header::LoginResponse(r) = &out[0].0 else {
        panic!()
    };
    assert_eq!((r.status, r.tsih, r.nsg), (LoginStatus::SUCCESS, 7, 3));
    assert!(matches!(conn.poll_event(), Some(Event::FullFeature { .. })));
    conn
}

fn read10(itt: u32, cmd_sn: u32, len: u32) -> Bhs {
    let mut cdb = [0u8; 16];
    cdb[0] = 0x28;
    cdb[8] = (len / 512) as u8;
    ScsiCommand {
        final_: true,
        read: true,
        itt,
        expected_data_transfer_length: len,
        cmd_sn,
        cdb,
        ..Default::default()
    }
    .to_bhs()
}

#[test]
fn read_completes_with_phase_collapsed_status() {
    let mut conn = logged_in(&[]);
    conn.handle_pdu(pdu(read10(5, 10, 4096), &[]), Instant::now());
    let Some(Event::Execute(cmd)) = conn.poll_event() else {
        panic!("no execute")
    };
    assert_eq!(cmd.cdb[0], 0x28);
    conn.complete(5, Status::GOOD, &[], Bytes::from(vec![7u8; 4096]), None);
    let out = sent(&mut conn);
    let Header::DataIn(last) = &out.last().unwrap().0 else {
        panic!()
    };
    assert_eq!(last.status, Some(Status::GOOD));
    assert!(last.final_);
    let total: usize = out.iter().map(|(_, d)| d.len()).sum();
    assert_eq!(total, 4096);
}

#[test]
fn short_read_reports_underflow() {
    let mut conn = logged_in(&[]);
    conn.handle_pdu(pdu(read10(5, 10, 4096), &[]), Instant::now());
    let _ = conn.poll_event();
    conn.complete(5, Status::GOOD, &[], Bytes::from(vec![1u8; 512]), None);
    let out = sent(&mut conn);
    let Header::DataIn(last) = &out.last().unwrap().0 else {
        panic!()
    };
    assert!(last.underflow);
    assert_eq!(last.residual_count, 3584);
}

#[test]
fn write_is_solicited_with_r2t() {
    let mut conn = logged_in(&[("InitialR2T", "Yes"), ("ImmediateData", "No")]);
    let mut cdb = [0u8; 16];
    cdb[0] = 0x2a;
    cdb[8] = 16;
    let cmd = ScsiCommand {
        final_: true,
        write: true,
        itt: 9,
        expected_data_transfer_length: 8192,
        cmd_sn: 10,
        cdb,
        ..Default::default()
    };
    conn.handle_pdu(pdu(cmd.to_bhs(), &[]), Instant::now());
    let out = sent(&mut conn);
    let Header::R2t(r2t) = &out[0].0 else {
        panic!("expected R2T, got {out:?}")
    };
    assert_eq!(
        (r2t.buffer_offset, r2t.desired_data_transfer_length),
        (0, 8192)
    );
    for (i, chunk) in [vec![1u8; 4096], vec![2u8; 4096]].iter().enumerate() {
        let d = DataOut {
            final_: i == 1,
            itt: 9,
            ttt: r2t.ttt,
            data_sn: i as u32,
            buffer_offset: 4096 * i as u32,
            ..Default::default()
        };
        conn.handle_pdu(pdu(d.to_bhs(), chunk), Instant::now());
    }
    let Some(Event::Execute(cmd)) = conn.poll_event() else {
        panic!("no execute")
    };
    assert_eq!(cmd.data_out.len(), 8192);
    assert_eq!(cmd.data_out[4096], 2);
    conn.complete(9, Status::GOOD, &[], Bytes::new(), Some(8192));
    let out = sent(&mut conn);
    let Header::ScsiResponse(r) = &out[0].0 else {
        panic!()
    };
    assert_eq!(r.status, Status::GOOD);
    assert!(!r.underflow && !r.overflow);
}

#[test]
fn commands_are_delivered_in_cmd_sn_order_and_out_of_window_ignored() {
    let mut conn = logged_in(&[]);
    let now = Instant::now();
    conn.handle_pdu(pdu(read10(2, 11, 512), &[]), now);
    assert!(conn.poll_event().is_none(), "CmdSN 11 must wait for 10");
    conn.handle_pdu(pdu(read10(3, 500, 512), &[]), now);
    conn.handle_pdu(pdu(read10(1, 10, 512), &[]), now);
    let itts: Vec<u32> = std::iter::from_fn(|| conn.poll_event())
        .filter_map(|e| {
            if let Event::Execute(c) = e {
                Some(c.itt)
            } else {
                None
            }
        })
        .collect();
    assert_eq!(itts, vec![1, 2]);
}

#[test]
fn nop_ping_and_timeout() {
    let mut conn = logged_in(&[]);
    let t0 = Instant::now();
    conn.handle_pdu(
        pdu(
            NopOut {
                itt: 3,
                ttt: RESERVED_TAG,
                cmd_sn: 10,
                immediate: true,
                ..Default::default()
            }
            .to_bhs(),
            b"ping",
        ),
        t0,
    );
    let out = sent(&mut conn);
    let Header::NopIn(n) = &out[0].0 else {
        panic!()
    };
    assert_eq!((n.itt, &out[0].1[..]), (3, &b"ping"[..]));
    let deadline = conn.poll_timeout().unwrap();
    conn.handle_timeout(deadline);
    let out = sent(&mut conn);
    let Header::NopIn(ping) = &out[0].0 else {
        panic!()
    };
    assert_eq!(ping.itt, RESERVED_TAG);
    conn.handle_timeout(conn.poll_timeout().unwrap());
    assert!(matches!(conn.poll_event(), Some(Event::Close { .. })));
}

#[test]
fn unknown_target_fails_login() {
    let mut conn = TargetConnection::new(portal());
    let offers = text(&[
        ("InitiatorName", "iqn.x:y"),
        ("TargetName", "iqn.nope:none"),
    ]);
    let login = LoginRequest {
        transit: true,
        csg: 0,
        nsg: 1,
        itt: 1,
        ..Default::default()
    };
    conn.handle_pdu(pdu(login.to_bhs(), &offers), Instant::now());
    let out = sent(&mut conn);
    let Header::LoginResponse(r) = &out[0].0 else {
        panic!()
    };
    assert_eq!(r.status, LoginStatus::NOT_FOUND);
    assert!(matches!(conn.poll_event(), Some(Event::Close { .. })));
}

#[test]
fn logout_closes() {
    let mut conn = logged_in(&[]);
    conn.handle_pdu(
        pdu(
            LogoutRequest {
                itt: 4,
                cmd_sn: 10,
                immediate: true,
                ..Default::default()
            }
            .to_bhs(),
            &[],
        ),
        Instant::now(),
    );
    let out = sent(&mut conn);
    let Header::LogoutResponse(r) = &out[0].0 else {
        panic!()
    };
    assert_eq!(r.response, LogoutResponseCode::CLOSED_SUCCESSFULLY);
    assert!(matches!(conn.poll_event(), Some(Event::Close { .. })));
}

#[test]
fn unknown_opcode_is_rejected() {
    let mut conn = logged_in(&[]);
    let mut bhs = Bhs::default();
    bhs.0[0] = 0x1d;
    conn.handle_pdu(pdu(bhs, &[]), Instant::now());
    let out = sent(&mut conn);
    let Header::Reject(r) = &out[0].0 else {
        panic!()
    };
    assert_eq!(r.reason, RejectReason::COMMAND_NOT_SUPPORTED);
    assert_eq!(&out[0].1[..1], &[0x1d]);
}

#[test]
fn discovery_login_that_offers_chap_and_repeats_its_name() {
    // libiscsi's iscsi-ls with credentials against a discovery portal that needs none.
    let mut conn = TargetConnection::new(portal());
    let now = Instant::now();
    let offers = text(&[
        ("InitiatorName", "iqn.x:ls"),
        ("SessionType", "Discovery"),
        ("AuthMethod", "CHAP,None"),
    ]);
    let login = LoginRequest {
        transit: true,
        csg: 0,
        nsg: 1,
        itt: 1,
        ..Default::default()
    };
    conn.handle_pdu(pdu(login.to_bhs(), &offers), now);
    let out = sent(&mut conn);
    let Header::LoginResponse(r) = &out[0].0 else {
        panic!()
    };
    assert_eq!(r.status, LoginStatus::SUCCESS);
    let offers = text(&[
        ("InitiatorName", "iqn.x:ls"),
        ("SessionType", "Discovery"),
        ("HeaderDigest", "None"),
        ("MaxRecvDataSegmentLength", "262144"),
    ]);
    let login = LoginRequest {
        transit: true,
        csg: 1,
        nsg: 3,
        itt: 1,
        ..Default::default()
    };
    conn.handle_pdu(pdu(login.to_bhs(), &offers), now);
    assert!(
        matches!(conn.poll_event(), Some(Event::SessionRequested(_))),
        "{:?}",
        sent(&mut conn)
    );
}
