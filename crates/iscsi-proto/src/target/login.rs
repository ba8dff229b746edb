//! Target side of the login phase (RFC 7143 §6.3 and §11.12–11.13): stages, transit and
//! continue bits, authentication, operational negotiation, and the status to fail with.
//!
//! ```text
//!   SecurityNegotiation --T=1--> LoginOperationalNegotiation --T=1--> FullFeaturePhase
//!          \_____________________________T=1, NSG=3____________________/
//! ```
//! A stage is left only when the initiator sets T and this side agrees; the answer to the
//! final request is held back until the driver has placed the session ([`LoginOutcome::Complete`]).

use iscsi_wire::{LoginRequest, LoginStatus, Stage};

use crate::chap::{ChapAlgorithm, ChapState, TargetChap};
use crate::keys::{self, Negotiation, Role, SessionParams, SessionType};

use super::config::{AuthPolicy, PortalConfig};

/// What the connection should do with one login request.
#[derive(Debug)]
pub enum LoginOutcome {
    /// Answer with these keys and stay in login; `transit` moves to `nsg`.
    Respond {
        transit: bool,
        csg: Stage,
        nsg: Stage,
        text: Vec<u8>,
    },
    /// Login is done on our side: ask the driver to place the session, then answer.
    Complete {
        csg: Stage,
        text: Vec<u8>,
        params: Box<SessionParams>,
        initiator_name: String,
        target_name: Option<String>,
    },
    /// Answer with this status and close the connection.
    Fail(LoginStatus),
}

/// Login state of one connection.
pub(crate) struct TargetLogin {
    stage: Stage,
    first: Option<LoginRequest>,
    initiator_name: Option<String>,
    target_name: Option<String>,
    session_type: SessionType,
    negotiation: Negotiation,
    auth: Option<AuthPolicy>,
    chap: Option<TargetChap>,
    authenticated: bool,
    /// Text of requests with the C bit set, awaiting the last part.
    partial_text: Vec<u8>,
    tpgt_sent: bool,
}

/// Largest login text we accept across continued PDUs.
const MAX_LOGIN_TEXT: usize = 64 * 1024;

impl TargetLogin {
    pub(crate) fn new(config: &PortalConfig) -> Self {
        TargetLogin {
            stage: Stage::SecurityNegotiation,
            first: None,
            initiator_name: None,
            target_name: None,
            session_type: SessionType::Normal,
            negotiation: Negotiation::new(Role::Target, config.negotiation.clone()),
            auth: None,
            chap: None,
            authenticated: false,
            partial_text: Vec::new(),
            tpgt_sent: false,
        }
    }

    pub(crate) fn first_request(&self) -> Option<&LoginRequest> {
        self.first.as_ref()
    }

    pub(crate) fn step(
        &mut self,
        req: &LoginRequest,
        data: &[u8],
        config: &PortalConfig,
    ) -> LoginOutcome {
        match self.step_inner(req, data, config) {
            Ok(o) => o,
            Err(status) => LoginOutcome::Fail(status),
        }
    }

    fn step_inner(
        &mut self,
        req: &LoginRequest,
        data: &[u8],
        config: &PortalConfig,
    ) -> Result<LoginOutcome, LoginStatus> {
        if req.version_min > 0 {
            return Err(LoginStatus::UNSUPPORTED_VERSION);
        }
        match &self.first {
            None => self.first = Some(req.clone()),
            Some(f) => {
                if f.isid != req.isid || f.tsih != req.tsih || f.itt != req.itt || f.cid != req.cid
                {
                    return Err(LoginStatus::INITIATOR_ERROR);
                }
            }
        }
        let csg = Stage::from_bits(req.csg).ok_or(LoginStatus::INITIATOR_ERROR)?;
        if csg == Stage::FullFeaturePhase || (req.transit && req.continue_) {
            return Err(LoginStatus::INITIATOR_ERROR);
        }
        let nsg = if req.transit {
            match Stage::from_bits(req.nsg) {
                Some(n) if n != Stage::SecurityNegotiation && stage_rank(n) > stage_rank(csg) => n,
                _ => return Err(LoginStatus::INITIATOR_ERROR),
            }
        } else {
            csg
        };
        // The initiator may start in the operational stage only if it skips security.
        if csg != self.stage {
            let skipping_security = self.stage == Stage::SecurityNegotiation
                && csg == Stage::LoginOperationalNegotiation
                && self.initiator_name.is_none();
            if !skipping_security {
                return Err(LoginStatus::INITIATOR_ERROR);
            }
            self.stage = csg;
        }

        if self.partial_text.len() + data.len() > MAX_LOGIN_TEXT {
            return Err(LoginStatus::OUT_OF_RESOURCES);
        }
        self.partial_text.extend_from_slice(data);
        if req.continue_ {
            // More text follows: acknowledge with an empty response (§11.13.2).
            return Ok(LoginOutcome::Respond {
                transit: false,
                csg,
                nsg: csg,
                text: Vec::new(),
            });
        }
        let text = std::mem::take(&mut self.partial_text);
        let offers = keys::parse_text(&text).map_err(|_| LoginStatus::INITIATOR_ERROR)?;

        let mut answers: Vec<(String, String)> = Vec::new();
        let offers = if self.initiator_name.is_none() {
            self.identify(&offers, config, &mut answers)?;
            offers
        } else {
            // Some initiators (libiscsi) repeat their identity in every stage: accept an
            // unchanged repeat, refuse a change.
            self.drop_repeated_identity(offers)?
        };
        let leading = req.tsih == 0;
        let response = self
            .negotiation
            .respond(proto_stage(csg), leading, &offers)
            .map_err(|_| LoginStatus::INITIATOR_ERROR)?;
        answers.extend(response.answers);

        let auth_required = self.auth.as_ref().is_some_and(AuthPolicy::required);
        if csg == Stage::SecurityNegotiation {
            self.authenticate(&response.auth_keys, &mut answers)?;
        } else if auth_required && !self.authenticated {
            // Security negotiation was skipped, but this target demands it.
            return Err(LoginStatus::AUTHENTICATION_FAILURE);
        }

        let may_transit = req.transit && (csg != Stage::SecurityNegotiation || self.authenticated);
        let body = keys::encode_text(&answers);
        if may_transit && nsg == Stage::FullFeaturePhase {
            return Ok(LoginOutcome::Complete {
                csg,
                text: body,
                params: Box::new(self.negotiation.params()),
                initiator_name: self.initiator_name.clone().unwrap_or_default(),
                target_name: self.target_name.clone(),
            });
        }
        if may_transit {
            self.stage = nsg;
        }
        Ok(LoginOutcome::Respond {
            transit: may_transit,
            csg,
            nsg: if may_transit { nsg } else { csg },
            text: body,
        })
    }

