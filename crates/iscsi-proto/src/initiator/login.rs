//! The initiator side of one connection's login (RFC 7143 §6.3, §11.12, §11.13).
//!
//! [`InitiatorLogin`] writes the Login Requests and judges the target's Login Responses; the
//! driver moves the PDUs and bounds the whole exchange with its own timeout. The keys come
//! from [`Negotiation`] (declarations, operational offers, checking the answers) and
//! [`InitiatorChap`] (AuthMethod and `CHAP_*`); this module only decides stages, the T and C
//! bits, the header fields and what each status means.
//!
//! One login runs like this (one-way CHAP; without CHAP the first request offers
//! `AuthMethod=None` with T=1 and the CHAP requests are skipped):
//!
//! ```text
//! I -> T  CSG=0 T=0        InitiatorName, SessionType, TargetName, AuthMethod=CHAP,None
//! T -> I  CSG=0 T=0        AuthMethod=CHAP, TargetPortalGroupTag
//! I -> T  CSG=0 T=0        CHAP_A=8,7,6,5
//! T -> I  CSG=0 T=0        CHAP_A, CHAP_I, CHAP_C
//! I -> T  CSG=0 T=1 NSG=1  CHAP_N, CHAP_R              (mutual: + CHAP_I, CHAP_C)
//! T -> I  CSG=0 T=1 NSG=1                              (mutual: CHAP_N, CHAP_R, checked here)
//! I -> T  CSG=1 T=1 NSG=3  operational offers
//! T -> I  CSG=1 T=1 NSG=3  answers, TSIH                -> LoginStep::Done
//! ```
//!
//! Decisions where the RFC leaves room:
//! - Every request of the login carries the same ITT ([`LOGIN_ITT`]), the configured TSIH
//!   and CmdSN (Login Requests are immediate, so CmdSN does not advance).
//! - A response with C=1 is acknowledged with an empty request (T=0) and its text is gathered
//!   before parsing. A request text over 8192 bytes (only possible when answering a flood of
//!   unknown keys) is sent in parts with C=1, waiting for the target's empty acknowledgement.
//! - The target may leave a stage only when our last request with keys asked to (T=1), and
//!   never the security stage before our side of authentication is complete. It may go further
//!   than we asked (security straight to full feature phase): the keys we never offered keep
//!   their RFC defaults.
//! - A final response (T=1, NSG=3) that asks us for answers is refused, except for keys we do
//!   not understand, whose `NotUnderstood` answer is dropped.

use std::fmt;
use std::time::Instant;

use bytes::Bytes;
use iscsi_wire::{Header, LoginRequest, LoginResponse, LoginStatus, PduError, RawPdu, Stage};

use super::{LoginConfig, LoginError, LoginResult, LoginStep};
use crate::chap::{AuthError, ChapState, InitiatorChap};
use crate::keys::{self, KeyKind, Negotiation, NegotiationError, Role, SessionType};
use crate::OutPdu;

/// The ITT of every Login Request of a login: the whole exchange is one task.
pub(crate) const LOGIN_ITT: u32 = 0;
/// Most text in one Login PDU: MaxRecvDataSegmentLength is not in force before full feature
/// phase, and 8192 is its default (§13.12).
const MAX_TEXT_PER_PDU: usize = 8192;
/// Most text gathered from Login Responses with the C bit.
const MAX_GATHERED_TEXT: usize = 64 * 1024;
/// Login Responses one login may take before we stop listening to the target.
const MAX_RESPONSES: u32 = 256;

/// The stages of a login as the initiator sees them (RFC 7143 §6.3). A stage is left when a
/// Login Response has T=1; the target chooses the next stage, at most as far as our last
/// request asked (or straight to full feature phase once authentication is complete):
///
/// ```text
///   NotStarted --start()--> Security --T=1, NSG=1--> Operational --T=1, NSG=3--> FullFeature
///                            (CSG=0)                  (CSG=1)                        ^
///                               \______________________T=1, NSG=3___________________/
///
///   Security or Operational --status class != 0, bad PDU, bad keys--> Failed
/// ```
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum LoginState {
    /// `start` not called yet.
    NotStarted,
    /// SecurityNegotiation (CSG=0): AuthMethod and CHAP.
    Security,
    /// LoginOperationalNegotiation (CSG=1): operational keys.
    Operational,
    /// FullFeaturePhase: the result was handed out.
    FullFeature,
    /// The login failed in this stage; the driver closes the connection.
    Failed(Stage),
}

