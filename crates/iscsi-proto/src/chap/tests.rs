use super::*;
use base64::Engine as _;
use proptest::prelude::*;

fn keys(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn get<'a>(keys: &'a [(String, String)], k: &str) -> Option<&'a str> {
    find(keys, k)
}

fn hex(s: &str) -> Vec<u8> {
    parse_binary(&format!("0x{s}")).unwrap()
}

// Known-answer vectors, computed with Python 3's hashlib:
//   hashlib.new(alg, bytes([id]) + secret + challenge).hexdigest()
// for alg in md5, sha1, sha256, sha3_256 and the three cases below.
struct Kat {
    id: u8,
    secret: &'static [u8],
    challenge: fn() -> Vec<u8>,
    md5: &'static str,
    sha1: &'static str,
    sha256: &'static str,
    sha3_256: &'static str,
}

const KATS: &[Kat] = &[
    // id 0x2a, secret b"viscsi-secret-1", challenge bytes(range(16))
    Kat {
        id: 0x2a,
        secret: b"viscsi-secret-1",
        challenge: || (0u8..16).collect(),
        md5: "ce8eb8c14c4e0b92d65b18cb0870618b",
        sha1: "83e0462c9d97b8f6c541e7fe351c5f6c4f62e5cf",
        sha256: "edf99f91308a8b8ed96fc3e6bb49d1bd0ee96ab65aeb6e076a1ad4a171fac398",
        sha3_256: "0852c77e0ecce525b36ee74d4c41ca876616c4981baebb179f1de947abd873d2",
    },
    // id 0, secret b"s", challenge b"\xff"
    Kat {
        id: 0,
        secret: b"s",
        challenge: || vec![0xff],
        md5: "80bc95b282237b8bbd1c2d7f4b883086",
        sha1: "25af68f6f10c9f2f8ef4f6b46accb47094b1d960",
        sha256: "9aa68b439f0786a27f5b7d3e95a3c1342b88388dce5392dc2f7d5158f1d4f59a",
        sha3_256: "bdb41318301f53322d620d5aa3492c4f8276657059e30703b1c0eb011cc4c9fc",
    },
    // id 255, secret b"0123456789abcdef", challenge bytes(range(256)) * 4 (1024 bytes)
    Kat {
        id: 255,
        secret: b"0123456789abcdef",
        challenge: || (0..1024).map(|i| (i % 256) as u8).collect(),
        md5: "a7bc5c9d59edd963aab966f007fc8490",
        sha1: "1df0a2c4042ed6ac0d8eef046ef75d6fd0e54f78",
        sha256: "f5d50071266f01a5fb3b5b0c814b744e30b067ff0fa51630b7dc7e3bd87ca257",
        sha3_256: "09cf5b02e9a300849e8875019c9a852ed8955a4b174eccba0f85e9bb7d1e4e06",
    },
];

#[test]
fn known_answers() {
    for kat in KATS {
        let c = (kat.challenge)();
        for (alg, expected) in [
            (ChapAlgorithm::MD5, kat.md5),
            (ChapAlgorithm::SHA1, kat.sha1),
            (ChapAlgorithm::SHA256, kat.sha256),
            (ChapAlgorithm::SHA3_256, kat.sha3_256),
        ] {
            let d = alg.digest(kat.id, kat.secret, &c).unwrap();
            assert_eq!(d, hex(expected), "{alg:?} id {}", kat.id);
            assert_eq!(Some(d.len()), alg.digest_len());
        }
    }
    assert_eq!(ChapAlgorithm(7).name(), Some("SHA-256"));
    assert_eq!(ChapAlgorithm(9).digest(0, b"x", b"y"), None);
    assert!(!ChapAlgorithm(0).is_supported());
}

