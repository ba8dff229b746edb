//! The initiator's login as conversations in memory: against the real target role
//! ([`TargetConnection`]) for whole logins, and against hand-built Login Responses for what
//! our target never sends (redirection, continuation, protocol violations).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use iscsi_wire::*;
use proptest::prelude::*;

use super::{InitiatorLogin, LOGIN_ITT};
use crate::chap::{AuthError, ChapAlgorithm, Credentials};
use crate::initiator::{ChapConfig, LoginConfig, LoginError, LoginResult, LoginStep};
use crate::keys::{self, Digest, Negotiation, NegotiationConfig, NegotiationError, Role};
use crate::keys::{SessionType, Stage as KeyStage};
use crate::target::{AuthPolicy, Event, PortalConfig, TargetConnection, TargetEntry};
use crate::OutPdu;

const TARGET: &str = "iqn.2024-01.test:disk";
const INITIATOR: &str = "iqn.2024-01.test:init";
const ISID: Isid = Isid(0x23d0_0000_0001);
/// The TSIH our pretend driver gives new sessions.
const TSIH: u16 = 0x42;

const INITIATOR_SECRET: &[u8] = b"initiator-secret-1";
const TARGET_SECRET: &[u8] = b"target-secret-22";

fn portal(auth: AuthPolicy) -> PortalConfig {
    PortalConfig {
        targets: vec![TargetEntry {
            name: TARGET.into(),
            alias: None,
            auth,
            allowed_initiators: Vec::new(),
        }],
        discovery_auth: AuthPolicy::default(),
        negotiation: NegotiationConfig::default(),
        portal_group_tag: 1,
        addresses: vec!["127.0.0.1:3260,1".into()],
        command_window: 32,
        nop_in_interval: Some(Duration::from_secs(5)),
        nop_in_timeout: Duration::from_secs(5),
    }
}

fn chap_portal(algorithms: Vec<ChapAlgorithm>, mutual: bool) -> PortalConfig {
    portal(AuthPolicy {
        initiators: vec![Credentials::new("init-user", INITIATOR_SECRET)],
        target: mutual.then(|| Credentials::new("target-user", TARGET_SECRET)),
        algorithms,
    })
}

fn config() -> LoginConfig {
    LoginConfig {
        initiator_name: INITIATOR.into(),
        initiator_alias: Some("test initiator".into()),
        isid: ISID,
        tsih: 0,
        cid: 1,
        session_type: SessionType::Normal,
        chap: None,
        negotiation: NegotiationConfig {
            target_name: Some(TARGET.into()),
            ..NegotiationConfig::default()
        },
        cmd_sn: 10,
        exp_stat_sn: 0,
    }
}

fn chap_config(algorithms: Vec<ChapAlgorithm>, mutual: Option<&[u8]>) -> LoginConfig {
    LoginConfig {
        chap: Some(ChapConfig {
            credentials: Credentials::new("init-user", INITIATOR_SECRET),
            target: mutual.map(|s| Credentials::new("target-user", s)),
            algorithms,
        }),
        ..config()
    }
}

/// Passes a PDU through wire encoding and the framer, as a socket would.
fn wire(out: &OutPdu) -> Result<RawPdu, PduError> {
    let mut buf = Vec::new();
    encode_pdu(&out.bhs, &[], &out.data, FrameLimits::default(), &mut buf);
    let mut buf = BytesMut::from(&buf[..]);
    let limits = FrameLimits {
        max_recv_data_segment_len: 1 << 20,
        ..FrameLimits::default()
    };
    let pdu = FrameDecoder::new(limits)
        .decode(&mut buf)
        .expect("framing")
        .expect("a whole PDU");
    assert!(buf.is_empty());
    pdu
}

fn login_request(out: &OutPdu) -> LoginRequest {
    match Header::parse(&out.bhs) {
        Ok(Header::LoginRequest(r)) => r,
        other => panic!("expected a Login Request, got {other:?}"),
    }
}

fn pairs(data: &[u8]) -> Vec<(String, String)> {
    keys::parse_text(data).expect("valid text")
}

fn value<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// What a conversation with the target role produced.
struct Conversation {
    result: Result<LoginResult, LoginError>,
    /// Our Login Requests in order.
    requests: Vec<(LoginRequest, Bytes)>,
    /// The target's Login Responses in order.
    responses: Vec<(LoginResponse, Bytes)>,
    target: TargetConnection,
}

/// Runs a whole login against [`TargetConnection`], placing the session with [`TSIH`].
fn converse(portal: PortalConfig, config: LoginConfig) -> Conversation {
    let now = Instant::now();
    let mut target = TargetConnection::new(Arc::new(portal));
    let mut login = InitiatorLogin::new(config);
    let mut next = login.start();
    let mut requests = Vec::new();
    let mut responses = Vec::new();
    for _ in 0..32 {
        requests.push((login_request(&next), next.data.clone()));
        target.handle_pdu(wire(&next), now);
        while let Some(event) = target.poll_event() {
            if let Event::SessionRequested(req) = event {
                target.accept_session(if req.tsih == 0 { TSIH } else { req.tsih });
            }
        }
        let out: Vec<OutPdu> = std::iter::from_fn(|| target.poll_transmit()).collect();
        assert_eq!(out.len(), 1, "one Login Response per Login Request");
        let Ok(Header::LoginResponse(r)) = Header::parse(&out[0].bhs) else {
            panic!("target sent {out:?}")
        };
        responses.push((r, out[0].data.clone()));
        let step = login.handle_pdu(wire(&out[0]), now);
        match step {
            Ok(LoginStep::Send(o)) => next = o,
            Ok(LoginStep::Done(result)) => {
                assert!(login.is_finished());
                assert!(login.is_authenticated(), "authenticated after the login");
                assert_eq!(login.stage(), Stage::FullFeaturePhase);
                return Conversation {
                    result: Ok(*result),
                    requests,
                    responses,
                    target,
                };
            }
            Err(e) => {
                assert!(login.is_finished());
                return Conversation {
                    result: Err(e),
                    requests,
                    responses,
                    target,
                };
            }
        }
    }
    panic!("login did not finish in 32 exchanges")
}