/// Our side of authentication, once complete.
struct AuthOutcome {
    /// The target's CHAP_N after mutual CHAP.
    target: Option<String>,
    weak_secret: bool,
}

/// The tail of a request text too long for one PDU.
struct PendingText {
    text: Bytes,
    /// The T bit (as the next stage) of the last part.
    transit: Option<Stage>,
}

/// Login state machine of one connection, initiator side.
pub struct InitiatorLogin {
    config: LoginConfig,
    negotiation: Negotiation,
    chap: Option<InitiatorChap>,
    state: LoginState,
    auth: Option<AuthOutcome>,
    exp_stat_sn: u32,
    /// T (as the requested next stage) of our last request that carried keys; the empty
    /// acknowledgements of continued responses do not change it.
    asked_transit: Option<Stage>,
    /// Text of responses with C=1, awaiting the last part.
    rx_text: Vec<u8>,
    /// Rest of our request text still to send (we sent a part with C=1).
    tx_rest: Option<PendingText>,
    responses: u32,
    first: Option<OutPdu>,
}

impl fmt::Debug for InitiatorLogin {
    // By hand: the buffers hold CHAP responses, which stay out of logs like the secrets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InitiatorLogin")
            .field("state", &self.state)
            .field("isid", &self.config.isid)
            .field("cid", &self.config.cid)
            .field("session_type", &self.config.session_type)
            .field("chap", &self.chap.is_some())
            .field("authenticated", &self.auth.is_some())
            .field("exp_stat_sn", &self.exp_stat_sn)
            .field("responses", &self.responses)
            .finish_non_exhaustive()
    }
}

impl InitiatorLogin {
    pub fn new(config: LoginConfig) -> Self {
        let mut nc = config.negotiation.clone();
        nc.initiator_name = Some(config.initiator_name.clone());
        nc.initiator_alias = config.initiator_alias.clone().or(nc.initiator_alias);
        nc.session_type = config.session_type;
        if config.session_type == SessionType::Discovery {
            nc.target_name = None;
        }
        let chap = config.chap.as_ref().map(|c| {
            InitiatorChap::new(
                c.credentials.clone(),
                c.target.clone(),
                c.algorithms.clone(),
            )
        });
        InitiatorLogin {
            negotiation: Negotiation::new(Role::Initiator, nc),
            chap,
            state: LoginState::NotStarted,
            auth: None,
            exp_stat_sn: config.exp_stat_sn,
            asked_transit: None,
            rx_text: Vec::new(),
            tx_rest: None,
            responses: 0,
            first: None,
            config,
        }
    }

    // ---- getters ----

    /// The current stage (CSG of the next request); FullFeaturePhase once login succeeded.
    pub fn stage(&self) -> Stage {
        match self.state {
            LoginState::NotStarted | LoginState::Security => Stage::SecurityNegotiation,
            LoginState::Operational => Stage::LoginOperationalNegotiation,
            LoginState::FullFeature => Stage::FullFeaturePhase,
            LoginState::Failed(stage) => stage,
        }
    }

    /// True once login reached full feature phase or failed: no more PDUs are accepted.
    pub fn is_finished(&self) -> bool {
        matches!(self.state, LoginState::FullFeature | LoginState::Failed(_))
    }

    /// True when our side of authentication is complete (CHAP done, or AuthMethod=None
    /// agreed).
    pub fn is_authenticated(&self) -> bool {
        self.auth.is_some()
    }

    // ---- the exchange ----

    /// The first Login Request. Calling it again returns the same request.
    pub fn start(&mut self) -> OutPdu {
        if let Some(first) = &self.first {
            return first.clone();
        }
        self.state = LoginState::Security;
        let mut pairs = self
            .negotiation
            .offers(keys::Stage::Security, self.leading());
        let transit = match &mut self.chap {
            // CHAP needs more round trips in this stage: not ready to leave it yet.
            Some(chap) => {
                pairs.extend(chap.offer());
                None
            }
            None => {
                pairs.push(("AuthMethod".to_owned(), "None".to_owned()));
                Some(Stage::LoginOperationalNegotiation)
            }
        };
        let out = self.send(&pairs, transit);
        self.first = Some(out.clone());
        out
    }