#[test]
fn binary_value_forms() {
    let expect: Vec<u8> = (0u8..16).collect();
    assert_eq!(
        parse_binary("0x000102030405060708090a0b0c0d0e0f").unwrap(),
        expect
    );
    assert_eq!(
        parse_binary("0X000102030405060708090A0B0C0D0E0F").unwrap(),
        expect
    );
    assert_eq!(parse_binary("0bAAECAwQFBgcICQoLDA0ODw==").unwrap(), expect);
    assert_eq!(parse_binary("0BAAECAwQFBgcICQoLDA0ODw").unwrap(), expect);
    assert_eq!(
        parse_binary("0b3q2+7wE=").unwrap(),
        vec![0xde, 0xad, 0xbe, 0xef, 1]
    );
    assert_eq!(parse_binary("0xabc").unwrap(), vec![0x0a, 0xbc]);
    for bad in ["", "0x", "0b", "abcd", "0xzz", "0b!!!!", "0x12 34"] {
        assert_eq!(parse_binary(bad), None, "{bad:?}");
    }
    assert_eq!(encode_hex(&[0xde, 0xad]), "0xdead");
}

#[test]
fn secret_is_redacted() {
    let c = Credentials::new("alice", "hunter2-hunter2");
    let dbg = format!("{c:?}");
    assert!(dbg.contains("alice"));
    assert!(!dbg.contains("hunter2"));
    assert!(Secret::new("short").is_weak());
    assert!(!Secret::new("twelve-bytes").is_weak());
}

/// Runs a full login security stage between the two sides in memory.
fn converse(
    ini: &mut InitiatorChap,
    tgt: &mut TargetChap,
) -> Result<(ChapState, ChapState), AuthError> {
    let mut to_target = ini.offer();
    let mut ini_state = ChapState::Continue;
    for _ in 0..6 {
        let t = tgt.step(&to_target)?;
        if let ChapState::Done { .. } = t.state {
            if ini_state != ChapState::Continue {
                return Ok((ini_state, t.state));
            }
            // Mutual or AuthMethod=None: the initiator still reads the last response.
            let i = ini.step(&t.keys)?;
            assert!(i.keys.is_empty());
            return Ok((i.state, t.state));
        }
        let i = ini.step(&t.keys)?;
        ini_state = i.state;
        to_target = i.keys;
    }
    panic!("conversation did not finish");
}

fn algorithms() -> [ChapAlgorithm; 4] {
    ChapAlgorithm::DEFAULT_PREFERENCE
}

#[test]
fn one_way_every_algorithm() {
    for alg in algorithms() {
        let mut ini = InitiatorChap::new(
            Credentials::new("iqn.2024-01.test:ini", "initiator-secret"),
            None,
            vec![alg],
        );
        let mut tgt = TargetChap::new(
            vec![Credentials::new("iqn.2024-01.test:ini", "initiator-secret")],
            None,
            vec![],
        );
        let (i, t) = converse(&mut ini, &mut tgt).unwrap();
        assert_eq!(
            t,
            ChapState::Done {
                user: Some("iqn.2024-01.test:ini".into()),
                weak_secret: false
            }
        );
        assert_eq!(
            i,
            ChapState::Done {
                user: None,
                weak_secret: false
            }
        );
        assert_eq!(tgt.sent_challenge().map(<[u8]>::len), alg.digest_len());
    }
}

#[test]
fn mutual_every_algorithm() {
    for alg in algorithms() {
        let mut ini = InitiatorChap::new(
            Credentials::new("ini", "initiator-secret"),
            Some(Credentials::new("tgt", "target-secret-xx")),
            vec![alg],
        );
        let mut tgt = TargetChap::new(
            vec![
                Credentials::new("other", "other-secret-000"),
                Credentials::new("ini", "initiator-secret"),
            ],
            Some(Credentials::new("tgt", "target-secret-xx")),
            algorithms().to_vec(),
        );
        let (i, t) = converse(&mut ini, &mut tgt).unwrap();
        assert_eq!(
            i,
            ChapState::Done {
                user: Some("tgt".into()),
                weak_secret: false
            }
        );
        assert_eq!(
            t,
            ChapState::Done {
                user: Some("ini".into()),
                weak_secret: false
            }
        );
    }
}