/// A Login Response to our login, successful, in `csg`, without T or C.
fn response(csg: Stage) -> LoginResponse {
    LoginResponse {
        csg: csg.bits(),
        isid: ISID,
        itt: LOGIN_ITT,
        stat_sn: 1,
        exp_cmd_sn: 10,
        max_cmd_sn: 20,
        ..LoginResponse::default()
    }
}

fn raw(bhs: Bhs, data: &[u8]) -> Result<RawPdu, PduError> {
    let mut bhs = bhs;
    bhs.set_data_segment_len(data.len() as u32);
    Ok(RawPdu {
        bhs,
        ahs: Bytes::new(),
        data: Bytes::copy_from_slice(data),
    })
}

fn feed(
    login: &mut InitiatorLogin,
    resp: &LoginResponse,
    data: &[u8],
) -> Result<LoginStep, LoginError> {
    login.handle_pdu(raw(resp.to_bhs(), data), Instant::now())
}

fn sent(step: Result<LoginStep, LoginError>) -> OutPdu {
    match step {
        Ok(LoginStep::Send(o)) => o,
        other => panic!("expected a Login Request, got {other:?}"),
    }
}

fn text(pairs: &[(&str, &str)]) -> Vec<u8> {
    keys::encode_text(pairs)
}

// ---------------------------------------------------------------------------------------------
// Whole logins against the target role
// ---------------------------------------------------------------------------------------------

#[test]
fn plain_login_reaches_full_feature() {
    let c = converse(portal(AuthPolicy::default()), config());
    let r = c.result.expect("login succeeds");
    assert!(c.target.is_full_feature());
    assert_eq!(r.tsih, TSIH);
    assert_eq!(r.isid, ISID);
    assert_eq!(r.cid, 1);
    assert_eq!(r.cmd_sn, 10);
    assert_eq!(r.target_portal_group_tag, Some(1));
    assert_eq!(r.params.target_name.as_deref(), Some(TARGET));
    assert_eq!(r.params.session_type, SessionType::Normal);
    assert_eq!(r.params.max_xmit_data_segment_length, 262_144);
    assert!(!r.params.header_digest && !r.params.data_digest);
    assert_eq!(r.authenticated_target, None);
    assert!(!r.weak_secret);
    // The final response's numbers.
    let (last, _) = c.responses.last().unwrap();
    assert_eq!(r.exp_stat_sn, last.stat_sn.wrapping_add(1));
    assert_eq!(
        (r.exp_cmd_sn, r.max_cmd_sn),
        (last.exp_cmd_sn, last.max_cmd_sn)
    );
    assert_eq!(c.target.params().max_xmit_data_segment_length, 262_144);

    // Two requests: security with AuthMethod=None and T=1, then operational to full feature.
    assert_eq!(c.requests.len(), 2);
    let (first, data) = &c.requests[0];
    let first_keys = pairs(data);
    assert_eq!(value(&first_keys, "InitiatorName"), Some(INITIATOR));
    assert_eq!(value(&first_keys, "TargetName"), Some(TARGET));
    assert_eq!(value(&first_keys, "SessionType"), Some("Normal"));
    assert_eq!(value(&first_keys, "InitiatorAlias"), Some("test initiator"));
    assert_eq!(value(&first_keys, "AuthMethod"), Some("None"));
    assert!((first.transit, first.csg, first.nsg) == (true, 0, 1));
    let (second, data) = &c.requests[1];
    assert!((second.transit, second.csg, second.nsg) == (true, 1, 3));
    let op_keys = pairs(data);
    assert_eq!(value(&op_keys, "HeaderDigest"), Some("None,CRC32C"));
    assert_eq!(value(&op_keys, "MaxRecvDataSegmentLength"), Some("262144"));
    assert_eq!(value(&op_keys, "InitiatorName"), None, "declared once");

    // Header fields of every request.
    for (i, (req, _)) in c.requests.iter().enumerate() {
        assert!(!req.continue_);
        assert_eq!((req.version_max, req.version_min), (0, 0));
        assert_eq!(
            (req.isid, req.tsih, req.itt, req.cid),
            (ISID, 0, LOGIN_ITT, 1)
        );
        assert_eq!(req.cmd_sn, 10, "login requests are immediate");
        let exp = if i == 0 {
            0
        } else {
            c.responses[i - 1].0.stat_sn.wrapping_add(1)
        };
        assert_eq!(req.exp_stat_sn, exp);
    }
}

#[test]
fn requests_have_the_immediate_bit_and_a_consistent_length() {
    let mut login = InitiatorLogin::new(config());
    let out = login.start();
    assert!(out.bhs.immediate());
    assert_eq!(out.bhs.opcode(), Opcode::LOGIN_REQUEST);
    assert_eq!(out.bhs.data_segment_len() as usize, out.data.len());
    // start() again gives the same request, not a second set of declarations.
    assert_eq!(login.start().data, out.data);
}