    /// Feeds one PDU from the target (a framing complaint is a protocol error here). `now` is
    /// unused: login keeps no timers, the driver bounds the exchange.
    pub fn handle_pdu(
        &mut self,
        pdu: Result<RawPdu, PduError>,
        now: Instant,
    ) -> Result<LoginStep, LoginError> {
        let _ = now;
        match self.state {
            LoginState::NotStarted => {
                return Err(LoginError::Protocol("PDU before the first Login Request"))
            }
            LoginState::FullFeature | LoginState::Failed(_) => {
                return Err(LoginError::Protocol("PDU after the login ended"))
            }
            LoginState::Security | LoginState::Operational => {}
        }
        let result = self.step(pdu);
        match &result {
            Ok(LoginStep::Done(_)) => self.state = LoginState::FullFeature,
            Ok(LoginStep::Send(_)) => {}
            Err(_) => {
                self.state = LoginState::Failed(self.stage());
                self.rx_text = Vec::new();
                self.tx_rest = None;
            }
        }
        result
    }

    fn step(&mut self, pdu: Result<RawPdu, PduError>) -> Result<LoginStep, LoginError> {
        let pdu = pdu.map_err(|_| LoginError::Protocol("malformed PDU during login"))?;
        let resp = match Header::parse(&pdu.bhs) {
            Ok(Header::LoginResponse(r)) => r,
            Ok(Header::Reject(_)) => {
                return Err(LoginError::Protocol("target rejected a Login Request"))
            }
            _ => return Err(LoginError::Protocol("PDU other than a Login Response")),
        };
        self.responses += 1;
        if self.responses > MAX_RESPONSES {
            return Err(LoginError::Protocol("too many Login Responses"));
        }
        if resp.itt != LOGIN_ITT {
            return Err(LoginError::Protocol("Login Response for another ITT"));
        }
        self.exp_stat_sn = resp.stat_sn.wrapping_add(1);
        match resp.status.class() {
            0 => {}
            1 => return Err(self.redirection(resp.status, &pdu.data)),
            _ => {
                return Err(LoginError::Refused {
                    status: resp.status,
                })
            }
        }
        self.check_header(&resp)?;

        // Our own text in parts: the target acknowledges each part with an empty response.
        if let Some(rest) = self.tx_rest.take() {
            if resp.transit || resp.continue_ || !pdu.data.is_empty() {
                return Err(LoginError::Protocol(
                    "target answered a partial Login Request",
                ));
            }
            return Ok(LoginStep::Send(self.send_text(rest.text, rest.transit)));
        }

        // The target's text in parts: acknowledge each part, parse the whole.
        if self.rx_text.len() + pdu.data.len() > MAX_GATHERED_TEXT {
            return Err(LoginError::Protocol("login text too long"));
        }
        self.rx_text.extend_from_slice(&pdu.data);
        if resp.continue_ {
            return Ok(LoginStep::Send(self.request(None, false, Bytes::new())));
        }
        let text = std::mem::take(&mut self.rx_text);
        let pairs =
            keys::parse_text(&text).map_err(|_| LoginError::Protocol("malformed login text"))?;
        self.answer(&resp, &pairs)
    }

    /// Header checks of a successful response: version, ISID, stage, T/C combination.
    fn check_header(&self, resp: &LoginResponse) -> Result<(), LoginError> {
        if resp.version_active != 0 {
            return Err(LoginError::Protocol(
                "unsupported version in Login Response",
            ));
        }
        if resp.isid.to_bytes() != self.config.isid.to_bytes() {
            return Err(LoginError::Protocol("Login Response for another ISID"));
        }
        if resp.csg != self.stage().bits() {
            return Err(LoginError::Protocol("Login Response for another stage"));
        }
        if resp.transit && resp.continue_ {
            return Err(LoginError::Protocol("Login Response with both T and C set"));
        }
        Ok(())
    }

