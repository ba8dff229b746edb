//! CHAP authentication for the login security stage (RFC 7143 §12.1.3, RFC 1994).
//!
//! [`TargetChap`] and [`InitiatorChap`] drive the AuthMethod and `CHAP_*` keys of the security
//! negotiation stage, one-way or mutual:
//!
//! ```text
//! I -> T  AuthMethod=CHAP,None
//! T -> I  AuthMethod=CHAP
//! I -> T  CHAP_A=<A1,A2,...>
//! T -> I  CHAP_A=<A>  CHAP_I=<I>  CHAP_C=<C>
//! I -> T  CHAP_N=<N>  CHAP_R=<R>  [CHAP_I=<I2>  CHAP_C=<C2>]      (mutual: the bracketed keys)
//! T -> I  [CHAP_N=<N2>  CHAP_R=<R2>]
//! ```
//!
//! The response is `H(identifier byte || secret || challenge)` with the algorithm chosen by
//! CHAP_A, numbered as IANA registers them: 5 = MD5, 6 = SHA-1, 7 = SHA-256, 8 = SHA3-256
//! (tgt wrongly uses 7 for SHA-1). Binary values are accepted as hex (`0x`, either case) or
//! base64 (`0b`); we emit lowercase hex. Responses are compared in constant time.
//!
//! Security decisions:
//! - A challenge the peer sends that equals the challenge we sent on this connection, or one
//!   registered with `refuse_challenges` (challenges seen recently elsewhere), is refused: it is
//!   the reflection attack of RFC 7143 §12.1.3.
//! - The same secret for both directions is refused in a mutual exchange (§12.1.3 forbids it).
//! - Secrets shorter than 12 bytes (96 bits, the RFC's SHOULD) are accepted; the exchange
//!   reports it in [`ChapState::Done::weak_secret`] so the caller can warn. Nothing here logs.
//! - Secrets never appear in `Debug` output or error messages, and neither do responses.
//! - An unknown user name costs the same work as a known one (the response is checked against
//!   a dummy secret), and both fail with a generic authentication failure.
//!
//! Not here: the AuthMethod values other than CHAP and None (KRB5, SRP, SPKM — refused), the
//! login state machine (the caller feeds the keys that [`crate::keys::Negotiation::respond`]
//! puts in `auth_keys` and moves to the next stage when [`ChapState::Done`] comes back), and
//! where credentials are stored.

use subtle::ConstantTimeEq;

use crate::keys::{
    encode_hex, parse_binary, parse_numeric, STATUS_AUTH_FAILURE, STATUS_INITIATOR_ERROR,
    STATUS_MISSING_PARAMETER,
};

/// Shortest and longest challenge we send or accept, in bytes (RFC 7143 §12.1.3).
pub const CHALLENGE_LEN_RANGE: core::ops::RangeInclusive<usize> = 1..=1024;
/// Secrets shorter than this (96 bits) are weak (RFC 7143 §12.1.3 SHOULD).
pub const MIN_SECRET_LEN: usize = 12;

/// A CHAP algorithm, by its IANA "PPP Authentication Algorithms" number.
#[derive(Copy, Clone, PartialEq, Eq, Hash)]
pub struct ChapAlgorithm(pub u8);

impl ChapAlgorithm {
    /// MD5 (RFC 1994).
    pub const MD5: ChapAlgorithm = ChapAlgorithm(5);
    /// SHA-1.
    pub const SHA1: ChapAlgorithm = ChapAlgorithm(6);
    /// SHA-256.
    pub const SHA256: ChapAlgorithm = ChapAlgorithm(7);
    /// SHA3-256.
    pub const SHA3_256: ChapAlgorithm = ChapAlgorithm(8);

    /// Our default preference order, strongest first.
    pub const DEFAULT_PREFERENCE: [ChapAlgorithm; 4] = [
        ChapAlgorithm::SHA3_256,
        ChapAlgorithm::SHA256,
        ChapAlgorithm::SHA1,
        ChapAlgorithm::MD5,
    ];

