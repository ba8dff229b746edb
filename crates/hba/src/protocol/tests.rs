use super::*;
use proptest::prelude::*;

fn roundtrip(m: &Message) -> Message {
    let mut buf = BytesMut::from(&m.to_frame_bytes()[..]);
    let frame = decode_frame(&mut buf).unwrap().expect("a whole frame");
    assert!(buf.is_empty(), "bytes left after one frame");
    Message::decode(frame).unwrap()
}

fn frame(kind: u8, payload: &[u8]) -> BytesMut {
    let mut b = BytesMut::new();
    b.put_u32(payload.len() as u32 + 1);
    b.put_u8(kind);
    b.extend_from_slice(payload);
    b
}

fn decode(kind: u8, payload: &[u8]) -> Result<Message, ProtocolError> {
    let f = decode_frame(&mut frame(kind, payload))?.expect("whole");
    Message::decode(f)
}

fn client() -> InitiatorClient {
    InitiatorClient::new_for_vm(
        "vm1",
        vec!["127.0.0.1:3260".into()],
        "iqn.2024-01.test:t".into(),
    )
}

#[test]
fn control_messages_round_trip() {
    let requests = [
        Request::Hello(Hello::new("driver", Some(3))),
        Request::Info,
        Request::Status,
        Request::AllocVf { owner: "vm".into() },
        Request::ProgramVf {
            vf: 2,
            client: Box::new(client()),
        },
        Request::ReleaseVf { vf: 1 },
        Request::Probe {
            portal: "10.0.0.1:3260".into(),
        },
        Request::Ping { seq: 9 },
        Request::Fault {
            fault: Fault::LinkDown,
        },
    ];
    for (id, request) in requests.into_iter().enumerate() {
        let m = Message::Request(ControlRequest {
            id: id as u64,
            request,
        });
        assert_eq!(roundtrip(&m), m);
    }
    let summary = AdapterSummary {
        name: "hba0".into(),
        model: "m".into(),
        firmware: "1".into(),
        protocol: PROTOCOL_VERSION,
        vfs_total: 8,
        vfs_in_use: 1,
        link_up: true,
    };
    let replies = [
        Ok(Reply::Hello {
            protocol: 1,
            adapter: summary.clone(),
            shm: true,
        }),
        Ok(Reply::Info(summary.clone())),
        Ok(Reply::Status(AdapterStatus {
            adapter: summary,
            vfs: vec![VfStatus {
                index: 0,
                state: VfState::LoggedIn,
                owner: Some("o".into()),
                target: None,
                portal: Some("p".into()),
                isid: None,
                queue_open: true,
                stats: VfStats::default(),
            }],
        })),
        Ok(Reply::Vf { vf: 3 }),
        Ok(Reply::Programmed(Programmed {
            portal: "p".into(),
            header_digest: true,
            data_digest: false,
        })),
        Ok(Reply::Probe { reachable: false }),
        Ok(Reply::Pong {
            seq: 1,
            vfs_in_use: 2,
            link_up: true,
        }),
        Ok(Reply::Done),
        Err(ControlError::Auth { portal: "p".into() }),
        Err(ControlError::NoCapacity("hba0".into())),
        Err(ControlError::LinkDown),
    ];
    for (id, result) in replies.into_iter().enumerate() {
        let m = Message::Reply(ControlReply {
            id: id as u64,
            result,
        });
        assert_eq!(roundtrip(&m), m);
    }
    for e in [Event::LinkDown, Event::LinkUp, Event::ShuttingDown] {
        assert_eq!(roundtrip(&Message::Event(e.clone())), Message::Event(e));
    }
}

#[test]
fn secrets_travel_as_values_but_never_print() {
    let mut c = client();
    c.chap = Some(datapath::ChapSettings {
        user: "u".into(),
        secret: datapath::Secret::Value("s3cret-value".into()),
        target_user: None,
        target_secret: None,
    });
    let m = Message::Request(ControlRequest {
        id: 1,
        request: Request::ProgramVf {
            vf: 0,
            client: Box::new(c),
        },
    });
    assert_eq!(roundtrip(&m), m);
    assert!(!format!("{m:?}").contains("s3cret-value"));
}

