use super::*;
use proptest::prelude::*;

fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn get<'a>(pairs: &'a [(String, String)], k: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(key, _)| key == k)
        .map(|(_, v)| v.as_str())
}

const INI: &str = "iqn.2024-01.org.viscsi:ini";
const TGT: &str = "iqn.2024-01.org.viscsi:tgt";

fn first_pdu() -> Vec<(String, String)> {
    kv(&[
        ("InitiatorName", INI),
        ("TargetName", TGT),
        ("SessionType", "Normal"),
    ])
}

fn target() -> Negotiation {
    Negotiation::new(Role::Target, NegotiationConfig::default())
}

/// A target that has seen the first login PDU.
fn target_after_first() -> Negotiation {
    let mut t = target();
    t.respond(Stage::Security, true, &first_pdu()).unwrap();
    t
}

// ---- text format --------------------------------------------------------------------------

#[test]
fn parse_basic() {
    let p = parse_text(b"HeaderDigest=None,CRC32C\0MaxBurstLength=262144\0").unwrap();
    assert_eq!(
        p,
        kv(&[
            ("HeaderDigest", "None,CRC32C"),
            ("MaxBurstLength", "262144")
        ])
    );
    // Value may contain '='; empty values are allowed.
    let p = parse_text(b"X-a=b=c\0TargetAlias=\0").unwrap();
    assert_eq!(p, kv(&[("X-a", "b=c"), ("TargetAlias", "")]));
    assert_eq!(parse_text(b"").unwrap(), vec![]);
    assert_eq!(parse_text(b"\0\0\0").unwrap(), vec![]);
}

#[test]
fn parse_tolerates_missing_final_nul_and_padding() {
    assert_eq!(
        parse_text(b"A=1\0B=2").unwrap(),
        kv(&[("A", "1"), ("B", "2")])
    );
    assert_eq!(parse_text(b"A=1\0\0\0\0").unwrap(), kv(&[("A", "1")]));
}

#[test]
fn parse_errors() {
    assert_eq!(
        parse_text(b"A=1\0\0B=2\0"),
        Err(TextError::EmptyPair { index: 1 })
    );
    assert_eq!(
        parse_text(b"A\0"),
        Err(TextError::MissingEquals { index: 0 })
    );
    assert_eq!(parse_text(b"=1\0"), Err(TextError::EmptyKey { index: 0 }));
    let long = format!("{}=1\0", "K".repeat(64));
    assert_eq!(
        parse_text(long.as_bytes()),
        Err(TextError::KeyTooLong { index: 0 })
    );
    let ok = format!("{}=1\0", "K".repeat(63));
    assert!(parse_text(ok.as_bytes()).is_ok());
    assert_eq!(
        parse_text(b"A B=1\0"),
        Err(TextError::InvalidKeyName { index: 0 })
    );
    assert_eq!(
        parse_text(b"A=\xff\xfe\0"),
        Err(TextError::NotUtf8 { index: 0 })
    );
    let e = parse_text(b"A=1\0A=2\0").unwrap_err();
    assert_eq!(e, TextError::DuplicateKey { key: "A".into() });
    assert_eq!(e.login_status(), STATUS_INITIATOR_ERROR);
    assert_eq!(
        parse_text_multi(b"TargetName=a\0TargetAddress=x\0TargetName=b\0")
            .unwrap()
            .len(),
        3
    );
}

#[test]
fn value_length_limits() {
    let v255 = format!("TargetAlias={}\0", "a".repeat(255));
    assert!(parse_text(v255.as_bytes()).is_ok());
    let v256 = format!("TargetAlias={}\0", "a".repeat(256));
    assert_eq!(
        parse_text(v256.as_bytes()),
        Err(TextError::ValueTooLong {
            key: "TargetAlias".into(),
            max: 255
        })
    );
    // A 1024-byte challenge in hex fits CHAP_C and CHAP_R, not CHAP_N.
    let c = format!("CHAP_C=0x{}\0", "ab".repeat(1024));
    assert!(parse_text(c.as_bytes()).is_ok());
    let r = format!("CHAP_R=0x{}\0", "ab".repeat(4095));
    assert!(parse_text(r.as_bytes()).is_ok());
    let r = format!("CHAP_R=0x{}\0", "ab".repeat(4096));
    assert!(parse_text(r.as_bytes()).is_err());
    let n = format!("CHAP_N={}\0", "a".repeat(300));
    assert!(parse_text(n.as_bytes()).is_err());
}