    /// One complete response text in the current stage: check the keys, run authentication,
    /// then stay, move on or finish as the target's T bit and NSG say.
    fn answer(
        &mut self,
        resp: &LoginResponse,
        pairs: &[(String, String)],
    ) -> Result<LoginStep, LoginError> {
        let stage = proto_stage(self.stage());
        let auth_keys: Vec<(String, String)> = pairs
            .iter()
            .filter(|(k, _)| auth_key(k).is_some())
            .cloned()
            .collect();
        if stage == keys::Stage::Operational {
            if let Some(key) = auth_keys.first().and_then(|(k, _)| auth_key(k)) {
                return Err(NegotiationError::WrongPhase { key, stage }.into());
            }
        }
        let mut reply = self.negotiation.accept_answers(stage, pairs)?;
        if stage == keys::Stage::Security {
            reply.extend(self.authenticate(&auth_keys)?);
        }

        if !resp.transit {
            return Ok(LoginStep::Send(self.continue_stage(&reply)));
        }
        let nsg = Stage::from_bits(resp.nsg)
            .filter(|n| n.bits() > self.stage().bits())
            .ok_or(LoginError::Protocol(
                "Login Response with an invalid next stage",
            ))?;
        if self.asked_transit.is_none() {
            return Err(LoginError::Protocol(
                "target changed stage without our T bit",
            ));
        }
        if self.auth.is_none() {
            // Only reachable with a target that skips CHAP steps: never trust it.
            return Err(LoginError::Protocol(
                "target left the security stage before authentication completed",
            ));
        }
        if nsg == Stage::FullFeaturePhase {
            // Nothing can answer a final response; tolerate only our NotUnderstood replies.
            if reply.iter().any(|(_, v)| v != keys::NOT_UNDERSTOOD) {
                return Err(LoginError::Protocol(
                    "final Login Response asks for answers",
                ));
            }
            return self.finish(resp).map(|r| LoginStep::Done(Box::new(r)));
        }
        // Security -> operational: our offers, plus answers owed from the security stage.
        self.state = LoginState::Operational;
        let mut pairs = self
            .negotiation
            .offers(keys::Stage::Operational, self.leading());
        pairs.extend(reply);
        Ok(LoginStep::Send(
            self.send(&pairs, Some(Stage::FullFeaturePhase)),
        ))
    }

    /// The next request within the current stage (the target answered with T=0).
    fn continue_stage(&mut self, reply: &[(String, String)]) -> OutPdu {
        let transit = match self.state {
            LoginState::Security => {
                // Ready to leave once our side is done, or (mutual CHAP) when the target's
                // proof is all that is missing: it comes with the response that transits.
                let awaiting_proof = self
                    .chap
                    .as_ref()
                    .is_some_and(|c| c.sent_challenge().is_some());
                (self.auth.is_some() || awaiting_proof)
                    .then_some(Stage::LoginOperationalNegotiation)
            }
            _ => Some(Stage::FullFeaturePhase),
        };
        self.send(reply, transit)
    }

    /// Feeds the security stage's auth keys to CHAP (or checks `AuthMethod=None`) and returns
    /// the keys to send back.
    fn authenticate(
        &mut self,
        auth_keys: &[(String, String)],
    ) -> Result<Vec<(String, String)>, LoginError> {
        if self.auth.is_some() {
            if let Some(key) = auth_keys.first().and_then(|(k, _)| auth_key(k)) {
                return Err(AuthError::Unexpected(key).into());
            }
            return Ok(Vec::new());
        }
        let Some(chap) = &mut self.chap else {
            // We offered AuthMethod=None only.
            if let Some(key) = auth_keys
                .iter()
                .filter_map(|(k, _)| auth_key(k))
                .find(|k| *k != "AuthMethod")
            {
                return Err(AuthError::Unexpected(key).into());
            }
            let method = auth_keys.iter().find(|(k, _)| k == "AuthMethod");
            match method.map(|(_, v)| v.as_str()) {
                // A missing answer leaves AuthMethod at its default, None.
                None | Some("None") => {}
                Some(keys::REJECT) => return Err(AuthError::NoCommonMethod.into()),
                Some(_) => return Err(AuthError::Malformed("AuthMethod").into()),
            }
            self.auth = Some(AuthOutcome {
                target: None,
                weak_secret: false,
            });
            return Ok(Vec::new());
        };
        let step = chap.step(auth_keys)?;
        if let ChapState::Done { user, weak_secret } = step.state {
            self.auth = Some(AuthOutcome {
                target: user,
                weak_secret,
            });
        }
        Ok(step.keys)
    }