#[test]
fn responder_takes_first_of_initiators_list() {
    let mut tgt = TargetChap::new(
        vec![Credentials::new("ini", "initiator-secret")],
        None,
        vec![ChapAlgorithm::MD5, ChapAlgorithm::SHA256],
    );
    tgt.step(&keys(&[("AuthMethod", "None,CHAP")])).unwrap();
    let s = tgt.step(&keys(&[("CHAP_A", "8,7,5")])).unwrap();
    assert_eq!(get(&s.keys, "CHAP_A"), Some("7"));
}

#[test]
fn mutual_failure_wrong_target_secret() {
    let mut ini = InitiatorChap::new(
        Credentials::new("ini", "initiator-secret"),
        Some(Credentials::new("tgt", "target-secret-xx")),
        vec![],
    );
    let mut tgt = TargetChap::new(
        vec![Credentials::new("ini", "initiator-secret")],
        Some(Credentials::new("tgt", "target-secret-yy")),
        vec![],
    );
    assert_eq!(
        converse(&mut ini, &mut tgt).unwrap_err(),
        AuthError::BadResponse
    );
}

#[test]
fn mutual_failure_wrong_target_name() {
    let mut ini = InitiatorChap::new(
        Credentials::new("ini", "initiator-secret"),
        Some(Credentials::new("tgt", "target-secret-xx")),
        vec![],
    );
    let mut tgt = TargetChap::new(
        vec![Credentials::new("ini", "initiator-secret")],
        Some(Credentials::new("impostor", "target-secret-xx")),
        vec![],
    );
    assert_eq!(
        converse(&mut ini, &mut tgt).unwrap_err(),
        AuthError::WrongName
    );
}

#[test]
fn mutual_requested_but_target_has_no_credentials() {
    let mut ini = InitiatorChap::new(
        Credentials::new("ini", "initiator-secret"),
        Some(Credentials::new("tgt", "target-secret-xx")),
        vec![],
    );
    let mut tgt = TargetChap::new(
        vec![Credentials::new("ini", "initiator-secret")],
        None,
        vec![],
    );
    let e = converse(&mut ini, &mut tgt).unwrap_err();
    assert_eq!(e, AuthError::MutualUnavailable);
    assert_eq!(e.login_status(), 0x0201);
}

#[test]
fn wrong_secret_and_unknown_user_fail_alike() {
    for (user, secret) in [("ini", "not-the-secret"), ("nobody", "initiator-secret")] {
        let mut ini = InitiatorChap::new(Credentials::new(user, secret), None, vec![]);
        let mut tgt = TargetChap::new(
            vec![Credentials::new("ini", "initiator-secret")],
            None,
            vec![],
        );
        let e = converse(&mut ini, &mut tgt).unwrap_err();
        assert_eq!(e, AuthError::BadResponse);
        assert_eq!(e.login_status(), 0x0201);
        assert!(!e.to_string().contains(secret));
        // The exchange is over.
        assert_eq!(tgt.step(&[]).unwrap_err(), AuthError::Finished);
    }
}

#[test]
fn chap_required_but_initiator_offers_none() {
    let mut tgt = TargetChap::new(
        vec![Credentials::new("ini", "initiator-secret")],
        None,
        vec![],
    );
    let e = tgt.step(&keys(&[("AuthMethod", "None")])).unwrap_err();
    assert_eq!(e, AuthError::NoCommonMethod);
    assert_eq!(e.login_status(), 0x0201);
}

#[test]
fn no_chap_configured_answers_none() {
    let mut tgt = TargetChap::new(vec![], None, vec![]);
    let s = tgt.step(&keys(&[("AuthMethod", "CHAP,None")])).unwrap();
    assert_eq!(s.keys, keys(&[("AuthMethod", "None")]));
    assert!(matches!(s.state, ChapState::Done { user: None, .. }));

    // One-way initiator accepts None.
    let mut ini = InitiatorChap::new(Credentials::new("ini", "initiator-secret"), None, vec![]);
    let mut tgt = TargetChap::new(vec![], None, vec![]);
    let (i, t) = converse(&mut ini, &mut tgt).unwrap();
    assert!(matches!(i, ChapState::Done { user: None, .. }));
    assert!(matches!(t, ChapState::Done { user: None, .. }));

    // A mutual initiator offers CHAP only and the target cannot serve it.
    let mut ini = InitiatorChap::new(
        Credentials::new("ini", "initiator-secret"),
        Some(Credentials::new("tgt", "target-secret-xx")),
        vec![],
    );
    assert_eq!(ini.offer(), keys(&[("AuthMethod", "CHAP")]));
    let mut tgt = TargetChap::new(vec![], None, vec![]);
    assert_eq!(
        converse(&mut ini, &mut tgt).unwrap_err(),
        AuthError::NoCommonMethod
    );
}