#[test]
fn numbers() {
    assert_eq!(parse_numeric("0"), Some(0));
    assert_eq!(parse_numeric("262144"), Some(262_144));
    assert_eq!(parse_numeric("0x40000"), Some(262_144));
    assert_eq!(parse_numeric("0X0000000000040000"), Some(262_144));
    assert_eq!(parse_numeric("18446744073709551615"), Some(u64::MAX));
    assert_eq!(parse_numeric("0xffffffffffffffff"), Some(u64::MAX));
    for bad in [
        "",
        "+5",
        "-1",
        " 5",
        "5 ",
        "0x",
        "1e3",
        "18446744073709551616",
        "0x1ffffffffffffffff",
        "Yes",
    ] {
        assert_eq!(parse_numeric(bad), None, "{bad:?}");
    }
}

#[test]
fn encode_round_trip() {
    let pairs = kv(&[("A", "1"), ("B", "x,y")]);
    assert_eq!(encode_text(&pairs), b"A=1\0B=x,y\0");
    assert_eq!(parse_text(&encode_text(&pairs)).unwrap(), pairs);
}

// ---- the table ----------------------------------------------------------------------------

#[test]
fn table_is_complete_and_consistent() {
    let expected = [
        "HeaderDigest",
        "DataDigest",
        "MaxConnections",
        "SendTargets",
        "TargetName",
        "InitiatorName",
        "TargetAlias",
        "InitiatorAlias",
        "TargetAddress",
        "TargetPortalGroupTag",
        "InitialR2T",
        "ImmediateData",
        "MaxRecvDataSegmentLength",
        "MaxBurstLength",
        "FirstBurstLength",
        "DefaultTime2Wait",
        "DefaultTime2Retain",
        "MaxOutstandingR2T",
        "DataPDUInOrder",
        "DataSequenceInOrder",
        "ErrorRecoveryLevel",
        "SessionType",
        "AuthMethod",
        "OFMarker",
        "IFMarker",
        "OFMarkInt",
        "IFMarkInt",
        "TaskReporting",
        "iSCSIProtocolLevel",
        "CHAP_A",
        "CHAP_I",
        "CHAP_C",
        "CHAP_N",
        "CHAP_R",
    ];
    for name in expected {
        assert!(lookup(name).is_some(), "{name} missing");
    }
    assert_eq!(KEYS.len(), expected.len());
    for def in KEYS {
        assert_eq!(KEYS.iter().filter(|d| d.name == def.name).count(), 1);
        assert!(def.name.len() <= MAX_KEY_NAME_LEN);
        if let Some(d) = def.default {
            assert!(def.check_declared(d).is_some(), "{} default", def.name);
        }
        for conds in def.irrelevant_when {
            for (k, v) in *conds {
                let other = lookup(k).unwrap();
                assert!(other.check_declared(v).is_some(), "{}: {k}={v}", def.name);
            }
        }
        // Every negotiated key has a local value from the default config.
        if def.kind.is_negotiated() {
            assert!((def.local)(&NegotiationConfig::default(), Role::Target).is_some());
        }
    }
    assert!(lookup("X-com.example.foo").is_none());
    assert!(lookup("headerdigest").is_none());
}

// ---- responder ----------------------------------------------------------------------------

#[test]
fn responder_operational_stage() {
    let mut t = target_after_first();
    let offers = kv(&[
        ("HeaderDigest", "None,CRC32C"),
        ("DataDigest", "CRC32C,None"),
        ("MaxRecvDataSegmentLength", "65536"),
        ("MaxBurstLength", "1048576"),
        ("FirstBurstLength", "0x20000"),
        ("DefaultTime2Wait", "0"),
        ("DefaultTime2Retain", "60"),
        ("MaxOutstandingR2T", "8"),
        ("ErrorRecoveryLevel", "2"),
        ("InitialR2T", "No"),
        ("ImmediateData", "Yes"),
        ("MaxConnections", "4"),
        ("DataPDUInOrder", "No"),
        ("DataSequenceInOrder", "Yes"),
        ("IFMarker", "No"),
        ("OFMarker", "No"),
        ("OFMarkInt", "2048"),
        ("X-com.example.thing", "1"),
        ("iSCSIProtocolLevel", "2"),
        ("TaskReporting", "FastAbort,RFC3720"),
    ]);
    let r = t.respond(Stage::Operational, true, &offers).unwrap();
    let a = &r.answers;
    assert_eq!(get(a, "HeaderDigest"), Some("None"));
    assert_eq!(get(a, "DataDigest"), Some("CRC32C"));
    assert_eq!(get(a, "MaxBurstLength"), Some("262144"));
    assert_eq!(get(a, "FirstBurstLength"), Some("65536"));
    assert_eq!(get(a, "DefaultTime2Wait"), Some("2"));
    assert_eq!(get(a, "DefaultTime2Retain"), Some("20"));
    assert_eq!(get(a, "MaxOutstandingR2T"), Some("1"));
    assert_eq!(get(a, "ErrorRecoveryLevel"), Some("0"));
    assert_eq!(get(a, "InitialR2T"), Some("Yes"));
    assert_eq!(get(a, "ImmediateData"), Some("Yes"));
    assert_eq!(get(a, "MaxConnections"), Some("1"));
    assert_eq!(get(a, "DataPDUInOrder"), Some("Yes"));
    assert_eq!(get(a, "IFMarker"), Some("No"));
    assert_eq!(get(a, "OFMarker"), Some("No"));
    assert_eq!(get(a, "OFMarkInt"), Some("Reject"));
    assert_eq!(get(a, "X-com.example.thing"), Some("NotUnderstood"));
    assert_eq!(get(a, "iSCSIProtocolLevel"), Some("1"));
    assert_eq!(get(a, "TaskReporting"), Some("RFC3720"));
    // Our declaration, exactly once, after the answers.
    assert_eq!(
        a.last().unwrap(),
        &kv(&[("MaxRecvDataSegmentLength", "262144")])[0]
    );
    assert_eq!(
        a.iter()
            .filter(|(k, _)| k == "MaxRecvDataSegmentLength")
            .count(),
        1
    );

    let p = t.params();
    assert_eq!(p.max_xmit_data_segment_length, 65536);
    assert_eq!(p.max_recv_data_segment_length, 262_144);
    assert!(p.data_digest && !p.header_digest);
    assert_eq!(p.initiator_name.as_deref(), Some(INI));
    assert_eq!(p.target_name.as_deref(), Some(TGT));
    assert_eq!(t.result("iSCSIProtocolLevel"), Some("1"));

    // Nothing more is declared later.
    let r = t.respond(Stage::Operational, true, &[]).unwrap();
    assert!(r.answers.is_empty());
}

