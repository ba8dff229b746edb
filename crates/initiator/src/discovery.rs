//! SendTargets discovery (RFC 7143 §4.3 and appendix C).

use iscsi_proto::keys::SessionType;

use crate::connection::LoginPlan;
use crate::options::default_negotiation;
use crate::{DiscoveryOptions, Error, Session};

/// A target a portal reported, with its addresses (`host:port`) and portal group tags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscoveredTarget {
    pub name: String,
    pub addresses: Vec<(String, u16)>,
}

/// Logs in to `options.portal` as a discovery session, asks `SendTargets=All` and logs out.
pub async fn discover(options: DiscoveryOptions) -> Result<Vec<DiscoveredTarget>, Error> {
    let plan = LoginPlan {
        identity: options.identity,
        portal: options.portal,
        target: None,
        session_type: SessionType::Discovery,
        chap: options.chap,
        negotiation: default_negotiation(),
        policy: options.policy,
    };
    let session = Session::start(plan).await?;
    let pairs = session
        .text(vec![("SendTargets".to_owned(), "All".to_owned())])
        .await?;
    let _ = session.logout().await;
    Ok(parse_send_targets(&pairs))
}

/// Groups `TargetName=` / `TargetAddress=host:port,tpgt` pairs into targets. An address
/// without a tag gets tag 1; pairs before the first TargetName are ignored.
pub fn parse_send_targets(pairs: &[(String, String)]) -> Vec<DiscoveredTarget> {
    let mut targets: Vec<DiscoveredTarget> = Vec::new();
    for (k, v) in pairs {
        match k.as_str() {
            "TargetName" => targets.push(DiscoveredTarget {
                name: v.clone(),
                addresses: Vec::new(),
            }),
            "TargetAddress" => {
                if let Some(t) = targets.last_mut() {
                    let (addr, tag) = match v.rsplit_once(',') {
                        Some((a, t)) => (a, t.parse().unwrap_or(1)),
                        None => (v.as_str(), 1),
                    };
                    t.addresses.push((addr.to_owned(), tag));
                }
            }
            _ => {}
        }
    }
    targets
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(k: &str, v: &str) -> (String, String) {
        (k.into(), v.into())
    }

    #[test]
    fn groups_addresses_under_their_target() {
        let got = parse_send_targets(&[
            p("TargetAddress", "ignored:1,1"),
            p("TargetName", "iqn.a"),
            p("TargetAddress", "127.0.0.1:3260,1"),
            p("TargetAddress", "[::1]:3260,2"),
            p("TargetName", "iqn.b"),
            p("TargetAddress", "10.0.0.1:3260"),
        ]);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].name, "iqn.a");
        assert_eq!(
            got[0].addresses,
            vec![("127.0.0.1:3260".into(), 1), ("[::1]:3260".into(), 2)]
        );
        assert_eq!(got[1].addresses, vec![("10.0.0.1:3260".into(), 1)]);
    }
}