    /// The algorithm's name, if we implement it.
    pub fn name(self) -> Option<&'static str> {
        match self.0 {
            5 => Some("MD5"),
            6 => Some("SHA-1"),
            7 => Some("SHA-256"),
            8 => Some("SHA3-256"),
            _ => None,
        }
    }

    /// Whether we implement it.
    pub fn is_supported(self) -> bool {
        self.name().is_some()
    }

    /// Length of its digest in bytes, if we implement it.
    pub fn digest_len(self) -> Option<usize> {
        match self.0 {
            5 => Some(16),
            6 => Some(20),
            7 | 8 => Some(32),
            _ => None,
        }
    }

    /// The CHAP response `H(id || secret || challenge)`, or `None` for an algorithm we do not
    /// implement.
    pub fn digest(self, id: u8, secret: &[u8], challenge: &[u8]) -> Option<Vec<u8>> {
        fn run<D: md5::Digest>(id: u8, secret: &[u8], challenge: &[u8]) -> Vec<u8> {
            let mut h = D::new();
            h.update([id]);
            h.update(secret);
            h.update(challenge);
            h.finalize().to_vec()
        }
        match self.0 {
            5 => Some(run::<md5::Md5>(id, secret, challenge)),
            6 => Some(run::<sha1::Sha1>(id, secret, challenge)),
            7 => Some(run::<sha2::Sha256>(id, secret, challenge)),
            8 => Some(run::<sha3::Sha3_256>(id, secret, challenge)),
            _ => None,
        }
    }
}

impl core::fmt::Debug for ChapAlgorithm {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.name() {
            Some(n) => write!(f, "{n}({})", self.0),
            None => write!(f, "ChapAlgorithm({})", self.0),
        }
    }
}

/// A CHAP secret. `Debug` prints no content; the bytes are overwritten with zeros on drop
/// (best effort without `unsafe`: earlier copies made by reallocation are not reached).
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// Wraps secret bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Secret(bytes.into())
    }

    /// The secret bytes.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the secret is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Shorter than the 96 bits RFC 7143 §12.1.3 asks for.
    pub fn is_weak(&self) -> bool {
        self.0.len() < MIN_SECRET_LEN
    }

    fn ct_eq(&self, other: &Secret) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        for b in self.0.iter_mut() {
            *b = 0;
        }
        std::hint::black_box(&mut self.0);
    }
}