#[test]
fn no_common_algorithm() {
    let mut tgt = TargetChap::new(
        vec![Credentials::new("ini", "initiator-secret")],
        None,
        vec![ChapAlgorithm::SHA3_256],
    );
    tgt.step(&keys(&[("AuthMethod", "CHAP")])).unwrap();
    assert_eq!(
        tgt.step(&keys(&[("CHAP_A", "5,6,junk,300")])).unwrap_err(),
        AuthError::NoCommonAlgorithm
    );

    let mut ini = InitiatorChap::new(Credentials::new("ini", "initiator-secret"), None, vec![]);
    ini.offer();
    ini.step(&keys(&[("AuthMethod", "CHAP")])).unwrap();
    assert_eq!(
        ini.step(&keys(&[("CHAP_A", "Reject")])).unwrap_err(),
        AuthError::NoCommonAlgorithm
    );
}

#[test]
fn initiator_with_single_algorithm_offers_it_alone() {
    let mut ini = InitiatorChap::new(
        Credentials::new("ini", "initiator-secret"),
        None,
        vec![ChapAlgorithm::MD5],
    );
    ini.offer();
    let s = ini.step(&keys(&[("AuthMethod", "CHAP")])).unwrap();
    assert_eq!(s.keys, keys(&[("CHAP_A", "5")]));
    let default = InitiatorChap::new(Credentials::new("ini", "initiator-secret"), None, vec![]);
    assert_eq!(default.algorithm_offer().1, "8,7,6,5");
}

/// Drives the target to the point where it waits for CHAP_N/CHAP_R; returns the target, the
/// algorithm, id and challenge it sent.
fn target_awaiting_response(
    target_creds: Option<Credentials>,
) -> (TargetChap, ChapAlgorithm, u8, Vec<u8>) {
    let mut tgt = TargetChap::new(
        vec![Credentials::new("ini", "initiator-secret")],
        target_creds,
        vec![],
    );
    tgt.step(&keys(&[("AuthMethod", "CHAP")])).unwrap();
    let s = tgt.step(&keys(&[("CHAP_A", "7")])).unwrap();
    let alg = ChapAlgorithm(7);
    let id = parse_id(get(&s.keys, "CHAP_I").unwrap()).unwrap();
    let c = parse_binary(get(&s.keys, "CHAP_C").unwrap()).unwrap();
    (tgt, alg, id, c)
}

#[test]
fn reflected_challenge_is_refused() {
    let (mut tgt, alg, id, c) =
        target_awaiting_response(Some(Credentials::new("tgt", "target-secret-xx")));
    let r = alg.digest(id, b"initiator-secret", &c).unwrap();
    let e = tgt
        .step(&keys(&[
            ("CHAP_N", "ini"),
            ("CHAP_R", &encode_hex(&r)),
            ("CHAP_I", "1"),
            ("CHAP_C", &encode_hex(&c)),
        ]))
        .unwrap_err();
    assert_eq!(e, AuthError::ReflectedChallenge);
    assert_eq!(e.login_status(), 0x0201);
}

#[test]
fn recently_seen_challenge_is_refused() {
    let (mut tgt, alg, id, c) =
        target_awaiting_response(Some(Credentials::new("tgt", "target-secret-xx")));
    let elsewhere = vec![7u8; 32];
    tgt.refuse_challenges([elsewhere.clone()]);
    let r = alg.digest(id, b"initiator-secret", &c).unwrap();
    let e = tgt
        .step(&keys(&[
            ("CHAP_N", "ini"),
            ("CHAP_R", &encode_hex(&r)),
            ("CHAP_I", "1"),
            ("CHAP_C", &encode_hex(&elsewhere)),
        ]))
        .unwrap_err();
    assert_eq!(e, AuthError::ReflectedChallenge);
}