#[test]
fn list_select_follows_originators_order() {
    // tgt answers CRC32C to "None,CRC32C"; we follow the RFC and take the originator's first.
    let mut t = Negotiation::new(
        Role::Target,
        NegotiationConfig {
            header_digest: vec![Digest::Crc32c, Digest::None],
            ..NegotiationConfig::default()
        },
    );
    t.respond(Stage::Security, true, &first_pdu()).unwrap();
    let r = t
        .respond(
            Stage::Operational,
            true,
            &kv(&[("HeaderDigest", "None,CRC32C")]),
        )
        .unwrap();
    assert_eq!(get(&r.answers, "HeaderDigest"), Some("None"));

    // No common value: Reject, and the key keeps its default.
    let mut t = Negotiation::new(
        Role::Target,
        NegotiationConfig {
            data_digest: vec![Digest::None],
            ..NegotiationConfig::default()
        },
    );
    t.respond(Stage::Security, true, &first_pdu()).unwrap();
    let r = t
        .respond(
            Stage::Operational,
            true,
            &kv(&[("DataDigest", "CRC32C,md5")]),
        )
        .unwrap();
    assert_eq!(get(&r.answers, "DataDigest"), Some("Reject"));
    assert!(!t.params().data_digest);
}

#[test]
fn first_burst_irrelevant_and_capped() {
    let mut t = Negotiation::new(
        Role::Target,
        NegotiationConfig {
            immediate_data: false,
            ..NegotiationConfig::default()
        },
    );
    t.respond(Stage::Security, true, &first_pdu()).unwrap();
    // FirstBurstLength comes first, its condition after it in the same batch.
    let r = t
        .respond(
            Stage::Operational,
            true,
            &kv(&[
                ("FirstBurstLength", "4096"),
                ("InitialR2T", "Yes"),
                ("ImmediateData", "Yes"),
            ]),
        )
        .unwrap();
    assert_eq!(get(&r.answers, "FirstBurstLength"), Some("Irrelevant"));
    assert_eq!(
        r.answers[0].0, "FirstBurstLength",
        "answers keep offer order"
    );
    assert_eq!(t.params().first_burst_length, 65536);

    // Capped at the MaxBurstLength result.
    let mut t = target_after_first();
    let r = t
        .respond(
            Stage::Operational,
            true,
            &kv(&[("FirstBurstLength", "65536"), ("MaxBurstLength", "16384")]),
        )
        .unwrap();
    assert_eq!(get(&r.answers, "FirstBurstLength"), Some("16384"));
    assert_eq!(t.params().first_burst_length, 16384);
}

#[test]
fn discovery_makes_keys_irrelevant() {
    let mut t = Negotiation::new(
        Role::Target,
        NegotiationConfig {
            target_portal_group_tag: Some(1),
            ..NegotiationConfig::default()
        },
    );
    let r = t
        .respond(
            Stage::Operational,
            true,
            &kv(&[
                ("InitiatorName", INI),
                ("SessionType", "Discovery"),
                ("HeaderDigest", "None"),
                ("MaxBurstLength", "4096"),
                ("InitialR2T", "No"),
                ("DefaultTime2Wait", "5"),
            ]),
        )
        .unwrap();
    assert_eq!(r.session_type, Some(SessionType::Discovery));
    assert_eq!(get(&r.answers, "HeaderDigest"), Some("None"));
    assert_eq!(get(&r.answers, "MaxBurstLength"), Some("Irrelevant"));
    assert_eq!(get(&r.answers, "InitialR2T"), Some("Irrelevant"));
    assert_eq!(get(&r.answers, "DefaultTime2Wait"), Some("5"));
    assert_eq!(get(&r.answers, "TargetPortalGroupTag"), Some("1"));
    let p = t.params();
    assert_eq!(p.session_type, SessionType::Discovery);
    assert_eq!(p.max_burst_length, 262_144);
    assert_eq!(p.tpgt, Some(1));
}

