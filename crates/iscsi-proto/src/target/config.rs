//! What a portal offers: its targets, their authentication and access lists, and the
//! negotiation limits. Plain data, validated by whoever builds it.

use crate::chap::{ChapAlgorithm, Credentials};
use crate::keys::NegotiationConfig;

/// How initiators must authenticate to a target (or to discovery sessions).
#[derive(Clone, Debug, Default)]
pub struct AuthPolicy {
    /// Accepted initiator credentials. Empty means no CHAP is required.
    pub initiators: Vec<Credentials>,
    /// The target's own credentials, used when the initiator asks for mutual CHAP.
    pub target: Option<Credentials>,
    /// CHAP algorithms allowed, in our order of preference. Empty means all, strongest first.
    pub algorithms: Vec<ChapAlgorithm>,
}

impl AuthPolicy {
    pub fn required(&self) -> bool {
        !self.initiators.is_empty()
    }
}

/// One target served on a portal.
#[derive(Clone, Debug)]
pub struct TargetEntry {
    pub name: String,
    pub alias: Option<String>,
    pub auth: AuthPolicy,
    /// Initiator names allowed to log in; empty allows every initiator.
    pub allowed_initiators: Vec<String>,
}

impl TargetEntry {
    pub fn allows(&self, initiator: &str) -> bool {
        self.allowed_initiators.is_empty()
            || self
                .allowed_initiators
                .iter()
                .any(|i| i.eq_ignore_ascii_case(initiator))
    }
}

/// Everything a connection needs to know about the portal it arrived on.
#[derive(Clone, Debug)]
pub struct PortalConfig {
    pub targets: Vec<TargetEntry>,
    pub discovery_auth: AuthPolicy,
    pub negotiation: NegotiationConfig,
    pub portal_group_tag: u16,
    /// `TargetAddress` values returned by SendTargets (`host:port,tpgt`).
    pub addresses: Vec<String>,
    /// The command window advertised to each session (MaxCmdSN - ExpCmdSN + 1).
    pub command_window: u32,
    /// Idle time after which the target sends a NOP-In ping; `None` disables pings.
    pub nop_in_interval: Option<std::time::Duration>,
    /// How long a ping may go unanswered before the connection is declared dead.
    pub nop_in_timeout: std::time::Duration,
}

impl PortalConfig {
    pub fn target(&self, name: &str) -> Option<&TargetEntry> {
        self.targets
            .iter()
            .find(|t| t.name.eq_ignore_ascii_case(name))
    }
}