#[test]
fn initiator_refuses_recent_challenge() {
    let mut ini = InitiatorChap::new(
        Credentials::new("ini", "initiator-secret"),
        Some(Credentials::new("tgt", "target-secret-xx")),
        vec![],
    );
    let mine = vec![9u8; 32];
    ini.refuse_challenges([mine.clone()]);
    ini.offer();
    ini.step(&keys(&[("AuthMethod", "CHAP")])).unwrap();
    let e = ini
        .step(&keys(&[
            ("CHAP_A", "8"),
            ("CHAP_I", "3"),
            ("CHAP_C", &encode_hex(&mine)),
        ]))
        .unwrap_err();
    assert_eq!(e, AuthError::ReflectedChallenge);
}

#[test]
fn same_secret_both_directions_refused() {
    let (mut tgt, alg, id, c) =
        target_awaiting_response(Some(Credentials::new("tgt", "initiator-secret")));
    let r = alg.digest(id, b"initiator-secret", &c).unwrap();
    let e = tgt
        .step(&keys(&[
            ("CHAP_N", "ini"),
            ("CHAP_R", &encode_hex(&r)),
            ("CHAP_I", "1"),
            ("CHAP_C", "0x0102030405060708"),
        ]))
        .unwrap_err();
    assert_eq!(e, AuthError::SecretReuse);
}

#[test]
fn long_challenge_and_base64_and_uppercase_response() {
    // The initiator's 1024-byte challenge, in base64; our response in uppercase hex.
    let (mut tgt, alg, id, c) =
        target_awaiting_response(Some(Credentials::new("tgt", "target-secret-xx")));
    let r = alg.digest(id, b"initiator-secret", &c).unwrap();
    let upper = encode_hex(&r).to_uppercase().replacen("0X", "0x", 1);
    let big: Vec<u8> = (0..1024).map(|i| (i * 7 % 251) as u8).collect();
    let b64 = format!(
        "0b{}",
        base64::engine::general_purpose::STANDARD.encode(&big)
    );
    let s = tgt
        .step(&keys(&[
            ("CHAP_N", "ini"),
            ("CHAP_R", &upper),
            ("CHAP_I", "200"),
            ("CHAP_C", &b64),
        ]))
        .unwrap();
    let expected = alg.digest(200, b"target-secret-xx", &big).unwrap();
    assert_eq!(get(&s.keys, "CHAP_N"), Some("tgt"));
    assert_eq!(
        parse_binary(get(&s.keys, "CHAP_R").unwrap()).unwrap(),
        expected
    );
}

#[test]
fn challenge_length_limits() {
    let (mut tgt, alg, id, c) =
        target_awaiting_response(Some(Credentials::new("tgt", "target-secret-xx")));
    let r = encode_hex(&alg.digest(id, b"initiator-secret", &c).unwrap());
    let too_long = encode_hex(&[1u8; 1025]);
    let e = tgt
        .step(&keys(&[
            ("CHAP_N", "ini"),
            ("CHAP_R", &r),
            ("CHAP_I", "1"),
            ("CHAP_C", &too_long),
        ]))
        .unwrap_err();
    assert_eq!(e, AuthError::Malformed("CHAP_C"));
    assert_eq!(e.login_status(), 0x0200);

    let tgt =
        TargetChap::new(vec![Credentials::new("a", "b")], None, vec![]).with_challenge_len(5000);
    let mut tgt = tgt;
    tgt.step(&keys(&[("AuthMethod", "CHAP"), ("CHAP_A", "5")]))
        .unwrap();
    assert_eq!(tgt.sent_challenge().unwrap().len(), 1024);
}