#[test]
fn exp_stat_sn_and_tsih_come_from_the_config() {
    let cfg = LoginConfig {
        exp_stat_sn: 77,
        tsih: 9,
        ..config()
    };
    let c = converse(portal(AuthPolicy::default()), cfg);
    let r = c.result.expect("login succeeds");
    assert_eq!(c.requests[0].0.exp_stat_sn, 77);
    assert!(c.requests.iter().all(|(req, _)| req.tsih == 9));
    assert_eq!(r.tsih, 9);
    assert_eq!(r.exp_stat_sn, 79);
}

#[test]
fn discovery_login() {
    let cfg = LoginConfig {
        session_type: SessionType::Discovery,
        ..config()
    };
    let c = converse(portal(AuthPolicy::default()), cfg);
    let r = c.result.expect("discovery login succeeds");
    assert_eq!(r.params.session_type, SessionType::Discovery);
    assert_eq!(r.params.target_name, None);
    let first = pairs(&c.requests[0].1);
    assert_eq!(value(&first, "SessionType"), Some("Discovery"));
    assert_eq!(
        value(&first, "TargetName"),
        None,
        "no TargetName in discovery"
    );
    // Keys irrelevant to discovery are not offered.
    let op = pairs(&c.requests[1].1);
    assert_eq!(value(&op, "InitialR2T"), None);
    assert_eq!(value(&op, "MaxBurstLength"), None);
}

#[test]
fn one_way_chap_with_the_default_algorithm_list() {
    let c = converse(
        chap_portal(Vec::new(), false),
        chap_config(Vec::new(), None),
    );
    let r = c.result.expect("CHAP login succeeds");
    assert_eq!(r.authenticated_target, None);
    assert!(!r.weak_secret);
    let offered: Vec<Vec<(String, String)>> = c.requests.iter().map(|(_, d)| pairs(d)).collect();
    assert_eq!(value(&offered[0], "AuthMethod"), Some("CHAP,None"));
    assert!(
        !c.requests[0].0.transit,
        "not ready to leave security before CHAP"
    );
    assert_eq!(value(&offered[1], "CHAP_A"), Some("8,7,6,5"));
    assert!(!c.requests[1].0.transit);
    assert_eq!(value(&offered[2], "CHAP_N"), Some("init-user"));
    assert!(value(&offered[2], "CHAP_R").is_some());
    assert!(
        value(&offered[2], "CHAP_C").is_none(),
        "one-way: no challenge"
    );
    let third = &c.requests[2].0;
    assert!((third.transit, third.csg, third.nsg) == (true, 0, 1));
    assert_eq!(c.requests[3].0.csg, 1);
    assert_eq!(c.requests.len(), 4);
}

#[test]
fn one_way_chap_with_md5_only() {
    let c = converse(
        chap_portal(Vec::new(), false),
        chap_config(vec![ChapAlgorithm::MD5], None),
    );
    c.result.expect("CHAP login with MD5 succeeds");
    assert_eq!(value(&pairs(&c.requests[1].1), "CHAP_A"), Some("5"));
    assert_eq!(value(&pairs(&c.responses[1].1), "CHAP_A"), Some("5"));
}

#[test]
fn one_way_chap_against_a_target_limited_to_md5() {
    let c = converse(
        chap_portal(vec![ChapAlgorithm::MD5], false),
        chap_config(Vec::new(), None),
    );
    c.result.expect("the target picks MD5 from our list");
    assert_eq!(value(&pairs(&c.responses[1].1), "CHAP_A"), Some("5"));
}

#[test]
fn chap_offer_answered_with_none_by_a_target_without_auth() {
    let c = converse(portal(AuthPolicy::default()), chap_config(Vec::new(), None));
    let r = c.result.expect("login succeeds without CHAP");
    assert_eq!(r.authenticated_target, None);
    // AuthMethod=None came back with T=0: we ask to transit in an empty request.
    let (second, data) = &c.requests[1];
    assert!((second.transit, second.csg, second.nsg) == (true, 0, 1));
    assert!(pairs(data).is_empty());
}

#[test]
fn mutual_chap_succeeds() {
    let c = converse(
        chap_portal(Vec::new(), true),
        chap_config(Vec::new(), Some(TARGET_SECRET)),
    );
    let r = c.result.expect("mutual CHAP login succeeds");
    assert_eq!(r.authenticated_target.as_deref(), Some("target-user"));
    assert_eq!(value(&pairs(&c.requests[0].1), "AuthMethod"), Some("CHAP"));
    // Our response and challenge go with T=1; the target's proof comes with its transit.
    let (req, data) = &c.requests[2];
    let keys = pairs(data);
    assert!(value(&keys, "CHAP_C").is_some() && value(&keys, "CHAP_I").is_some());
    assert!((req.transit, req.nsg) == (true, 1));
    let (resp, data) = &c.responses[2];
    assert!(resp.transit && resp.csg == 0 && resp.nsg == 1);
    assert_eq!(value(&pairs(data), "CHAP_N"), Some("target-user"));
}

