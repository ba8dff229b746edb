//! One TCP connection: connect, log in (following redirections, falling back to CHAP MD5 for
//! targets that refuse an algorithm list), and hand back a framed stream ready for full
//! feature phase.

use std::time::{Duration, Instant};

use iscsi_net::{PduReader, PduWriter};
use iscsi_proto::chap::ChapAlgorithm;
use iscsi_proto::initiator::{
    ChapConfig, InitiatorLogin, LoginConfig, LoginError, LoginResult, LoginStep,
};
use iscsi_proto::keys::{NegotiationConfig, SessionType};
use iscsi_wire::{FrameLimits, LoginStatus};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use crate::options::with_default_port;
use crate::{Error, Identity, RecoveryPolicy};

/// Redirections followed before a login gives up.
const MAX_REDIRECTS: usize = 8;

/// While a TCP connect gets no answer (lost SYNs: a path that is down, or was until a moment
/// ago), another one starts this often; the first to connect wins. The kernel's own SYN
/// retransmission waits 1 s, then 3 s: far too long for a session that must be back within
/// milliseconds of its target.
const CONNECT_RACE_INTERVAL: Duration = Duration::from_millis(100);
/// At most this many connects race at once.
const MAX_RACING_CONNECTS: usize = 8;

pub(crate) type Reader = PduReader<OwnedReadHalf>;
pub(crate) type Writer = PduWriter<OwnedWriteHalf>;

/// A connection in full feature phase.
pub(crate) struct Established {
    pub reader: Reader,
    pub writer: Writer,
    pub login: LoginResult,
}

/// What a login needs, whatever the session type.
#[derive(Clone, Debug)]
pub(crate) struct LoginPlan {
    pub identity: Identity,
    pub portal: String,
    pub target: Option<String>,
    pub session_type: SessionType,
    pub chap: Option<ChapConfig>,
    pub negotiation: NegotiationConfig,
    pub policy: RecoveryPolicy,
}

impl LoginPlan {
    /// True if the CHAP algorithm list is worth retrying as MD5 alone.
    fn offers_algorithm_list(&self) -> bool {
        self.chap
            .as_ref()
            .is_some_and(|c| effective_algorithms(c) != [ChapAlgorithm::MD5])
    }

    /// The same plan with CHAP restricted to MD5.
    pub fn md5_only(&self) -> LoginPlan {
        let mut plan = self.clone();
        if let Some(c) = plan.chap.as_mut() {
            c.algorithms = vec![ChapAlgorithm::MD5];
        }
        plan
    }
}

fn effective_algorithms(c: &ChapConfig) -> Vec<ChapAlgorithm> {
    if c.algorithms.is_empty() {
        ChapAlgorithm::DEFAULT_PREFERENCE.to_vec()
    } else {
        c.algorithms.clone()
    }
}

/// A target that cannot take an algorithm list answers with one of these.
fn may_be_algorithm_trouble(e: &Error) -> bool {
    match e {
        Error::Login { source, .. } => matches!(
            source,
            LoginError::Auth(_)
                | LoginError::Refused {
                    status: LoginStatus::AUTHENTICATION_FAILURE | LoginStatus::INITIATOR_ERROR
                }
        ),
        _ => false,
    }
}

/// Connects and logs in. With CHAP and a list of algorithms, a refused login is tried once
/// more with MD5 alone (for targets that reject lists or number algorithms differently);
/// `plan` is then updated so later logins go straight to MD5.
pub(crate) async fn establish(plan: &mut LoginPlan) -> Result<Established, Error> {
    match establish_once(plan).await {
        Err(e) if plan.offers_algorithm_list() && may_be_algorithm_trouble(&e) => {
            let md5 = plan.md5_only();
            // If MD5 alone fails too, its error is the telling one (the first may only say
            // that the target did not understand our algorithm).
            let est = establish_once(&md5).await.inspect_err(|_| {
                tracing::debug!(first = %e, "CHAP with an algorithm list failed");
            })?;
            tracing::info!(portal = %plan.portal, "target accepted CHAP only with MD5 alone");
            *plan = md5;
            Ok(est)
        }
        other => other,
    }
}