#[test]
fn malformed_and_missing_keys() {
    let (mut tgt, ..) = target_awaiting_response(None);
    let e = tgt.step(&keys(&[("CHAP_N", "ini")])).unwrap_err();
    assert_eq!(e, AuthError::MissingKey("CHAP_R"));
    assert_eq!(e.login_status(), 0x0207);

    let (mut tgt, ..) = target_awaiting_response(None);
    let e = tgt
        .step(&keys(&[("CHAP_N", "ini"), ("CHAP_R", "0xnothex")]))
        .unwrap_err();
    assert_eq!(e, AuthError::Malformed("CHAP_R"));

    let (mut tgt, alg, id, c) = target_awaiting_response(None);
    let r = encode_hex(&alg.digest(id, b"initiator-secret", &c).unwrap());
    let e = tgt
        .step(&keys(&[("CHAP_N", "ini"), ("CHAP_R", &r), ("CHAP_I", "1")]))
        .unwrap_err();
    assert_eq!(e, AuthError::MissingKey("CHAP_C"));

    let mut tgt = TargetChap::new(vec![Credentials::new("a", "b")], None, vec![]);
    tgt.step(&keys(&[("AuthMethod", "CHAP")])).unwrap();
    let e = tgt.step(&keys(&[("CHAP_R", "0x00")])).unwrap_err();
    assert_eq!(e, AuthError::Unexpected("CHAP_R"));
}

#[test]
fn weak_secret_is_flagged() {
    let mut ini = InitiatorChap::new(Credentials::new("ini", "short"), None, vec![]);
    let mut tgt = TargetChap::new(vec![Credentials::new("ini", "short")], None, vec![]);
    let (i, t) = converse(&mut ini, &mut tgt).unwrap();
    assert!(matches!(
        i,
        ChapState::Done {
            weak_secret: true,
            ..
        }
    ));
    assert!(matches!(
        t,
        ChapState::Done {
            weak_secret: true,
            ..
        }
    ));
}

#[test]
fn wrong_response_length_fails() {
    let (mut tgt, ..) = target_awaiting_response(None);
    let e = tgt
        .step(&keys(&[("CHAP_N", "ini"), ("CHAP_R", "0x00")]))
        .unwrap_err();
    assert_eq!(e, AuthError::BadResponse);
}

proptest! {
    /// Arbitrary key sets never panic either side.
    #[test]
    fn no_panics(steps in proptest::collection::vec(
        proptest::collection::vec(
            (prop_oneof![
                Just("AuthMethod"), Just("CHAP_A"), Just("CHAP_I"),
                Just("CHAP_C"), Just("CHAP_N"), Just("CHAP_R")
            ], "[ -~]{0,12}"),
            0..6),
        1..5)) {
        let mut tgt = TargetChap::new(
            vec![Credentials::new("ini", "initiator-secret")],
            Some(Credentials::new("tgt", "target-secret-xx")),
            vec![],
        );
        let mut ini = InitiatorChap::new(
            Credentials::new("ini", "initiator-secret"),
            Some(Credentials::new("tgt", "target-secret-xx")),
            vec![],
        );
        ini.offer();
        for s in steps {
            let ks: Vec<(String, String)> =
                s.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
            let _ = tgt.step(&ks);
            let _ = ini.step(&ks);
        }
    }

    /// Any secret and any challenge length: both sides agree.
    #[test]
    fn conversation_any_secret(
        secret in proptest::collection::vec(any::<u8>(), 1..64),
        tsecret in proptest::collection::vec(any::<u8>(), 1..64),
        len in 1usize..=1024,
        alg in 5u8..=8,
    ) {
        prop_assume!(secret != tsecret);
        let mut ini = InitiatorChap::new(
            Credentials::new("ini", secret.clone()),
            Some(Credentials::new("tgt", tsecret.clone())),
            vec![ChapAlgorithm(alg)],
        ).with_challenge_len(len);
        let mut tgt = TargetChap::new(
            vec![Credentials::new("ini", secret)],
            Some(Credentials::new("tgt", tsecret)),
            vec![],
        ).with_challenge_len(len);
        let (i, t) = converse(&mut ini, &mut tgt).unwrap();
        let is_done = |s: &ChapState| matches!(s, ChapState::Done { user: Some(_), .. });
        prop_assert!(is_done(&i), "initiator: {:?}", i);
        prop_assert!(is_done(&t), "target: {:?}", t);
    }
}