#[test]
fn required_keys_in_first_request() {
    let mut t = target();
    let e = t
        .respond(Stage::Security, true, &kv(&[("TargetName", TGT)]))
        .unwrap_err();
    assert_eq!(
        e,
        NegotiationError::MissingParameter {
            key: "InitiatorName"
        }
    );
    assert_eq!(e.login_status(), STATUS_MISSING_PARAMETER);

    let mut t = target();
    let e = t
        .respond(Stage::Security, true, &kv(&[("InitiatorName", INI)]))
        .unwrap_err();
    assert_eq!(e, NegotiationError::MissingParameter { key: "TargetName" });

    let mut t = target();
    let r = t
        .respond(
            Stage::Security,
            true,
            &kv(&[
                ("InitiatorName", INI),
                ("SessionType", "Discovery"),
                ("AuthMethod", "None"),
            ]),
        )
        .unwrap();
    assert_eq!(r.auth_keys, kv(&[("AuthMethod", "None")]));
    assert_eq!(r.initiator_name.as_deref(), Some(INI));
}

#[test]
fn first_response_declarations() {
    let mut t = Negotiation::new(
        Role::Target,
        NegotiationConfig {
            target_alias: Some("disk one".into()),
            target_portal_group_tag: Some(7),
            ..NegotiationConfig::default()
        },
    );
    let mut offers = first_pdu();
    offers.extend(kv(&[
        ("InitiatorAlias", "vm-1"),
        ("AuthMethod", "CHAP,None"),
    ]));
    let r = t.respond(Stage::Security, true, &offers).unwrap();
    assert_eq!(r.auth_keys, kv(&[("AuthMethod", "CHAP,None")]));
    assert_eq!(
        r.answers,
        kv(&[("TargetAlias", "disk one"), ("TargetPortalGroupTag", "7")])
    );
    let r = t
        .respond(Stage::Security, true, &kv(&[("CHAP_A", "5")]))
        .unwrap();
    assert!(r.answers.is_empty());
    assert_eq!(r.auth_keys, kv(&[("CHAP_A", "5")]));
    let r = t.respond(Stage::Operational, true, &[]).unwrap();
    assert_eq!(r.answers, kv(&[("MaxRecvDataSegmentLength", "262144")]));
    let p = t.params();
    assert_eq!(p.target_alias.as_deref(), Some("disk one"));
    assert_eq!(p.initiator_alias.as_deref(), Some("vm-1"));
}

#[test]
fn phase_and_sender_errors() {
    let mut t = target_after_first();
    t.respond(Stage::Operational, true, &[]).unwrap();
    let e = t
        .respond(Stage::FullFeature, true, &kv(&[("MaxConnections", "2")]))
        .unwrap_err();
    assert_eq!(
        e,
        NegotiationError::WrongPhase {
            key: "MaxConnections",
            stage: Stage::FullFeature
        }
    );
    assert_eq!(e.login_status(), STATUS_INITIATOR_ERROR);

    let mut t = target_after_first();
    assert_eq!(
        t.respond(Stage::Operational, false, &kv(&[("MaxBurstLength", "512")]))
            .unwrap_err(),
        NegotiationError::LeadingOnly {
            key: "MaxBurstLength"
        }
    );
    let mut t = target_after_first();
    assert!(matches!(
        t.respond(Stage::Operational, true, &kv(&[("CHAP_A", "5")])),
        Err(NegotiationError::WrongPhase { key: "CHAP_A", .. })
    ));
    let mut t = target_after_first();
    assert!(matches!(
        t.respond(Stage::Operational, true, &kv(&[("SendTargets", "All")])),
        Err(NegotiationError::WrongPhase { .. })
    ));
    let mut t = target_after_first();
    assert_eq!(
        t.respond(Stage::Operational, true, &kv(&[("TargetAlias", "x")]))
            .unwrap_err(),
        NegotiationError::WrongSender {
            key: "TargetAlias",
            peer: Role::Initiator
        }
    );
    let mut t = target_after_first();
    assert_eq!(
        t.respond(
            Stage::Operational,
            true,
            &kv(&[("MaxRecvDataSegmentLength", "100")])
        )
        .unwrap_err(),
        NegotiationError::InvalidValue {
            key: "MaxRecvDataSegmentLength"
        }
    );
    let mut t = target();
    assert_eq!(
        t.respond(
            Stage::Security,
            true,
            &kv(&[("InitiatorName", INI), ("SessionType", "Weird")])
        )
        .unwrap_err(),
        NegotiationError::InvalidValue { key: "SessionType" }
    );
}