/// Found by fuzzing: the final response took the authentication outcome out of the login to
/// build the result, so `is_authenticated` turned false exactly when the login succeeded.
#[test]
fn still_authenticated_after_the_login_succeeded() {
    for (portal, config, mutual) in [
        (portal(AuthPolicy::default()), config(), false),
        (
            chap_portal(Vec::new(), false),
            chap_config(Vec::new(), None),
            false,
        ),
        (
            chap_portal(Vec::new(), true),
            chap_config(Vec::new(), Some(TARGET_SECRET)),
            true,
        ),
    ] {
        let now = Instant::now();
        let mut target = TargetConnection::new(Arc::new(portal));
        let mut login = InitiatorLogin::new(config);
        let mut next = login.start();
        let result = loop {
            target.handle_pdu(wire(&next), now);
            while let Some(event) = target.poll_event() {
                if let Event::SessionRequested(_) = event {
                    target.accept_session(TSIH);
                }
            }
            let out = target.poll_transmit().expect("a Login Response");
            match login.handle_pdu(wire(&out), now).expect("login succeeds") {
                LoginStep::Send(o) => next = o,
                LoginStep::Done(r) => break r,
            }
        };
        assert!(login.is_finished());
        assert!(login.is_authenticated());
        // The outcome still reaches the result.
        let want = mutual.then_some("target-user");
        assert_eq!(result.authenticated_target.as_deref(), want);
    }
}

#[test]
fn weak_secret_is_reported() {
    let portal = portal(AuthPolicy {
        initiators: vec![Credentials::new("init-user", b"short".to_vec())],
        target: None,
        algorithms: Vec::new(),
    });
    let mut cfg = chap_config(Vec::new(), None);
    if let Some(chap) = cfg.chap.as_mut() {
        chap.credentials = Credentials::new("init-user", b"short".to_vec());
    }
    let r = converse(portal, cfg).result.expect("login succeeds");
    assert!(r.weak_secret);
}

#[test]
fn wrong_initiator_secret_is_refused() {
    let mut cfg = chap_config(Vec::new(), None);
    if let Some(chap) = cfg.chap.as_mut() {
        chap.credentials = Credentials::new("init-user", b"not-the-secret!!".to_vec());
    }
    let c = converse(chap_portal(Vec::new(), false), cfg);
    match c.result {
        Err(LoginError::Refused { status }) => {
            assert_eq!(status, LoginStatus::AUTHENTICATION_FAILURE)
        }
        Err(LoginError::Auth(_)) => {}
        other => panic!("expected an authentication failure, got {other:?}"),
    }
    assert!(!c.target.is_full_feature());
}

#[test]
fn wrong_target_secret_fails_mutual_chap() {
    let c = converse(
        chap_portal(Vec::new(), true),
        chap_config(Vec::new(), Some(b"some-other-secret")),
    );
    assert_eq!(
        c.result.unwrap_err(),
        LoginError::Auth(AuthError::BadResponse)
    );
}

#[test]
fn mutual_chap_against_a_target_without_credentials_fails() {
    // The target authenticates us but has no credentials of its own to prove itself.
    let c = converse(
        chap_portal(Vec::new(), false),
        chap_config(Vec::new(), Some(TARGET_SECRET)),
    );
    assert!(
        matches!(
            c.result,
            Err(LoginError::Auth(_) | LoginError::Refused { .. })
        ),
        "{:?}",
        c.result
    );
}

#[test]
fn digests_are_negotiated() {
    let mut cfg = config();
    cfg.negotiation.header_digest = vec![Digest::Crc32c];
    cfg.negotiation.data_digest = vec![Digest::Crc32c];
    let c = converse(portal(AuthPolicy::default()), cfg);
    let r = c.result.expect("login succeeds");
    assert!(r.params.header_digest && r.params.data_digest);
    assert!(c.target.params().header_digest && c.target.params().data_digest);
}

#[test]
fn unknown_target_is_refused() {
    let mut cfg = config();
    cfg.negotiation.target_name = Some("iqn.2024-01.test:nope".into());
    let c = converse(portal(AuthPolicy::default()), cfg);
    let err = c.result.unwrap_err();
    assert_eq!(
        err,
        LoginError::Refused {
            status: LoginStatus::NOT_FOUND
        }
    );
    assert!(!err.is_transient());
}

// ---------------------------------------------------------------------------------------------
// Hand-built responses
// ---------------------------------------------------------------------------------------------

#[test]
fn redirection_gives_the_address_without_tpgt() {
    let cases: [(&str, u16, &str, bool); 4] = [
        ("10.0.0.2:3261,1", 0x0101, "10.0.0.2:3261", false),
        ("[fe80::1]:3260,2", 0x0102, "[fe80::1]:3260", true),
        ("storage.example", 0x0101, "storage.example", false),
        ("storage.example,7", 0x0102, "storage.example", true),
    ];
    for (target_address, status, address, permanent) in cases {
        let mut login = InitiatorLogin::new(config());
        login.start();
        let resp = LoginResponse {
            status: LoginStatus(status),
            ..response(Stage::SecurityNegotiation)
        };
        let err = feed(
            &mut login,
            &resp,
            &text(&[("TargetAddress", target_address)]),
        )
        .unwrap_err();
        assert_eq!(
            err,
            LoginError::Redirected {
                address: address.into(),
                permanent
            }
        );
        assert!(login.is_finished());
    }
}

#[test]
fn redirection_without_an_address_is_a_protocol_error() {
    let mut login = InitiatorLogin::new(config());
    login.start();
    let resp = LoginResponse {
        status: LoginStatus::TARGET_MOVED_TEMPORARILY,
        ..response(Stage::SecurityNegotiation)
    };
    assert!(matches!(
        feed(&mut login, &resp, &[]),
        Err(LoginError::Protocol(_))
    ));
}