    /// First request: who is the initiator, which target and what kind of session.
    fn identify(
        &mut self,
        offers: &[(String, String)],
        config: &PortalConfig,
        answers: &mut Vec<(String, String)>,
    ) -> Result<(), LoginStatus> {
        let get = |k: &str| {
            offers
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        let initiator = get("InitiatorName")
            .filter(|n| !n.is_empty())
            .ok_or(LoginStatus::MISSING_PARAMETER)?;
        self.session_type = match get("SessionType").as_deref() {
            None | Some("Normal") => SessionType::Normal,
            Some("Discovery") => SessionType::Discovery,
            Some(_) => return Err(LoginStatus::SESSION_TYPE_NOT_SUPPORTED),
        };
        match self.session_type {
            SessionType::Discovery => self.auth = Some(config.discovery_auth.clone()),
            SessionType::Normal => {
                let name = get("TargetName").ok_or(LoginStatus::MISSING_PARAMETER)?;
                let target = config.target(&name).ok_or(LoginStatus::NOT_FOUND)?;
                if !target.allows(&initiator) {
                    return Err(LoginStatus::AUTHORIZATION_FAILURE);
                }
                self.auth = Some(target.auth.clone());
                self.target_name = Some(target.name.clone());
                if !self.tpgt_sent {
                    // RFC 7143 §13.9: returned in the first login response of a normal session.
                    answers.push((
                        "TargetPortalGroupTag".into(),
                        config.portal_group_tag.to_string(),
                    ));
                    self.tpgt_sent = true;
                }
            }
        }
        self.initiator_name = Some(initiator);
        Ok(())
    }

    fn drop_repeated_identity(
        &self,
        offers: Vec<(String, String)>,
    ) -> Result<Vec<(String, String)>, LoginStatus> {
        let mut kept = Vec::with_capacity(offers.len());
        for (k, v) in offers {
            let same = match k.as_str() {
                "InitiatorName" => self
                    .initiator_name
                    .as_deref()
                    .map(|n| n.eq_ignore_ascii_case(&v)),
                "TargetName" => Some(
                    self.target_name
                        .as_deref()
                        .is_some_and(|n| n.eq_ignore_ascii_case(&v)),
                ),
                "SessionType" => Some(v == self.session_type.as_str()),
                _ => None,
            };
            match same {
                Some(true) => {}
                Some(false) => return Err(LoginStatus::INITIATOR_ERROR),
                None => kept.push((k, v)),
            }
        }
        Ok(kept)
    }

    /// Security stage: AuthMethod and CHAP keys go to the CHAP engine, which answers
    /// AuthMethod=None itself when this target needs no authentication.
    fn authenticate(
        &mut self,
        auth_keys: &[(String, String)],
        answers: &mut Vec<(String, String)>,
    ) -> Result<(), LoginStatus> {
        let policy = self.auth.clone().unwrap_or_default();
        if self.chap.is_none() {
            if auth_keys.is_empty() {
                // No AuthMethod offered: acceptable only when nothing is required.
                if policy.required() {
                    return Err(LoginStatus::AUTHENTICATION_FAILURE);
                }
                self.authenticated = true;
                return Ok(());
            }
            let algorithms = if policy.algorithms.is_empty() {
                vec![
                    ChapAlgorithm::SHA3_256,
                    ChapAlgorithm::SHA256,
                    ChapAlgorithm::SHA1,
                    ChapAlgorithm::MD5,
                ]
            } else {
                policy.algorithms.clone()
            };
            self.chap = Some(TargetChap::new(
                policy.initiators.clone(),
                policy.target.clone(),
                algorithms,
            ));
        }
        let Some(chap) = &mut self.chap else {
            return Ok(());
        };
        if auth_keys.is_empty() && self.authenticated {
            return Ok(());
        }
        let step = chap
            .step(auth_keys)
            .map_err(|e| LoginStatus(e.login_status()))?;
        answers.extend(step.keys);
        if matches!(step.state, ChapState::Done { .. }) {
            self.authenticated = true;
        }
        Ok(())
    }
}

fn stage_rank(s: Stage) -> u8 {
    s.bits()
}

fn proto_stage(s: Stage) -> keys::Stage {
    match s {
        Stage::SecurityNegotiation => keys::Stage::Security,
        Stage::LoginOperationalNegotiation => keys::Stage::Operational,
        Stage::FullFeaturePhase => keys::Stage::FullFeature,
    }
}