#[test]
fn duplicates_across_a_login() {
    let mut t = target_after_first();
    t.respond(Stage::Operational, true, &kv(&[("MaxBurstLength", "4096")]))
        .unwrap();
    assert_eq!(
        t.respond(Stage::Operational, true, &kv(&[("MaxBurstLength", "8192")]))
            .unwrap_err(),
        NegotiationError::DuplicateKey {
            key: "MaxBurstLength".into()
        }
    );
    let mut t = target();
    let mut offers = first_pdu();
    offers.push(("InitiatorName".into(), INI.into()));
    assert!(matches!(
        t.respond(Stage::Security, true, &offers),
        Err(NegotiationError::DuplicateKey { .. })
    ));
}

#[test]
fn full_feature_text_exchanges() {
    let mut t = target_after_first();
    t.respond(Stage::Operational, true, &[]).unwrap();
    let r = t
        .respond(Stage::FullFeature, true, &kv(&[("SendTargets", "All")]))
        .unwrap();
    assert_eq!(r.send_targets.as_deref(), Some("All"));
    assert!(r.answers.is_empty());
    // MaxRecvDataSegmentLength may be declared again in each text exchange.
    for v in ["16384", "32768"] {
        let r = t
            .respond(
                Stage::FullFeature,
                true,
                &kv(&[("MaxRecvDataSegmentLength", v), ("X#Foo", "1")]),
            )
            .unwrap();
        assert_eq!(r.answers, kv(&[("X#Foo", "NotUnderstood")]));
    }
    assert_eq!(t.params().max_xmit_data_segment_length, 32768);
}

#[test]
fn special_values_and_bad_values() {
    let mut t = target_after_first();
    let r = t
        .respond(
            Stage::Operational,
            true,
            &kv(&[
                ("Unknown-Key", "NotUnderstood"),
                ("InitialR2T", "Maybe"),
                ("MaxBurstLength", "100"),
                ("MaxOutstandingR2T", "0x"),
                ("ImmediateData", "Reject"),
            ]),
        )
        .unwrap();
    assert_eq!(
        get(&r.answers, "Unknown-Key"),
        None,
        "no NotUnderstood loop"
    );
    assert_eq!(get(&r.answers, "InitialR2T"), Some("Reject"));
    assert_eq!(get(&r.answers, "MaxBurstLength"), Some("Reject"));
    assert_eq!(get(&r.answers, "MaxOutstandingR2T"), Some("Reject"));
    assert_eq!(get(&r.answers, "ImmediateData"), None);
    assert_eq!(
        t.params(),
        SessionParams {
            initiator_name: Some(INI.into()),
            target_name: Some(TGT.into()),
            max_recv_data_segment_length: 262_144,
            ..SessionParams::default()
        }
    );
}

// ---- originator ---------------------------------------------------------------------------

fn initiator_cfg() -> NegotiationConfig {
    NegotiationConfig {
        initiator_name: Some(INI.into()),
        target_name: Some(TGT.into()),
        initiator_alias: Some("vm-1".into()),
        ..NegotiationConfig::default()
    }
}

#[test]
fn originator_offers() {
    let mut i = Negotiation::new(Role::Initiator, initiator_cfg());
    let first = i.offers(Stage::Security, true);
    assert_eq!(
        first,
        kv(&[
            ("TargetName", TGT),
            ("InitiatorName", INI),
            ("InitiatorAlias", "vm-1"),
            ("SessionType", "Normal"),
        ])
    );
    assert!(i.offers(Stage::Security, true).is_empty());
    let op = i.offers(Stage::Operational, true);
    for k in [
        "HeaderDigest",
        "DataDigest",
        "MaxConnections",
        "InitialR2T",
        "ImmediateData",
        "MaxRecvDataSegmentLength",
        "MaxBurstLength",
        "FirstBurstLength",
        "DefaultTime2Wait",
        "DefaultTime2Retain",
        "MaxOutstandingR2T",
        "DataPDUInOrder",
        "DataSequenceInOrder",
        "ErrorRecoveryLevel",
    ] {
        assert!(get(&op, k).is_some(), "{k} not offered");
    }
    assert_eq!(get(&op, "HeaderDigest"), Some("None,CRC32C"));
    assert_eq!(get(&op, "TaskReporting"), None);
    assert!(i.offers(Stage::Operational, true).is_empty());

    // Non-leading connection: no leading-only keys. Discovery: no irrelevant keys.
    let mut i = Negotiation::new(Role::Initiator, initiator_cfg());
    let op = i.offers(Stage::Operational, false);
    assert_eq!(get(&op, "MaxBurstLength"), None);
    assert!(get(&op, "HeaderDigest").is_some());
    let mut i = Negotiation::new(
        Role::Initiator,
        NegotiationConfig {
            session_type: SessionType::Discovery,
            ..initiator_cfg()
        },
    );
    let op = i.offers(Stage::Operational, true);
    assert_eq!(get(&op, "TargetName"), None);
    assert_eq!(get(&op, "SessionType"), Some("Discovery"));
    assert_eq!(get(&op, "MaxBurstLength"), None);
    assert_eq!(get(&op, "InitialR2T"), None);
    assert_eq!(get(&op, "DefaultTime2Wait"), Some("2"));

    // FirstBurstLength is left out when our own InitialR2T=Yes and ImmediateData=No.
    let mut i = Negotiation::new(
        Role::Initiator,
        NegotiationConfig {
            immediate_data: false,
            ..initiator_cfg()
        },
    );
    let op = i.offers(Stage::Operational, true);
    assert_eq!(get(&op, "FirstBurstLength"), None);
}

