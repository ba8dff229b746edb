//! What a caller configures: identity, target, authentication, negotiation and recovery.

use std::time::Duration;

use iscsi_proto::initiator::ChapConfig;
use iscsi_proto::keys::{Digest, NegotiationConfig};
use iscsi_wire::Isid;

/// The initiator port a session logs in as. It belongs to the caller (a VM), not to the
/// host: the same identity on another host continues the same I_T nexus.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// InitiatorName, e.g. `iqn.2024-01.org.viscsi:vm1`.
    pub initiator_name: String,
    pub alias: Option<String>,
    /// The stable ISID. Never random per connection: a new ISID would be a new I_T nexus.
    pub isid: Isid,
}

impl Identity {
    /// An identity with no alias.
    pub fn new(initiator_name: impl Into<String>, isid: Isid) -> Self {
        Identity {
            initiator_name: initiator_name.into(),
            alias: None,
            isid,
        }
    }
}

/// When and how a session recovers from a lost connection.
///
/// Defaults: the first reconnect at once, then backoff from 10 ms doubling to 50 ms; each
/// attempt's TCP connect and login bounded by 2 s and 5 s; NOP-Out ping after 5 s without a
/// PDU from the target, 5 s to answer; give up (and fail the outstanding commands) after
/// 120 s without a working connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveryPolicy {
    pub connect_timeout: Duration,
    pub login_timeout: Duration,
    /// Idle time before a NOP-Out ping (None: no pings).
    pub nop_interval: Option<Duration>,
    /// A ping unanswered this long fails the connection.
    pub nop_timeout: Duration,
    /// Delay before the second attempt (the first is immediate); doubles each time.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Give up after this long without a session (None: never).
    pub give_up_after: Option<Duration>,
    /// Give up after this many failed attempts in a row (None: no limit).
    pub max_attempts: Option<u32>,
}

impl Default for RecoveryPolicy {
    fn default() -> Self {
        RecoveryPolicy {
            connect_timeout: Duration::from_secs(2),
            login_timeout: Duration::from_secs(5),
            nop_interval: Some(Duration::from_secs(5)),
            nop_timeout: Duration::from_secs(5),
            backoff_initial: Duration::from_millis(10),
            backoff_max: Duration::from_millis(50),
            give_up_after: Some(Duration::from_secs(120)),
            max_attempts: None,
        }
    }
}

impl RecoveryPolicy {
    /// The delay before attempt `n` (0-based) of a recovery.
    pub fn backoff(&self, attempt: u32) -> Duration {
        if attempt == 0 {
            return Duration::ZERO;
        }
        let factor = 1u32.checked_shl(attempt - 1).unwrap_or(u32::MAX);
        self.backoff_initial
            .saturating_mul(factor)
            .min(self.backoff_max)
    }
}

/// A normal session to one target.
#[derive(Clone, Debug)]
pub struct SessionOptions {
    pub identity: Identity,
    /// `host:port` or `[v6]:port` (port 3260 if absent).
    pub portal: String,
    /// TargetName.
    pub target: String,
    pub chap: Option<ChapConfig>,
    /// What we offer. Defaults: digests `None,CRC32C` (the target's answer decides),
    /// MaxRecvDataSegmentLength 256 KiB, MaxBurstLength 16 MiB − 512 (RFC 7143 allows at most
    /// 2^24 − 1; this is the largest multiple of 512 below), FirstBurstLength 256 KiB,
    /// ImmediateData Yes, InitialR2T No (the target's answer decides).
    pub negotiation: NegotiationConfig,
    pub policy: RecoveryPolicy,
}

impl SessionOptions {
    /// Options with viscsi's defaults for everything but the identity and the target.
    pub fn new(identity: Identity, portal: impl Into<String>, target: impl Into<String>) -> Self {
        SessionOptions {
            identity,
            portal: portal.into(),
            target: target.into(),
            chap: None,
            negotiation: default_negotiation(),
            policy: RecoveryPolicy::default(),
        }
    }

    /// Offer only these digests, in this order, for both header and data.
    pub fn with_digests(mut self, header: Vec<Digest>, data: Vec<Digest>) -> Self {
        self.negotiation.header_digest = header;
        self.negotiation.data_digest = data;
        self
    }
}

/// The negotiation we offer unless told otherwise.
pub fn default_negotiation() -> NegotiationConfig {
    NegotiationConfig {
        max_recv_data_segment_length: 262_144,
        max_burst_length: (1 << 24) - 512,
        first_burst_length: 262_144,
        initial_r2t: false,
        immediate_data: true,
        ..NegotiationConfig::default()
    }
}

/// A discovery session.
#[derive(Clone, Debug)]
pub struct DiscoveryOptions {
    pub identity: Identity,
    pub portal: String,
    pub chap: Option<ChapConfig>,
    pub policy: RecoveryPolicy,
}

/// `host:port` with the default iSCSI port added when missing.
pub fn with_default_port(portal: &str) -> String {
    let has_port = if let Some(rest) = portal.strip_prefix('[') {
        rest.split_once(']')
            .is_some_and(|(_, p)| p.starts_with(':'))
    } else {
        portal.matches(':').count() == 1
    };
    if has_port {
        portal.to_owned()
    } else if portal.contains(':') && !portal.starts_with('[') {
        format!("[{portal}]:3260")
    } else {
        format!("{portal}:3260")
    }
}