#[test]
fn data_messages_round_trip() {
    let big = Bytes::from(vec![7u8; 70_000]);
    let msgs = [
        Message::Submit(Submit {
            tag: 1,
            lun: 0x0001_0000_0000_0000,
            attr: TaskAttr::Ordered,
            read_len: 4096,
            buffer: Some(8192),
            cdb: Bytes::from_static(&[0x88; 16]),
            data_out: Bytes::new(),
        }),
        Message::Submit(Submit {
            tag: u64::MAX,
            lun: 0,
            attr: TaskAttr::Simple,
            read_len: 0,
            buffer: None,
            cdb: Bytes::from(vec![0x7f; MAX_CDB]),
            data_out: big.clone(),
        }),
        Message::Complete(Complete {
            tag: 5,
            status: 2,
            residual: Residual::Underflow(12),
            sense: Bytes::from_static(&[0x70, 0, 6]),
            data: vec![],
        }),
        Message::Complete(Complete {
            tag: 6,
            status: 0,
            residual: Residual::Overflow(1),
            sense: Bytes::new(),
            data: vec![big.clone()],
        }),
        Message::CompleteShm(CompleteShm {
            tag: 9,
            status: 0x02,
            residual: Residual::Underflow(4096),
            sense: Bytes::from_static(&[0x70, 0, 5, 0, 0, 0, 0, 10]),
            data_len: 1 << 20,
        }),
        Message::Fail(Fail {
            tag: 7,
            code: FailCode::LINK_DOWN,
            reason: "link down".into(),
        }),
        Message::TaskMgmt(TaskMgmt {
            tag: 8,
            function: 5,
            lun: 3,
        }),
        Message::TaskMgmtDone(TaskMgmtDone {
            tag: 8,
            code: FailCode::OK,
            reason: String::new(),
        }),
    ];
    for m in msgs {
        assert_eq!(roundtrip(&m), m);
    }
}

#[test]
fn completion_segments_are_joined_on_the_wire() {
    let segs = [Bytes::from(vec![1u8; 3000]), Bytes::from(vec![2u8; 5])];
    let mut w = FrameBuffer::default();
    w.queue_complete(1, 0, Residual::None, &[], &segs);
    let m = Message::Complete(Complete {
        tag: 1,
        status: 0,
        residual: Residual::None,
        sense: Bytes::new(),
        data: segs.to_vec(),
    });
    let Message::Complete(c) = roundtrip(&m) else {
        panic!("not a completion")
    };
    assert_eq!(c.data.len(), 1);
    assert_eq!(c.data[0].len(), 3005);
    assert_eq!(&c.data[0][2999..3001], &[1, 2]);
}