fn initiator_with_offers() -> Negotiation {
    let mut i = Negotiation::new(Role::Initiator, initiator_cfg());
    i.offers(Stage::Operational, true);
    i
}

#[test]
fn originator_checks_answers() {
    let bad = [
        ("MaxBurstLength", "524288"),    // above our offer (Min)
        ("DefaultTime2Wait", "1"),       // below our offer (Max)
        ("InitialR2T", "No"),            // we offered Yes to an OR
        ("HeaderDigest", "MD5"),         // not in our list
        ("HeaderDigest", "None,CRC32C"), // a list is not an answer
        ("MaxOutstandingR2T", "0"),      // out of range
        ("ErrorRecoveryLevel", "x"),
    ];
    for (k, v) in bad {
        let mut i = initiator_with_offers();
        let e = i
            .accept_answers(Stage::Operational, &kv(&[(k, v)]))
            .unwrap_err();
        assert!(
            matches!(e, NegotiationError::InvalidAnswer { .. }),
            "{k}={v}: {e:?}"
        );
    }
    let mut i = Negotiation::new(
        Role::Initiator,
        NegotiationConfig {
            immediate_data: false,
            initial_r2t: false,
            ..initiator_cfg()
        },
    );
    i.offers(Stage::Operational, true);
    assert!(i
        .accept_answers(Stage::Operational, &kv(&[("ImmediateData", "Yes")]))
        .is_err());
}

#[test]
fn originator_accepts_valid_and_special_answers() {
    let mut i = initiator_with_offers();
    let reply = i
        .accept_answers(
            Stage::Operational,
            &kv(&[
                // tgt's non-RFC pick from "None,CRC32C" is still in our list: accepted.
                ("HeaderDigest", "CRC32C"),
                ("DataDigest", "Reject"),
                ("MaxBurstLength", "65536"),
                ("FirstBurstLength", "Irrelevant"),
                ("MaxConnections", "NotUnderstood"),
                ("MaxRecvDataSegmentLength", "0x2000"),
                ("TargetPortalGroupTag", "3"),
                ("TargetAlias", "array"),
                ("X-vendor", "1"),
                ("AuthMethod", "CHAP"),
            ]),
        )
        .unwrap();
    assert_eq!(reply, kv(&[("X-vendor", "NotUnderstood")]));
    let p = i.params();
    assert!(p.header_digest && !p.data_digest);
    assert_eq!(p.max_burst_length, 65536);
    assert_eq!(p.first_burst_length, 65536);
    assert_eq!(p.max_xmit_data_segment_length, 8192);
    assert_eq!(p.max_recv_data_segment_length, 262_144);
    assert_eq!(p.tpgt, Some(3));
    assert_eq!(p.target_alias.as_deref(), Some("array"));
    let mut left = i.unanswered();
    left.sort_unstable();
    assert!(left.contains(&"ErrorRecoveryLevel"));
    assert!(!left.contains(&"MaxBurstLength"));
}

#[test]
fn originator_answers_target_offers() {
    let mut i = initiator_with_offers();
    let reply = i
        .accept_answers(
            Stage::Operational,
            &kv(&[
                ("TaskReporting", "ResponseFence,RFC3720"),
                ("OFMarker", "Yes"),
            ]),
        )
        .unwrap();
    assert_eq!(
        reply,
        kv(&[("TaskReporting", "RFC3720"), ("OFMarker", "No")])
    );
    // A target may not send initiator-only keys.
    let mut i = initiator_with_offers();
    assert!(matches!(
        i.accept_answers(Stage::Operational, &kv(&[("InitiatorName", "x")])),
        Err(NegotiationError::WrongSender { .. })
    ));
}