#[test]
fn class_2_and_3_statuses_are_refusals() {
    for status in [
        LoginStatus::AUTHORIZATION_FAILURE,
        LoginStatus::OUT_OF_RESOURCES,
        LoginStatus(0x0477),
    ] {
        let mut login = InitiatorLogin::new(config());
        login.start();
        let resp = LoginResponse {
            status,
            ..response(Stage::SecurityNegotiation)
        };
        let err = feed(&mut login, &resp, &[]).unwrap_err();
        assert_eq!(err, LoginError::Refused { status });
        assert_eq!(err.is_transient(), status.class() == 3);
    }
}

/// The target's answers to our operational offers, as a target-role negotiation with
/// `config` would give them.
fn operational_answers(offers: &[u8], config: NegotiationConfig) -> Vec<u8> {
    let mut target = Negotiation::new(Role::Target, config);
    let identity = [
        ("InitiatorName".to_owned(), INITIATOR.to_owned()),
        ("TargetName".to_owned(), TARGET.to_owned()),
    ];
    target
        .respond(KeyStage::Security, true, &identity)
        .expect("identity accepted");
    let answers = target
        .respond(KeyStage::Operational, true, &pairs(offers))
        .expect("our offers are valid");
    keys::encode_text(&answers.answers)
}

#[test]
fn continued_response_text_is_gathered() {
    let mut login = InitiatorLogin::new(config());
    login.start();
    // The first response comes in two parts, split inside a pair.
    let whole = text(&[("TargetPortalGroupTag", "3"), ("AuthMethod", "None")]);
    let (a, b) = whole.split_at(27);
    let part = LoginResponse {
        continue_: true,
        ..response(Stage::SecurityNegotiation)
    };
    let ack = sent(feed(&mut login, &part, a));
    let ack_req = login_request(&ack);
    assert!(ack.data.is_empty());
    assert!(!ack_req.transit && !ack_req.continue_);
    assert_eq!(ack_req.csg, 0);
    assert_eq!(ack_req.exp_stat_sn, 2);
    let last = LoginResponse {
        transit: true,
        nsg: 1,
        stat_sn: 2,
        ..response(Stage::SecurityNegotiation)
    };
    let op = sent(feed(&mut login, &last, b));
    let op_req = login_request(&op);
    assert!((op_req.transit, op_req.csg, op_req.nsg) == (true, 1, 3));
    assert_eq!(login.stage(), Stage::LoginOperationalNegotiation);

    // tgt's style: HeaderDigest=CRC32C to our None,CRC32C.
    let answers = operational_answers(
        &op.data,
        NegotiationConfig {
            header_digest: vec![Digest::Crc32c],
            ..NegotiationConfig::default()
        },
    );
    let fin = LoginResponse {
        transit: true,
        nsg: 3,
        tsih: 5,
        stat_sn: 3,
        ..response(Stage::LoginOperationalNegotiation)
    };
    let Ok(LoginStep::Done(r)) = feed(&mut login, &fin, &answers) else {
        panic!("expected the end of login")
    };
    assert_eq!(r.target_portal_group_tag, Some(3));
    assert!(r.params.header_digest);
    assert!(!r.params.data_digest);
    assert_eq!((r.tsih, r.exp_stat_sn), (5, 4));
    assert_eq!((r.exp_cmd_sn, r.max_cmd_sn), (10, 20));
}

#[test]
fn operational_response_without_transit_gets_another_request() {
    let mut login = InitiatorLogin::new(config());
    login.start();
    let to_op = LoginResponse {
        transit: true,
        nsg: 1,
        ..response(Stage::SecurityNegotiation)
    };
    let op = sent(feed(&mut login, &to_op, &text(&[("AuthMethod", "None")])));
    let answers = operational_answers(&op.data, NegotiationConfig::default());
    // The target answers everything but holds the transit back, and offers a key of its own.
    let mut partial = answers.clone();
    partial.extend(text(&[("X-vendor-thing", "1")]));
    let again = sent(feed(
        &mut login,
        &response(Stage::LoginOperationalNegotiation),
        &partial,
    ));
    let req = login_request(&again);
    assert!((req.transit, req.csg, req.nsg) == (true, 1, 3));
    assert_eq!(
        pairs(&again.data),
        vec![("X-vendor-thing".to_owned(), "NotUnderstood".to_owned())]
    );
    let fin = LoginResponse {
        transit: true,
        nsg: 3,
        tsih: 5,
        ..response(Stage::LoginOperationalNegotiation)
    };
    assert!(matches!(
        feed(&mut login, &fin, &[]),
        Ok(LoginStep::Done(_))
    ));
}

#[test]
fn long_request_text_is_sent_in_parts() {
    let mut login = InitiatorLogin::new(config());
    login.start();
    // 600 unknown keys: our NotUnderstood answers do not fit in 8192 bytes.
    let unknown: Vec<(String, String)> = (0..600)
        .map(|i| (format!("X-vendor-key-{i:04}"), "v".to_owned()))
        .collect();
    let mut data = text(&[("AuthMethod", "None")]);
    data.extend(keys::encode_text(&unknown));
    let mut parts = vec![sent(feed(
        &mut login,
        &response(Stage::SecurityNegotiation),
        &data,
    ))];
    while login_request(parts.last().unwrap()).continue_ {
        let last = parts.last().unwrap();
        assert_eq!(last.data.len(), 8192);
        assert!(!login_request(last).transit);
        parts.push(sent(feed(
            &mut login,
            &response(Stage::SecurityNegotiation),
            &[],
        )));
    }
    assert_eq!(parts.len(), 3);
    let last = login_request(parts.last().unwrap());
    assert!((last.transit, last.csg, last.nsg) == (true, 0, 1));
    let whole: Vec<u8> = parts.iter().flat_map(|p| p.data.to_vec()).collect();
    let answered = pairs(&whole);
    assert_eq!(answered.len(), 600);
    assert!(answered.iter().all(|(_, v)| v == "NotUnderstood"));
}