#[test]
fn garbage_is_refused_with_a_reason() {
    // Oversized: refused from the header alone.
    let mut b = BytesMut::from(&[0xff, 0xff, 0xff, 0xff][..]);
    assert_eq!(decode_frame(&mut b), Err(ProtocolError::TooLarge(u32::MAX)));
    let mut b = BytesMut::from(&(MAX_FRAME + 1).to_be_bytes()[..]);
    assert!(matches!(
        decode_frame(&mut b),
        Err(ProtocolError::TooLarge(_))
    ));
    // Exactly the limit is fine (waits for the payload).
    let mut b = BytesMut::from(&MAX_FRAME.to_be_bytes()[..]);
    b.put_u8(FrameKind::SUBMIT.0);
    assert_eq!(decode_frame(&mut b), Ok(None));
    let mut b = BytesMut::from(&[0, 0, 0, 0][..]);
    assert_eq!(decode_frame(&mut b), Err(ProtocolError::Empty));
    // Unknown kind: refused before the payload arrives.
    let mut b = BytesMut::from(&[0, 0, 1, 0, 0x7e][..]);
    assert_eq!(decode_frame(&mut b), Err(ProtocolError::UnknownKind(0x7e)));
    // Incomplete frames wait.
    let mut b = frame(FrameKind::SUBMIT.0, &[0; 30]);
    b.truncate(b.len() - 1);
    assert_eq!(decode_frame(&mut b), Ok(None));

    assert_eq!(
        decode(FrameKind::SUBMIT.0, &[0; 10]),
        Err(ProtocolError::Truncated("SUBMIT"))
    );
    // CDB length 0 and 261, attribute 9, CDB longer than the frame.
    let mut submit = vec![0u8; 31];
    submit[16] = 1;
    assert!(matches!(
        decode(FrameKind::SUBMIT.0, &submit),
        Err(ProtocolError::Invalid { .. })
    ));
    submit[29..31].copy_from_slice(&261u16.to_be_bytes());
    assert!(matches!(
        decode(FrameKind::SUBMIT.0, &submit),
        Err(ProtocolError::Invalid { .. })
    ));
    submit[29..31].copy_from_slice(&6u16.to_be_bytes());
    assert_eq!(
        decode(FrameKind::SUBMIT.0, &submit),
        Err(ProtocolError::Truncated("SUBMIT"))
    );
    submit[16] = 9;
    submit.extend_from_slice(&[0; 6]);
    assert!(matches!(
        decode(FrameKind::SUBMIT.0, &submit),
        Err(ProtocolError::Invalid { .. })
    ));
    // Task management with trailing bytes; FAIL with code 0, unknown code, bad UTF-8.
    assert_eq!(
        decode(FrameKind::TASK_MGMT.0, &[0; 18]),
        Err(ProtocolError::Trailing("TASK_MGMT"))
    );
    assert!(decode(FrameKind::FAIL.0, &[0; 9]).is_err());
    let mut fail = vec![0u8; 9];
    fail[8] = 0x55;
    assert!(decode(FrameKind::FAIL.0, &fail).is_err());
    fail[8] = FailCode::CLOSED.0;
    fail.extend_from_slice(&[0xff, 0xfe]);
    assert!(decode(FrameKind::FAIL.0, &fail).is_err());
    // COMPLETE_SHM carries no data after the sense.
    let mut shm = vec![0u8; 20];
    assert!(decode(FrameKind::COMPLETE_SHM.0, &shm).is_ok());
    shm.push(0);
    assert_eq!(
        decode(FrameKind::COMPLETE_SHM.0, &shm),
        Err(ProtocolError::Trailing("COMPLETE_SHM"))
    );
    assert_eq!(
        decode(FrameKind::COMPLETE_SHM.0, &shm[..19]),
        Err(ProtocolError::Truncated("COMPLETE_SHM"))
    );
    // Residual kinds.
    let mut complete = vec![0u8; 16];
    complete[9] = 3;
    assert!(decode(FrameKind::COMPLETE.0, &complete).is_err());
    complete[9] = 0;
    complete[13] = 1;
    assert!(decode(FrameKind::COMPLETE.0, &complete).is_err());
    // JSON that is not a request, or a request with unknown fields.
    assert!(decode(FrameKind::CONTROL_REQUEST.0, b"hello").is_err());
    assert!(decode(
        FrameKind::CONTROL_REQUEST.0,
        br#"{"id":1,"request":{"op":"release_vf","vf":1,"x":1}}"#
    )
    .is_err());
    assert!(decode(
        FrameKind::CONTROL_REQUEST.0,
        br#"{"id":1,"request":{"op":"info"},"y":2}"#
    )
    .is_err());
    assert!(decode(
        FrameKind::CONTROL_REQUEST.0,
        br#"{"id":1,"request":{"op":"format_disk"}}"#
    )
    .is_err());
}

#[test]
fn faults_parse_by_name() {
    for f in Fault::ALL {
        assert_eq!(f.name().parse::<Fault>(), Ok(f));
        assert_eq!(
            serde_json::to_string(&f).unwrap(),
            format!("\"{}\"", f.name())
        );
    }
    assert!("explode".parse::<Fault>().unwrap_err().contains("crash"));
}

#[tokio::test]
async fn reader_reassembles_frames_split_anywhere_and_reports_eof() {
    let msgs: Vec<Message> = (0..20u64)
        .map(|i| {
            Message::Complete(Complete {
                tag: i,
                status: 0,
                residual: Residual::None,
                sense: Bytes::new(),
                data: vec![Bytes::from(vec![i as u8; (i as usize * 997) % 20_000 + 1])],
            })
        })
        .collect();
    let (mut a, b) = tokio::io::duplex(777);
    let sent = msgs.clone();
    let writer = tokio::spawn(async move {
        let mut w = FrameBuffer::default();
        for m in &sent {
            w.queue(m);
        }
        w.write_to(&mut a).await.unwrap();
    });
    let mut r = FrameReader::new(b);
    for m in &msgs {
        assert_eq!(&r.next_message().await.unwrap().unwrap(), m);
    }
    writer.await.unwrap();
    assert!(r.next_message().await.unwrap().is_none());

    // A stream cut inside a frame.
    let (mut a, b) = tokio::io::duplex(64);
    let bytes = msgs[3].to_frame_bytes();
    tokio::spawn(async move {
        a.write_all(&bytes[..bytes.len() - 1]).await.unwrap();
    });
    let mut r = FrameReader::new(b);
    assert!(matches!(
        r.next().await,
        Err(ReadError::Protocol(ProtocolError::ClosedInFrame))
    ));
}