// ---- in-memory logins ---------------------------------------------------------------------

/// Runs a login between our initiator and our target: security stage with declarations only,
/// then one operational round trip. Returns both sides.
fn login(ini: NegotiationConfig, tgt: NegotiationConfig) -> (Negotiation, Negotiation) {
    let mut i = Negotiation::new(Role::Initiator, ini);
    let mut t = Negotiation::new(Role::Target, tgt);
    let req = i.offers(Stage::Security, true);
    let resp = t.respond(Stage::Security, true, &req).unwrap();
    assert!(i
        .accept_answers(Stage::Security, &resp.answers)
        .unwrap()
        .is_empty());
    let req = i.offers(Stage::Operational, true);
    let resp = t.respond(Stage::Operational, true, &req).unwrap();
    assert!(
        i.accept_answers(Stage::Operational, &resp.answers)
            .unwrap()
            .is_empty(),
        "our target opens no negotiation"
    );
    assert!(i.unanswered().is_empty(), "{:?}", i.unanswered());
    (i, t)
}

/// The initiator's view, turned into the target's (the two data segment limits swap).
fn mirrored(mut p: SessionParams) -> SessionParams {
    std::mem::swap(
        &mut p.max_recv_data_segment_length,
        &mut p.max_xmit_data_segment_length,
    );
    p
}

#[test]
fn login_with_defaults() {
    let (i, t) = login(
        initiator_cfg(),
        NegotiationConfig {
            target_alias: Some("t".into()),
            target_portal_group_tag: Some(1),
            ..NegotiationConfig::default()
        },
    );
    assert_eq!(mirrored(i.params()), t.params());
    let p = i.params();
    assert_eq!(p.max_recv_data_segment_length, 262_144);
    assert_eq!(p.max_xmit_data_segment_length, 262_144);
    assert_eq!(p.tpgt, Some(1));
    assert_eq!(p.target_alias.as_deref(), Some("t"));
    assert_eq!(p.initiator_alias.as_deref(), Some("vm-1"));
    assert!(!p.header_digest);
}

fn digests() -> impl Strategy<Value = Vec<Digest>> {
    proptest::collection::vec(prop_oneof![Just(Digest::None), Just(Digest::Crc32c)], 0..3)
}

prop_compose! {
    fn config()(
        header_digest in digests(),
        data_digest in digests(),
        mrdsl in 0u32..20_000_000,
        mbl in 0u32..20_000_000,
        fbl in 0u32..20_000_000,
        initial_r2t: bool,
        immediate_data: bool,
        mor2t: u16,
        maxc: u16,
        t2w in 0u16..5000,
        t2r in 0u16..5000,
        pdu_order: bool,
        seq_order: bool,
        erl in 0u8..4,
        discovery: bool,
    ) -> NegotiationConfig {
        NegotiationConfig {
            header_digest,
            data_digest,
            max_recv_data_segment_length: mrdsl,
            max_burst_length: mbl,
            first_burst_length: fbl,
            initial_r2t,
            immediate_data,
            max_outstanding_r2t: mor2t,
            max_connections: maxc,
            default_time2wait: t2w,
            default_time2retain: t2r,
            data_pdu_in_order: pdu_order,
            data_sequence_in_order: seq_order,
            error_recovery_level: erl,
            session_type: if discovery { SessionType::Discovery } else { SessionType::Normal },
            initiator_name: Some(INI.into()),
            target_name: Some(TGT.into()),
            ..NegotiationConfig::default()
        }
    }
}

fn clamp_len(n: u32) -> u32 {
    n.clamp(512, (1 << 24) - 1)
}