#[test]
fn keys_in_the_acknowledgement_of_a_partial_request_are_refused() {
    let mut login = InitiatorLogin::new(config());
    login.start();
    let unknown: Vec<(String, String)> = (0..600)
        .map(|i| (format!("X-vendor-key-{i:04}"), "v".to_owned()))
        .collect();
    let part = sent(feed(
        &mut login,
        &response(Stage::SecurityNegotiation),
        &keys::encode_text(&unknown),
    ));
    assert!(login_request(&part).continue_);
    let err = feed(
        &mut login,
        &response(Stage::SecurityNegotiation),
        &text(&[("AuthMethod", "None")]),
    );
    assert!(matches!(err, Err(LoginError::Protocol(_))));
}

#[test]
fn garbage_responses_are_errors() {
    fn fresh(chap: bool) -> InitiatorLogin {
        let cfg = if chap {
            chap_config(Vec::new(), None)
        } else {
            config()
        };
        let mut login = InitiatorLogin::new(cfg);
        login.start();
        login
    }
    let now = Instant::now();
    let sec = response(Stage::SecurityNegotiation);
    let protocol = |r: Result<LoginStep, LoginError>| matches!(r, Err(LoginError::Protocol(_)));

    // Not a Login Response.
    let nop = NopIn {
        itt: LOGIN_ITT,
        ..NopIn::default()
    };
    assert!(protocol(
        fresh(false).handle_pdu(raw(nop.to_bhs(), &[]), now)
    ));
    let reject = Reject {
        reason: RejectReason::PROTOCOL_ERROR,
        ..Reject::default()
    };
    assert!(protocol(
        fresh(false).handle_pdu(raw(reject.to_bhs(), &[]), now)
    ));
    let mut unknown = Bhs::default();
    unknown.0[0] = 0x3a;
    assert!(protocol(fresh(false).handle_pdu(raw(unknown, &[]), now)));
    // A framing complaint.
    let complaint = PduError::DataSegmentTooLong {
        bhs: sec.to_bhs(),
        len: 1 << 20,
        max: 8192,
    };
    assert!(protocol(fresh(false).handle_pdu(Err(complaint), now)));
    // Wrong ITT, version, ISID, stage.
    for bad in [
        LoginResponse {
            itt: 7,
            ..sec.clone()
        },
        LoginResponse {
            version_active: 1,
            ..sec.clone()
        },
        LoginResponse {
            isid: Isid(1),
            ..sec.clone()
        },
        response(Stage::LoginOperationalNegotiation),
        LoginResponse {
            csg: 2,
            ..sec.clone()
        },
    ] {
        assert!(protocol(feed(
            &mut fresh(false),
            &bad,
            &text(&[("AuthMethod", "None")])
        )));
    }
    // Bad text.
    for data in [
        &b"novalue\0"[..],
        b"=x\0",
        b"A=1\0\0B=2\0",
        b"\xff\xfe=1",
        b"A=1\0A=1\0",
    ] {
        assert!(protocol(feed(&mut fresh(false), &sec, data)));
    }
    // T and C together.
    let tc = LoginResponse {
        transit: true,
        continue_: true,
        nsg: 1,
        ..sec.clone()
    };
    assert!(protocol(feed(&mut fresh(false), &tc, &[])));
    // An invalid next stage.
    for nsg in [0, 2] {
        let r = LoginResponse {
            transit: true,
            nsg,
            ..sec.clone()
        };
        assert!(protocol(feed(
            &mut fresh(false),
            &r,
            &text(&[("AuthMethod", "None")])
        )));
    }
    // Keys that break negotiation.
    let err = feed(
        &mut fresh(false),
        &sec,
        &text(&[("InitiatorName", "iqn.x:y")]),
    );
    assert!(matches!(err, Err(LoginError::Negotiation(_))), "{err:?}");
    let err = feed(&mut fresh(false), &sec, &text(&[("AuthMethod", "Reject")]));
    assert_eq!(
        err.unwrap_err(),
        LoginError::Auth(AuthError::NoCommonMethod)
    );
    let err = feed(&mut fresh(false), &sec, &text(&[("AuthMethod", "CHAP")]));
    assert!(matches!(err, Err(LoginError::Auth(_))), "{err:?}");
    let err = feed(&mut fresh(false), &sec, &text(&[("CHAP_A", "5")]));
    assert!(matches!(err, Err(LoginError::Auth(_))), "{err:?}");
    let err = feed(&mut fresh(true), &sec, &text(&[("AuthMethod", "KRB5")]));
    assert!(matches!(err, Err(LoginError::Auth(_))), "{err:?}");

    // After an error, nothing more is accepted.
    let mut login = fresh(false);
    assert!(protocol(feed(
        &mut login,
        &LoginResponse {
            itt: 9,
            ..sec.clone()
        },
        &[]
    )));
    assert!(protocol(feed(
        &mut login,
        &sec,
        &text(&[("AuthMethod", "None")])
    )));
    // Before start, nothing is accepted either.
    let mut idle = InitiatorLogin::new(config());
    assert!(protocol(feed(&mut idle, &sec, &[])));
}