fn arb_attr() -> impl Strategy<Value = TaskAttr> {
    prop_oneof![
        Just(TaskAttr::Untagged),
        Just(TaskAttr::Simple),
        Just(TaskAttr::Ordered),
        Just(TaskAttr::HeadOfQueue),
        Just(TaskAttr::Aca),
    ]
}

fn arb_residual() -> impl Strategy<Value = Residual> {
    prop_oneof![
        Just(Residual::None),
        any::<u32>().prop_map(Residual::Underflow),
        any::<u32>().prop_map(Residual::Overflow),
    ]
}

fn arb_message() -> impl Strategy<Value = Message> {
    let bytes = |max| proptest::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from);
    let code = prop_oneof![
        Just(FailCode::PATH_FAILED),
        Just(FailCode::LINK_DOWN),
        Just(FailCode::SESSION_LOST),
        Just(FailCode::CLOSED),
        Just(FailCode::TARGET_FAILURE),
        Just(FailCode::REFUSED),
    ];
    prop_oneof![
        (
            any::<u64>(),
            any::<u64>(),
            arb_attr(),
            any::<u32>(),
            proptest::option::of(0..NO_BUFFER),
            proptest::collection::vec(any::<u8>(), 1..=MAX_CDB),
            bytes(5000)
        )
            .prop_map(|(tag, lun, attr, read_len, buffer, cdb, data_out)| {
                Message::Submit(Submit {
                    tag,
                    lun,
                    attr,
                    read_len,
                    buffer,
                    cdb: cdb.into(),
                    data_out,
                })
            }),
        (
            any::<u64>(),
            any::<u8>(),
            arb_residual(),
            bytes(300),
            any::<u32>()
        )
            .prop_map(|(tag, status, residual, sense, data_len)| {
                Message::CompleteShm(CompleteShm {
                    tag,
                    status,
                    residual,
                    sense,
                    data_len,
                })
            }),
        (
            any::<u64>(),
            any::<u8>(),
            arb_residual(),
            bytes(300),
            bytes(5000)
        )
            .prop_map(|(tag, status, residual, sense, data)| {
                Message::Complete(Complete {
                    tag,
                    status,
                    residual,
                    sense,
                    data: if data.is_empty() { vec![] } else { vec![data] },
                })
            }),
        (any::<u64>(), code, "[a-z ]{0,40}").prop_map(|(tag, code, reason)| Message::Fail(Fail {
            tag,
            code,
            reason
        })),
        (any::<u64>(), any::<u8>(), any::<u64>()).prop_map(|(tag, function, lun)| {
            Message::TaskMgmt(TaskMgmt { tag, function, lun })
        }),
        (any::<u64>(), "[a-z]{0,10}").prop_map(|(seq, owner)| {
            Message::Request(ControlRequest {
                id: seq,
                request: Request::AllocVf { owner },
            })
        }),
    ]
}

proptest! {
    #[test]
    fn any_message_round_trips(m in arb_message()) {
        prop_assert_eq!(roundtrip(&m), m);
    }

    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..400)) {
        let mut buf = BytesMut::from(&data[..]);
        while let Ok(Some(frame)) = decode_frame(&mut buf) {
            let _ = Message::decode(frame);
        }
    }

    #[test]
    fn arbitrary_payloads_of_every_kind_never_panic(
        kind in prop_oneof![Just(1u8), Just(2), Just(3), Just(0x10), Just(0x11), Just(0x12), Just(0x13), Just(0x14), Just(0x15)],
        payload in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        if let Ok(Some(f)) = decode_frame(&mut frame(kind, &payload)) {
            let _ = Message::decode(f);
        }
    }

    #[test]
    fn a_mutated_frame_decodes_or_is_refused(m in arb_message(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut b = m.to_frame_bytes().to_vec();
        let i = at.index(b.len());
        b[i] = byte;
        let mut buf = BytesMut::from(&b[..]);
        if let Ok(Some(f)) = decode_frame(&mut buf) {
            let _ = Message::decode(f);
        }
    }
}