proptest! {
    #[test]
    fn text_round_trip(pairs in proptest::collection::btree_map(
        "[A-Za-z][A-Za-z0-9.+@_-]{0,62}", "[^\u{0}]{0,60}", 0..12)) {
        let pairs: Vec<(String, String)> = pairs.into_iter().collect();
        prop_assert_eq!(parse_text(&encode_text(&pairs)).unwrap(), pairs);
    }

    #[test]
    fn parse_never_panics(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = parse_text(&data);
    }

    #[test]
    fn respond_never_panics(
        pairs in proptest::collection::vec(
            (proptest::sample::select(
                KEYS.iter().map(|d| d.name).chain(["X-y", "Foo"]).collect::<Vec<_>>()),
             "[ -~]{0,12}"),
            0..16),
        stage in prop_oneof![Just(Stage::Security), Just(Stage::Operational), Just(Stage::FullFeature)],
        leading: bool,
    ) {
        let pairs: Vec<(String, String)> =
            pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        for role in [Role::Target, Role::Initiator] {
            let mut n = Negotiation::new(role, NegotiationConfig::default());
            let _ = n.respond(stage, leading, &pairs);
            let _ = n.offers(stage, leading);
            let _ = n.accept_answers(stage, &pairs);
            let _ = n.params();
        }
    }

    /// The responder's ListSelect answer is in both lists (or Reject when there is none).
    #[test]
    fn list_select_in_both(offer in proptest::collection::vec(
            prop_oneof![Just("None"), Just("CRC32C"), Just("MD5"), Just("")], 1..4),
        ours in digests()) {
        let mut t = Negotiation::new(Role::Target, NegotiationConfig {
            header_digest: ours.clone(),
            ..NegotiationConfig::default()
        });
        t.respond(Stage::Security, true, &first_pdu()).unwrap();
        let r = t.respond(Stage::Operational, true, &kv(&[("HeaderDigest", &offer.join(","))])).unwrap();
        let a = get(&r.answers, "HeaderDigest").unwrap();
        let ours: Vec<&str> = if ours.is_empty() { vec!["None"] } else { ours.iter().map(|d| d.as_str()).collect() };
        if a == REJECT {
            prop_assert!(!offer.iter().any(|o| ours.contains(o)));
        } else {
            prop_assert!(offer.contains(&a) && ours.contains(&a));
            // And it is the originator's first supported value.
            prop_assert_eq!(Some(&a), offer.iter().find(|o| ours.contains(o)));
        }
    }

    /// Our initiator against our target: both compute the same parameters, and no result
    /// exceeds either side's limit.
    #[test]
    fn initiator_against_target(ic in config(), tc in config()) {
        let (i, t) = login(ic.clone(), tc.clone());
        let (pi, pt) = (i.params(), t.params());
        prop_assert_eq!(mirrored(pi.clone()), pt.clone());

        prop_assert_eq!(pi.max_recv_data_segment_length, clamp_len(ic.max_recv_data_segment_length));
        prop_assert_eq!(pt.max_recv_data_segment_length, clamp_len(tc.max_recv_data_segment_length));
        prop_assert_eq!(pi.session_type, ic.session_type);
        let discovery = ic.session_type == SessionType::Discovery;
        if discovery {
            prop_assert_eq!(pi.max_burst_length, 262_144);
        } else {
            prop_assert!(pi.max_burst_length <= clamp_len(ic.max_burst_length));
            prop_assert!(pi.max_burst_length <= clamp_len(tc.max_burst_length));
            prop_assert!(pi.max_outstanding_r2t <= ic.max_outstanding_r2t.max(1));
            prop_assert!(pi.max_outstanding_r2t <= tc.max_outstanding_r2t.max(1));
            prop_assert_eq!(pi.initial_r2t, ic.initial_r2t || tc.initial_r2t);
            prop_assert_eq!(pi.immediate_data, ic.immediate_data && tc.immediate_data);
            prop_assert_eq!(pi.data_pdu_in_order, ic.data_pdu_in_order || tc.data_pdu_in_order);
            let fbl_relevant = !pi.initial_r2t || pi.immediate_data;
            if fbl_relevant {
                prop_assert!(pi.first_burst_length <= clamp_len(ic.first_burst_length));
                prop_assert!(pi.first_burst_length <= clamp_len(tc.first_burst_length));
            }
        }
        prop_assert!(pi.first_burst_length <= pi.max_burst_length);
        prop_assert!(pi.max_connections <= ic.max_connections.max(1));
        prop_assert!(pi.max_connections <= tc.max_connections.max(1));
        prop_assert!(u64::from(pi.error_recovery_level) <= u64::from(ic.error_recovery_level.min(2)));
        prop_assert!(u64::from(pi.error_recovery_level) <= u64::from(tc.error_recovery_level.min(2)));
        prop_assert!(pi.default_time2wait >= ic.default_time2wait.min(3600));
        prop_assert!(pi.default_time2wait >= tc.default_time2wait.min(3600));
        prop_assert!(pi.default_time2retain <= ic.default_time2retain.min(3600));
        prop_assert!(pi.default_time2retain <= tc.default_time2retain.min(3600));
        let allows = |list: &[Digest], d: Digest| list.contains(&d) || (list.is_empty() && d == Digest::None);
        let hd = if pi.header_digest { Digest::Crc32c } else { Digest::None };
        let dd = if pi.data_digest { Digest::Crc32c } else { Digest::None };
        let hd_common = [Digest::None, Digest::Crc32c].iter().any(|&d| allows(&ic.header_digest, d) && allows(&tc.header_digest, d));
        if hd_common {
            prop_assert!(allows(&ic.header_digest, hd) && allows(&tc.header_digest, hd));
        }
        let dd_common = [Digest::None, Digest::Crc32c].iter().any(|&d| allows(&ic.data_digest, d) && allows(&tc.data_digest, d));
        if dd_common {
            prop_assert!(allows(&ic.data_digest, dd) && allows(&tc.data_digest, dd));
        }
    }
}