impl core::fmt::Debug for Secret {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// A CHAP user name (CHAP_N) and its secret.
#[derive(Clone, Debug)]
pub struct Credentials {
    /// The name sent as CHAP_N.
    pub user: String,
    /// The shared secret.
    pub secret: Secret,
}

impl Credentials {
    /// Credentials from a user name and secret bytes.
    pub fn new(user: impl Into<String>, secret: impl Into<Vec<u8>>) -> Self {
        Credentials {
            user: user.into(),
            secret: Secret::new(secret),
        }
    }
}

/// Why authentication failed. Messages never contain secrets, responses or challenges.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// No AuthMethod acceptable to both sides (e.g. we require CHAP, the initiator offers
    /// only None).
    #[error("no common authentication method")]
    NoCommonMethod,
    /// No CHAP algorithm acceptable to both sides (`CHAP_A=Reject`).
    #[error("no common CHAP algorithm")]
    NoCommonAlgorithm,
    /// A key required at this step is missing.
    #[error("missing key {0}")]
    MissingKey(&'static str),
    /// A key's value is malformed or out of range.
    #[error("malformed value for key {0}")]
    Malformed(&'static str),
    /// A key that does not belong at this step of the exchange.
    #[error("unexpected key {0} at this step")]
    Unexpected(&'static str),
    /// The peer's response does not match (wrong secret, or unknown user name).
    #[error("CHAP response verification failed")]
    BadResponse,
    /// The peer's challenge equals one we sent (reflection).
    #[error("reflected CHAP challenge refused")]
    ReflectedChallenge,
    /// The initiator asked for mutual authentication but we have no target credentials, or
    /// we require mutual authentication and the target did not take part.
    #[error("mutual CHAP not possible")]
    MutualUnavailable,
    /// The same secret is configured for both directions.
    #[error("the same CHAP secret is configured for both directions")]
    SecretReuse,
    /// The peer's CHAP_N is not the name we expect (mutual, initiator side).
    #[error("unexpected CHAP name")]
    WrongName,
    /// The operating system's random number generator failed.
    #[error("random number generator failed")]
    Random,
    /// `step` called after the exchange finished or failed.
    #[error("CHAP exchange already finished")]
    Finished,
}

impl AuthError {
    /// The login status class a target sends for this error: [`STATUS_MISSING_PARAMETER`]
    /// (0x0207) for a missing key, [`STATUS_INITIATOR_ERROR`] (0x0200) for malformed or
    /// misplaced keys, [`STATUS_AUTH_FAILURE`] (0x0201) otherwise. (An initiator drops the
    /// connection whatever the error.)
    pub fn login_status(&self) -> u16 {
        match self {
            AuthError::MissingKey(_) => STATUS_MISSING_PARAMETER,
            AuthError::Malformed(_) | AuthError::Unexpected(_) => STATUS_INITIATOR_ERROR,
            _ => STATUS_AUTH_FAILURE,
        }
    }
}

/// Where an exchange stands after a step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChapState {
    /// Send the keys and feed the peer's next keys to `step`.
    Continue,
    /// Authentication is complete on our side once the keys are sent.
    Done {
        /// The authenticated peer: the initiator's CHAP_N (target side), the target's CHAP_N
        /// after mutual authentication (initiator side), `None` for AuthMethod=None or when
        /// the initiator did not authenticate the target.
        user: Option<String>,
        /// A secret used in the exchange is shorter than [`MIN_SECRET_LEN`].
        weak_secret: bool,
    },
}

/// The keys to send and the new state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChapStep {
    /// Keys to put in the next Login PDU.
    pub keys: Vec<(String, String)>,
    /// Whether the exchange continues.
    pub state: ChapState,
}

fn pair(k: &str, v: impl Into<String>) -> (String, String) {
    (k.to_owned(), v.into())
}

fn find<'a>(keys: &'a [(String, String)], name: &str) -> Option<&'a str> {
    keys.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn random_bytes(len: usize) -> Result<Vec<u8>, AuthError> {
    let mut buf = vec![0u8; len];
    getrandom::getrandom(&mut buf).map_err(|_| AuthError::Random)?;
    Ok(buf)
}

fn parse_id(v: &str) -> Result<u8, AuthError> {
    parse_numeric(v)
        .and_then(|n| u8::try_from(n).ok())
        .ok_or(AuthError::Malformed("CHAP_I"))
}

fn parse_challenge(v: &str) -> Result<Vec<u8>, AuthError> {
    parse_binary(v)
        .filter(|c| CHALLENGE_LEN_RANGE.contains(&c.len()))
        .ok_or(AuthError::Malformed("CHAP_C"))
}