async fn establish_once(plan: &LoginPlan) -> Result<Established, Error> {
    let mut portal = with_default_port(&plan.portal);
    for _ in 0..=MAX_REDIRECTS {
        match login_at(plan, &portal).await {
            Ok(est) => return Ok(est),
            Err(Error::Login {
                source: LoginError::Redirected { address, permanent },
                ..
            }) => {
                tracing::info!(from = %portal, to = %address, permanent, "login redirected");
                portal = with_default_port(&address);
            }
            Err(e) => return Err(e),
        }
    }
    Err(Error::Login {
        portal,
        source: LoginError::Protocol("too many redirections"),
    })
}

/// Connects to `portal` within `timeout`. A refused or unreachable portal fails at once; a
/// silent one gets a fresh connect every [`CONNECT_RACE_INTERVAL`].
async fn connect_racing(portal: &str, timeout: Duration) -> std::io::Result<TcpStream> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut racing = tokio::task::JoinSet::new();
    loop {
        if racing.len() < MAX_RACING_CONNECTS {
            racing.spawn(TcpStream::connect(portal.to_owned()));
        }
        let next = tokio::time::Instant::now() + CONNECT_RACE_INTERVAL;
        tokio::select! {
            Some(done) = racing.join_next() => match done {
                Ok(Ok(stream)) => return Ok(stream),
                Ok(Err(e)) => return Err(e),
                Err(join) => return Err(std::io::Error::other(join.to_string())),
            },
            _ = tokio::time::sleep_until(next.min(deadline)) => {
                if tokio::time::Instant::now() >= deadline {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "connect timed out",
                    ));
                }
            }
        }
    }
}

async fn login_at(plan: &LoginPlan, portal: &str) -> Result<Established, Error> {
    let connect_error = |source| Error::Connect {
        portal: portal.to_owned(),
        source,
    };
    let stream = connect_racing(portal, plan.policy.connect_timeout)
        .await
        .map_err(connect_error)?;
    let _ = stream.set_nodelay(true);
    let (rd, wr) = stream.into_split();
    let mut reader = PduReader::new(rd);
    let mut writer = PduWriter::new(wr);

    let mut login = InitiatorLogin::new(LoginConfig {
        initiator_name: plan.identity.initiator_name.clone(),
        initiator_alias: plan.identity.alias.clone(),
        isid: plan.identity.isid,
        tsih: 0,
        cid: 0,
        session_type: plan.session_type,
        chap: plan.chap.clone(),
        negotiation: NegotiationConfig {
            target_name: plan.target.clone(),
            ..plan.negotiation.clone()
        },
        cmd_sn: 1,
        exp_stat_sn: 0,
    });
    let login_error = |source| Error::Login {
        portal: portal.to_owned(),
        source,
    };
    let deadline = Instant::now() + plan.policy.login_timeout;
    let first = login.start();
    writer.queue(&first.bhs, &first.ahs, first.data);
    loop {
        writer.flush().await.map_err(connect_error)?;
        let left = deadline.saturating_duration_since(Instant::now());
        let item = tokio::time::timeout(left.max(Duration::from_millis(1)), reader.next())
            .await
            .map_err(|_| Error::Timeout("login"))?
            .map_err(connect_error)?;
        let Some(item) = item else {
            return Err(connect_error(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "target closed the connection during login",
            )));
        };
        match login
            .handle_pdu(item, Instant::now())
            .map_err(login_error)?
        {
            LoginStep::Send(out) => writer.queue(&out.bhs, &out.ahs, out.data),
            LoginStep::Done(result) => {
                let p = &result.params;
                reader.set_limits(FrameLimits {
                    header_digest: p.header_digest,
                    data_digest: p.data_digest,
                    max_recv_data_segment_len: p.max_recv_data_segment_length,
                });
                writer.set_limits(FrameLimits {
                    header_digest: p.header_digest,
                    data_digest: p.data_digest,
                    max_recv_data_segment_len: p.max_xmit_data_segment_length,
                });
                if result.weak_secret {
                    tracing::warn!(%portal, "a CHAP secret is shorter than 12 bytes");
                }
                return Ok(Established {
                    reader,
                    writer,
                    login: *result,
                });
            }
        }
    }
}