#[test]
fn target_cannot_skip_chap() {
    // We offered CHAP with T=0: a response that jumps to full feature phase is refused.
    let mut login = InitiatorLogin::new(chap_config(Vec::new(), None));
    login.start();
    let jump = LoginResponse {
        transit: true,
        nsg: 3,
        tsih: 5,
        ..response(Stage::SecurityNegotiation)
    };
    let err = feed(&mut login, &jump, &text(&[("AuthMethod", "CHAP")])).unwrap_err();
    assert!(matches!(err, LoginError::Protocol(_)), "{err:?}");
    assert!(!login.is_authenticated());
}

/// A mutual CHAP login run against the real target until our response and challenge are
/// ready to go (the target's proof is all that is missing).
fn mutual_until_our_challenge() -> InitiatorLogin {
    let now = Instant::now();
    let mut target = TargetConnection::new(Arc::new(chap_portal(Vec::new(), true)));
    let mut login = InitiatorLogin::new(chap_config(Vec::new(), Some(TARGET_SECRET)));
    let mut next = login.start();
    while value(&pairs(&next.data), "CHAP_C").is_none() {
        target.handle_pdu(wire(&next), now);
        let out = target.poll_transmit().expect("a Login Response");
        next = sent(login.handle_pdu(wire(&out), now));
    }
    assert!(!login.is_authenticated());
    login
}

#[test]
fn target_must_prove_itself_before_leaving_security() {
    for nsg in [1, 3] {
        let mut login = mutual_until_our_challenge();
        let forged = LoginResponse {
            transit: true,
            nsg,
            tsih: 5,
            stat_sn: 9,
            ..response(Stage::SecurityNegotiation)
        };
        let err = feed(&mut login, &forged, &[]).unwrap_err();
        assert_eq!(err, LoginError::Auth(AuthError::MissingKey("CHAP_N")));
    }
    // A proof that does not verify.
    let mut login = mutual_until_our_challenge();
    let forged = LoginResponse {
        transit: true,
        nsg: 1,
        ..response(Stage::SecurityNegotiation)
    };
    let proof = text(&[
        ("CHAP_N", "target-user"),
        ("CHAP_R", "0x00112233445566778899aabbccddeeff"),
    ]);
    let err = feed(&mut login, &forged, &proof).unwrap_err();
    assert_eq!(err, LoginError::Auth(AuthError::BadResponse));
}

#[test]
fn a_final_response_must_answer_every_offer_and_carry_a_tsih() {
    fn at_operational() -> (InitiatorLogin, OutPdu) {
        let mut login = InitiatorLogin::new(config());
        login.start();
        let to_op = LoginResponse {
            transit: true,
            nsg: 1,
            ..response(Stage::SecurityNegotiation)
        };
        let op = sent(feed(&mut login, &to_op, &text(&[("AuthMethod", "None")])));
        (login, op)
    }
    let fin = LoginResponse {
        transit: true,
        nsg: 3,
        tsih: 5,
        ..response(Stage::LoginOperationalNegotiation)
    };
    // No answers at all.
    let (mut login, _) = at_operational();
    assert!(matches!(
        feed(&mut login, &fin, &[]),
        Err(LoginError::Protocol(_))
    ));
    // All answers but no TSIH for the new session.
    let (mut login, op) = at_operational();
    let answers = operational_answers(&op.data, NegotiationConfig::default());
    let no_tsih = LoginResponse {
        tsih: 0,
        ..fin.clone()
    };
    assert!(matches!(
        feed(&mut login, &no_tsih, &answers),
        Err(LoginError::Protocol(_))
    ));
    // An answer that breaks the result function (MaxBurstLength above our offer).
    let (mut login, _) = at_operational();
    let err = feed(&mut login, &fin, &text(&[("MaxBurstLength", "16776192")])).unwrap_err();
    assert!(matches!(
        err,
        LoginError::Negotiation(NegotiationError::InvalidAnswer { .. })
    ));
    // An offer of the target's own in the final response cannot be answered.
    let (mut login, op) = at_operational();
    let mut answers = operational_answers(&op.data, NegotiationConfig::default());
    answers.extend(text(&[("OFMarker", "Yes")]));
    assert!(matches!(
        feed(&mut login, &fin, &answers),
        Err(LoginError::Protocol(_))
    ));
    // Auth keys in the operational stage.
    let (mut login, op) = at_operational();
    let mut answers = operational_answers(&op.data, NegotiationConfig::default());
    answers.extend(text(&[("CHAP_N", "someone")]));
    let err = feed(&mut login, &fin, &answers).unwrap_err();
    assert!(matches!(
        err,
        LoginError::Negotiation(NegotiationError::WrongPhase { .. })
    ));
    // An unknown key in the final response is tolerated: the NotUnderstood is dropped.
    let (mut login, op) = at_operational();
    let mut answers = operational_answers(&op.data, NegotiationConfig::default());
    answers.extend(text(&[("X-vendor-note", "hello")]));
    assert!(matches!(
        feed(&mut login, &fin, &answers),
        Ok(LoginStep::Done(_))
    ));
}

#[test]
fn target_may_jump_from_security_to_full_feature() {
    let mut login = InitiatorLogin::new(config());
    login.start();
    let jump = LoginResponse {
        transit: true,
        nsg: 3,
        tsih: 5,
        ..response(Stage::SecurityNegotiation)
    };
    let Ok(LoginStep::Done(r)) = feed(&mut login, &jump, &text(&[("AuthMethod", "None")])) else {
        panic!("expected the end of login")
    };
    // Nothing operational was negotiated: RFC defaults, including our receive limit.
    assert_eq!(r.params.max_recv_data_segment_length, 8192);
    assert_eq!(r.params.max_xmit_data_segment_length, 8192);
    assert!(!r.params.header_digest);
}