    /// The final response (T=1, NSG=FullFeaturePhase, status 0): the login's result.
    fn finish(&mut self, resp: &LoginResponse) -> Result<LoginResult, LoginError> {
        if !self.negotiation.unanswered().is_empty() {
            return Err(LoginError::Protocol(
                "target did not answer every offered key",
            ));
        }
        // §11.13.4: a new session gets a non-zero TSIH in the final response only; an
        // existing one keeps its own.
        let tsih_ok = match self.config.tsih {
            0 => resp.tsih != 0,
            ours => resp.tsih == ours,
        };
        if !tsih_ok {
            return Err(LoginError::Protocol(
                "invalid TSIH in the final Login Response",
            ));
        }
        let params = self.negotiation.params();
        // Copied, not taken: `is_authenticated` stays true after the login.
        let (authenticated_target, weak_secret) = self
            .auth
            .as_ref()
            .map_or((None, false), |a| (a.target.clone(), a.weak_secret));
        Ok(LoginResult {
            target_portal_group_tag: params.tpgt,
            params,
            tsih: resp.tsih,
            isid: self.config.isid,
            cid: self.config.cid,
            // The Login Requests were immediate: the first command takes the same CmdSN.
            cmd_sn: self.config.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            exp_cmd_sn: resp.exp_cmd_sn,
            max_cmd_sn: resp.max_cmd_sn,
            authenticated_target,
            weak_secret,
        })
    }

    /// Status class 1: where the target sends us (TargetAddress without its `,tpgt`).
    fn redirection(&mut self, status: LoginStatus, data: &[u8]) -> LoginError {
        let mut text = std::mem::take(&mut self.rx_text);
        text.extend_from_slice(data);
        let Ok(pairs) = keys::parse_text_multi(&text) else {
            return LoginError::Protocol("malformed text in a redirection");
        };
        let address = pairs
            .iter()
            .find(|(k, _)| k == "TargetAddress")
            .and_then(|(_, v)| v.split(',').next())
            .filter(|a| !a.is_empty());
        match address {
            Some(a) => LoginError::Redirected {
                address: a.to_owned(),
                permanent: status == LoginStatus::TARGET_MOVED_PERMANENTLY,
            },
            None => LoginError::Protocol("redirection without TargetAddress"),
        }
    }

    // ---- requests ----

    /// A session with TSIH 0 is new: this is its leading connection.
    fn leading(&self) -> bool {
        self.config.tsih == 0
    }

    /// Sends keys in the current stage; `transit` is the next stage we ask for (T=1).
    fn send(&mut self, pairs: &[(String, String)], transit: Option<Stage>) -> OutPdu {
        self.asked_transit = transit;
        let text = Bytes::from(keys::encode_text(pairs));
        self.send_text(text, transit)
    }

    /// Sends a text, the first 8192 bytes only (with C=1) if it is longer.
    fn send_text(&mut self, text: Bytes, transit: Option<Stage>) -> OutPdu {
        if text.len() > MAX_TEXT_PER_PDU {
            let rest = text.slice(MAX_TEXT_PER_PDU..);
            self.tx_rest = Some(PendingText {
                text: rest,
                transit,
            });
            return self.request(None, true, text.slice(..MAX_TEXT_PER_PDU));
        }
        self.request(transit, false, text)
    }

    fn request(&self, transit: Option<Stage>, continue_: bool, data: Bytes) -> OutPdu {
        let mut bhs = LoginRequest {
            transit: transit.is_some(),
            continue_,
            csg: self.stage().bits(),
            // NSG is reserved when T=0.
            nsg: transit.map_or(0, Stage::bits),
            version_max: 0,
            version_min: 0,
            isid: self.config.isid,
            tsih: self.config.tsih,
            itt: LOGIN_ITT,
            cid: self.config.cid,
            cmd_sn: self.config.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
        }
        .to_bhs();
        // Data is at most 8192 bytes here: the 24-bit field holds it.
        bhs.set_data_segment_len(u32::try_from(data.len()).unwrap_or(u32::MAX));
        OutPdu {
            bhs,
            ahs: Bytes::new(),
            data,
        }
    }
}

/// The table name of an AuthMethod / `CHAP_*` key.
fn auth_key(k: &str) -> Option<&'static str> {
    keys::lookup(k)
        .filter(|d| d.kind == KeyKind::Auth)
        .map(|d| d.name)
}

fn proto_stage(s: Stage) -> keys::Stage {
    match s {
        Stage::SecurityNegotiation => keys::Stage::Security,
        Stage::LoginOperationalNegotiation => keys::Stage::Operational,
        Stage::FullFeaturePhase => keys::Stage::FullFeature,
    }
}

#[cfg(test)]
#[path = "login_tests.rs"]
mod tests;