fn ct_eq_bytes(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

/// Checks a CHAP_R against `H(id || secret || challenge)` in constant time.
fn verify(alg: ChapAlgorithm, id: u8, secret: &[u8], challenge: &[u8], response: &[u8]) -> bool {
    match alg.digest(id, secret, challenge) {
        Some(expected) => ct_eq_bytes(&expected, response),
        None => false,
    }
}

#[derive(Debug)]
enum TargetState {
    Start,
    AwaitAlgorithm,
    AwaitResponse {
        alg: ChapAlgorithm,
        id: u8,
        challenge: Vec<u8>,
    },
    Finished,
}

/// Target side of the security stage.
///
/// With no initiator credentials configured, the target does not authenticate: it answers
/// `AuthMethod=None` (and fails if the initiator offers only CHAP). With credentials, CHAP is
/// required: an initiator offering only `None` fails with [`AuthError::NoCommonMethod`]
/// (login status 0x0201).
#[derive(Debug)]
pub struct TargetChap {
    initiators: Vec<Credentials>,
    target: Option<Credentials>,
    algorithms: Vec<ChapAlgorithm>,
    challenge_len: Option<usize>,
    refused: Vec<Vec<u8>>,
    sent_challenge: Option<Vec<u8>>,
    state: TargetState,
}

impl TargetChap {
    /// `initiator_creds`: accepted initiator users (empty: no authentication). `target_creds`:
    /// our name and secret for mutual CHAP. `algorithms`: those we allow (empty: all four);
    /// unsupported numbers are dropped.
    pub fn new(
        initiator_creds: Vec<Credentials>,
        target_creds: Option<Credentials>,
        algorithms: Vec<ChapAlgorithm>,
    ) -> Self {
        let mut algorithms: Vec<_> = algorithms
            .into_iter()
            .filter(|a| a.is_supported())
            .collect();
        if algorithms.is_empty() {
            algorithms = ChapAlgorithm::DEFAULT_PREFERENCE.to_vec();
        }
        TargetChap {
            initiators: initiator_creds,
            target: target_creds,
            algorithms,
            challenge_len: None,
            refused: Vec::new(),
            sent_challenge: None,
            state: TargetState::Start,
        }
    }

    /// Sets the length of the challenge we send (clamped to 1..=1024 bytes). Default: the
    /// chosen algorithm's digest length.
    pub fn with_challenge_len(mut self, len: usize) -> Self {
        self.challenge_len =
            Some(len.clamp(*CHALLENGE_LEN_RANGE.start(), *CHALLENGE_LEN_RANGE.end()));
        self
    }

    /// Also refuses these challenges from the initiator (challenges this target sent recently
    /// on other connections).
    pub fn refuse_challenges(&mut self, challenges: impl IntoIterator<Item = Vec<u8>>) {
        self.refused.extend(challenges);
    }

    /// The challenge we sent on this connection, to share with other connections'
    /// [`refuse_challenges`](Self::refuse_challenges).
    pub fn sent_challenge(&self) -> Option<&[u8]> {
        self.sent_challenge.as_deref()
    }

    /// Whether this target requires CHAP.
    pub fn requires_chap(&self) -> bool {
        !self.initiators.is_empty()
    }

    /// Feeds the initiator's auth keys from one Login Request.
    ///
    /// On error the exchange is over; the caller ends the login with
    /// [`AuthError::login_status`].
    pub fn step(&mut self, keys: &[(String, String)]) -> Result<ChapStep, AuthError> {
        let result = self.step_inner(keys);
        if result.is_err() {
            self.state = TargetState::Finished;
        }
        result
    }

    fn step_inner(&mut self, keys: &[(String, String)]) -> Result<ChapStep, AuthError> {
        match std::mem::replace(&mut self.state, TargetState::Finished) {
            TargetState::Start => {
                let offered =
                    find(keys, "AuthMethod").ok_or(AuthError::MissingKey("AuthMethod"))?;
                let ours = if self.requires_chap() { "CHAP" } else { "None" };
                // §6.2: the first of the originator's values we support.
                if !offered.split(',').any(|m| m == ours) {
                    return Err(AuthError::NoCommonMethod);
                }
                let mut out = vec![pair("AuthMethod", ours)];
                if !self.requires_chap() {
                    return Ok(ChapStep {
                        keys: out,
                        state: ChapState::Done {
                            user: None,
                            weak_secret: false,
                        },
                    });
                }
                self.state = TargetState::AwaitAlgorithm;
                if find(keys, "CHAP_A").is_some() {
                    // CHAP_A in the same PDU as AuthMethod: go on at once.
                    let mut next = self.step_inner(keys)?;
                    out.append(&mut next.keys);
                    return Ok(ChapStep {
                        keys: out,
                        state: next.state,
                    });
                }
                Ok(ChapStep {
                    keys: out,
                    state: ChapState::Continue,
                })
            }
            TargetState::AwaitAlgorithm => {
                for k in ["CHAP_N", "CHAP_R", "CHAP_I", "CHAP_C"] {
                    if find(keys, k).is_some() {
                        return Err(AuthError::Unexpected(k));
                    }
                }
                let list = find(keys, "CHAP_A").ok_or(AuthError::MissingKey("CHAP_A"))?;
                let alg = list
                    .split(',')
                    .filter_map(parse_numeric)
                    .filter_map(|n| u8::try_from(n).ok().map(ChapAlgorithm))
                    .find(|a| self.algorithms.contains(a))
                    .ok_or(AuthError::NoCommonAlgorithm)?;
                let len = self.challenge_len.or(alg.digest_len()).unwrap_or(16);
                let challenge = random_bytes(len)?;
                let id = random_bytes(1)?[0];
                let out = vec![
                    pair("CHAP_A", alg.0.to_string()),
                    pair("CHAP_I", id.to_string()),
                    pair("CHAP_C", encode_hex(&challenge)),
                ];
                self.sent_challenge = Some(challenge.clone());
                self.state = TargetState::AwaitResponse { alg, id, challenge };
                Ok(ChapStep {
                    keys: out,
                    state: ChapState::Continue,
                })
            }
            TargetState::AwaitResponse { alg, id, challenge } => {
                let name = find(keys, "CHAP_N").ok_or(AuthError::MissingKey("CHAP_N"))?;
                let r = find(keys, "CHAP_R").ok_or(AuthError::MissingKey("CHAP_R"))?;
                let r = parse_binary(r).ok_or(AuthError::Malformed("CHAP_R"))?;
                if find(keys, "CHAP_A").is_some() {
                    return Err(AuthError::Unexpected("CHAP_A"));
                }
                let mutual = match (find(keys, "CHAP_I"), find(keys, "CHAP_C")) {
                    (None, None) => None,
                    (Some(i), Some(c)) => Some((parse_id(i)?, parse_challenge(c)?)),
                    (Some(_), None) => return Err(AuthError::MissingKey("CHAP_C")),
                    (None, Some(_)) => return Err(AuthError::MissingKey("CHAP_I")),
                };

                // Unknown users are checked against a dummy secret so that both paths do the
                // same work and fail the same way.
                let user = self.initiators.iter().find(|c| c.user == name);
                let dummy = Secret::new(vec![0u8; MIN_SECRET_LEN]);
                let secret = user.map_or(&dummy, |c| &c.secret);
                let ok = verify(alg, id, secret.expose(), &challenge, &r);
                if !ok || user.is_none() {
                    return Err(AuthError::BadResponse);
                }
                let mut weak = secret.is_weak();

                let mut out = Vec::new();
                if let Some((their_id, their_challenge)) = mutual {
                    let target = self.target.as_ref().ok_or(AuthError::MutualUnavailable)?;
                    if ct_eq_bytes(&their_challenge, &challenge)
                        || self
                            .refused
                            .iter()
                            .any(|c| ct_eq_bytes(c, &their_challenge))
                    {
                        return Err(AuthError::ReflectedChallenge);
                    }
                    if target.secret.ct_eq(secret) {
                        return Err(AuthError::SecretReuse);
                    }
                    weak |= target.secret.is_weak();
                    let resp = alg
                        .digest(their_id, target.secret.expose(), &their_challenge)
                        .ok_or(AuthError::NoCommonAlgorithm)?;
                    out.push(pair("CHAP_N", target.user.clone()));
                    out.push(pair("CHAP_R", encode_hex(&resp)));
                }
                Ok(ChapStep {
                    keys: out,
                    state: ChapState::Done {
                        user: Some(name.to_owned()),
                        weak_secret: weak,
                    },
                })
            }
            TargetState::Finished => Err(AuthError::Finished),
        }
    }
}

#[derive(Debug)]
enum InitiatorState {
    Start,
    AwaitMethod,
    AwaitChallenge,
    AwaitTargetResponse {
        id: u8,
        challenge: Vec<u8>,
        alg: ChapAlgorithm,
    },
    Finished,
}

/// Initiator side of the security stage.
///
/// [`offer`](Self::offer) gives the first keys (`AuthMethod=CHAP,None`, or `AuthMethod=CHAP`
/// when mutual CHAP is configured, so that a target cannot skip authenticating itself);
/// [`step`](Self::step) takes each Login Response's auth keys. The CHAP_A list is sent after
/// the target picked CHAP. To retry against a target that refuses algorithm lists, build a new
/// `InitiatorChap` with a single algorithm.
#[derive(Debug)]
pub struct InitiatorChap {
    creds: Credentials,
    target: Option<Credentials>,
    algorithms: Vec<ChapAlgorithm>,
    challenge_len: Option<usize>,
    refused: Vec<Vec<u8>>,
    sent_challenge: Option<Vec<u8>>,
    weak: bool,
    state: InitiatorState,
}

impl InitiatorChap {
    /// `creds`: our name and secret. `target_creds`: the target's expected name and secret for
    /// mutual CHAP. `algorithms`: our preference order (empty:
    /// [`ChapAlgorithm::DEFAULT_PREFERENCE`]); unsupported numbers are dropped.
    pub fn new(
        creds: Credentials,
        target_creds: Option<Credentials>,
        algorithms: Vec<ChapAlgorithm>,
    ) -> Self {
        let mut algorithms: Vec<_> = algorithms
            .into_iter()
            .filter(|a| a.is_supported())
            .collect();
        if algorithms.is_empty() {
            algorithms = ChapAlgorithm::DEFAULT_PREFERENCE.to_vec();
        }
        let weak =
            creds.secret.is_weak() || target_creds.as_ref().is_some_and(|t| t.secret.is_weak());
        InitiatorChap {
            creds,
            target: target_creds,
            algorithms,
            challenge_len: None,
            refused: Vec::new(),
            sent_challenge: None,
            weak,
            state: InitiatorState::Start,
        }
    }

    /// Sets the length of our mutual challenge (clamped to 1..=1024). Default: the chosen
    /// algorithm's digest length.
    pub fn with_challenge_len(mut self, len: usize) -> Self {
        self.challenge_len =
            Some(len.clamp(*CHALLENGE_LEN_RANGE.start(), *CHALLENGE_LEN_RANGE.end()));
        self
    }

    /// Also refuses these challenges from the target (challenges we sent recently elsewhere).
    pub fn refuse_challenges(&mut self, challenges: impl IntoIterator<Item = Vec<u8>>) {
        self.refused.extend(challenges);
    }

    /// The mutual challenge we sent, if any.
    pub fn sent_challenge(&self) -> Option<&[u8]> {
        self.sent_challenge.as_deref()
    }

    /// The first keys: the AuthMethod offer.
    pub fn offer(&mut self) -> Vec<(String, String)> {
        self.state = InitiatorState::AwaitMethod;
        let methods = if self.target.is_some() {
            "CHAP"
        } else {
            "CHAP,None"
        };
        vec![pair("AuthMethod", methods)]
    }

    /// The CHAP_A offer, e.g. `CHAP_A=8,7,6,5`.
    pub fn algorithm_offer(&self) -> (String, String) {
        let list: Vec<String> = self.algorithms.iter().map(|a| a.0.to_string()).collect();
        pair("CHAP_A", list.join(","))
    }

    /// Feeds the target's auth keys from one Login Response.
    pub fn step(&mut self, keys: &[(String, String)]) -> Result<ChapStep, AuthError> {
        let result = self.step_inner(keys);
        if result.is_err() {
            self.state = InitiatorState::Finished;
        }
        result
    }

    fn step_inner(&mut self, keys: &[(String, String)]) -> Result<ChapStep, AuthError> {
        match std::mem::replace(&mut self.state, InitiatorState::Finished) {
            InitiatorState::Start => {
                // offer() was not called: do it now, as the first PDU.
                Ok(ChapStep {
                    keys: self.offer(),
                    state: ChapState::Continue,
                })
            }
            InitiatorState::AwaitMethod => {
                match find(keys, "AuthMethod").ok_or(AuthError::MissingKey("AuthMethod"))? {
                    "CHAP" => {
                        self.state = InitiatorState::AwaitChallenge;
                        Ok(ChapStep {
                            keys: vec![self.algorithm_offer()],
                            state: ChapState::Continue,
                        })
                    }
                    "None" if self.target.is_none() => Ok(ChapStep {
                        keys: Vec::new(),
                        state: ChapState::Done {
                            user: None,
                            weak_secret: false,
                        },
                    }),
                    "None" => Err(AuthError::MutualUnavailable),
                    "Reject" => Err(AuthError::NoCommonMethod),
                    _ => Err(AuthError::Malformed("AuthMethod")),
                }
            }
            InitiatorState::AwaitChallenge => {
                let a = find(keys, "CHAP_A").ok_or(AuthError::MissingKey("CHAP_A"))?;
                if a == "Reject" {
                    return Err(AuthError::NoCommonAlgorithm);
                }
                let alg = parse_numeric(a)
                    .and_then(|n| u8::try_from(n).ok())
                    .map(ChapAlgorithm)
                    .filter(|alg| self.algorithms.contains(alg))
                    .ok_or(AuthError::Malformed("CHAP_A"))?;
                let id = parse_id(find(keys, "CHAP_I").ok_or(AuthError::MissingKey("CHAP_I"))?)?;
                let challenge =
                    parse_challenge(find(keys, "CHAP_C").ok_or(AuthError::MissingKey("CHAP_C"))?)?;
                if self.refused.iter().any(|c| ct_eq_bytes(c, &challenge)) {
                    return Err(AuthError::ReflectedChallenge);
                }
                let r = alg
                    .digest(id, self.creds.secret.expose(), &challenge)
                    .ok_or(AuthError::NoCommonAlgorithm)?;
                let mut out = vec![
                    pair("CHAP_N", self.creds.user.clone()),
                    pair("CHAP_R", encode_hex(&r)),
                ];
                let Some(target) = &self.target else {
                    return Ok(ChapStep {
                        keys: out,
                        state: ChapState::Done {
                            user: None,
                            weak_secret: self.weak,
                        },
                    });
                };
                if target.secret.ct_eq(&self.creds.secret) {
                    return Err(AuthError::SecretReuse);
                }
                let len = self.challenge_len.or(alg.digest_len()).unwrap_or(16);
                let mut ours = random_bytes(len)?;
                while ct_eq_bytes(&ours, &challenge) {
                    ours = random_bytes(len)?;
                }
                let our_id = random_bytes(1)?[0];
                out.push(pair("CHAP_I", our_id.to_string()));
                out.push(pair("CHAP_C", encode_hex(&ours)));
                self.sent_challenge = Some(ours.clone());
                self.state = InitiatorState::AwaitTargetResponse {
                    id: our_id,
                    challenge: ours,
                    alg,
                };
                Ok(ChapStep {
                    keys: out,
                    state: ChapState::Continue,
                })
            }
            InitiatorState::AwaitTargetResponse { id, challenge, alg } => {
                let target = self.target.as_ref().ok_or(AuthError::MutualUnavailable)?;
                let name = find(keys, "CHAP_N").ok_or(AuthError::MissingKey("CHAP_N"))?;
                let r = find(keys, "CHAP_R").ok_or(AuthError::MissingKey("CHAP_R"))?;
                let r = parse_binary(r).ok_or(AuthError::Malformed("CHAP_R"))?;
                let ok = verify(alg, id, target.secret.expose(), &challenge, &r);
                if !ok {
                    return Err(AuthError::BadResponse);
                }
                if name != target.user {
                    return Err(AuthError::WrongName);
                }
                Ok(ChapStep {
                    keys: Vec::new(),
                    state: ChapState::Done {
                        user: Some(name.to_owned()),
                        weak_secret: self.weak,
                    },
                })
            }
            InitiatorState::Finished => Err(AuthError::Finished),
        }
    }
}

#[cfg(test)]
mod tests;