#[test]
fn secrets_stay_out_of_debug_output() {
    let cfg = chap_config(Vec::new(), Some(TARGET_SECRET));
    let mut login = InitiatorLogin::new(cfg);
    login.start();
    let shown = format!("{login:?}");
    for secret in [INITIATOR_SECRET, TARGET_SECRET] {
        assert!(
            !shown.contains(std::str::from_utf8(secret).unwrap()),
            "{shown}"
        );
    }
    let c = converse(
        chap_portal(Vec::new(), true),
        chap_config(Vec::new(), Some(b"some-other-secret")),
    );
    let err = c.result.unwrap_err().to_string();
    assert!(!err.contains("some-other-secret") && !err.contains("target-secret"));
}

// ---------------------------------------------------------------------------------------------
// Fuzz-style: nothing a target sends makes the login panic
// ---------------------------------------------------------------------------------------------

fn arb_response() -> impl Strategy<Value = (LoginResponse, Vec<u8>)> {
    (
        (any::<bool>(), any::<bool>(), 0u8..4, 0u8..4, 0u8..2),
        (
            prop_oneof![Just(LOGIN_ITT), any::<u32>()],
            any::<u16>(),
            any::<u32>(),
        ),
        prop_oneof![
            4 => Just(0u16),
            1 => Just(0x0101u16),
            1 => any::<u16>(),
        ],
        prop_oneof![
            // Plausible keys and values, which reach the negotiation and CHAP code.
            3 => proptest::collection::vec(
                (
                    prop_oneof![
                        Just("AuthMethod"), Just("CHAP_A"), Just("CHAP_I"), Just("CHAP_C"),
                        Just("CHAP_N"), Just("CHAP_R"), Just("HeaderDigest"),
                        Just("MaxRecvDataSegmentLength"), Just("TargetPortalGroupTag"),
                        Just("TargetAddress"), Just("MaxBurstLength"), Just("X-odd"),
                        Just("InitialR2T"), Just("ErrorRecoveryLevel"),
                    ],
                    prop_oneof![
                        Just("None".to_owned()), Just("CHAP".to_owned()), Just("5".to_owned()),
                        Just("Reject".to_owned()), Just("0x00".to_owned()),
                        Just("CRC32C".to_owned()), Just("Yes".to_owned()),
                        "[ -~]{0,12}",
                    ],
                ),
                0..6,
            )
            .prop_map(|pairs| keys::encode_text(&pairs)),
            1 => proptest::collection::vec(any::<u8>(), 0..300),
        ],
    )
        .prop_map(
            |((t, c, csg, nsg, ver), (itt, tsih, stat_sn), status, data)| {
                let resp = LoginResponse {
                    transit: t,
                    continue_: c,
                    csg,
                    nsg,
                    version_active: ver,
                    isid: ISID,
                    tsih,
                    itt,
                    stat_sn,
                    exp_cmd_sn: 10,
                    max_cmd_sn: 20,
                    status: LoginStatus(status),
                    ..LoginResponse::default()
                };
                (resp, data)
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_responses_never_panic(
        chap in 0u8..3,
        responses in proptest::collection::vec(arb_response(), 1..6),
    ) {
        let cfg = match chap {
            0 => config(),
            1 => chap_config(Vec::new(), None),
            _ => chap_config(vec![ChapAlgorithm::MD5], Some(TARGET_SECRET)),
        };
        let mut login = InitiatorLogin::new(cfg);
        login.start();
        let now = Instant::now();
        for (resp, data) in responses {
            match login.handle_pdu(raw(resp.to_bhs(), &data), now) {
                Ok(LoginStep::Send(out)) => {
                    prop_assert!(out.data.len() <= 8192);
                    prop_assert_eq!(out.bhs.data_segment_len() as usize, out.data.len());
                    let req = login_request(&out);
                    prop_assert_eq!(req.itt, LOGIN_ITT);
                    prop_assert!(!(req.transit && req.continue_));
                }
                Ok(LoginStep::Done(r)) => prop_assert!(r.tsih != 0),
                Err(_) => prop_assert!(login.is_finished()),
            }
        }
    }

    #[test]
    fn random_headers_never_panic(
        bhs in proptest::collection::vec(any::<u8>(), 48),
        data in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        let mut login = InitiatorLogin::new(chap_config(Vec::new(), None));
        login.start();
        let mut b = Bhs::default();
        b.0.copy_from_slice(&bhs);
        let _ = login.handle_pdu(raw(b, &data), Instant::now());
        let _ = login.handle_pdu(raw(b, &data), Instant::now());
    }

    #[test]
    fn random_data_mid_login_never_panics(
        after in 0usize..4,
        data in proptest::collection::vec(any::<u8>(), 0..300),
        t in any::<bool>(),
        nsg in 0u8..4,
    ) {
        // A real mutual CHAP conversation, then one random response text.
        let now = Instant::now();
        let mut target = TargetConnection::new(Arc::new(chap_portal(Vec::new(), true)));
        let mut login = InitiatorLogin::new(chap_config(Vec::new(), Some(TARGET_SECRET)));
        let mut next = login.start();
        for _ in 0..after {
            target.handle_pdu(wire(&next), now);
            let Some(out) = target.poll_transmit() else { break };
            match login.handle_pdu(wire(&out), now) {
                Ok(LoginStep::Send(o)) => next = o,
                _ => break,
            }
        }
        if !login.is_finished() {
            let resp = LoginResponse {
                transit: t,
                nsg,
                tsih: 3,
                ..response(login.stage())
            };
            let _ = feed(&mut login, &resp, &data);
        }
    }
}
