//! SendTargets discovery (RFC 7143 §4.3, appendix C).

use crate::{DiscoveryOptions, Error};

/// A target a portal reported, with its addresses (`host:port`) and portal group tags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscoveredTarget {
    pub name: String,
    pub addresses: Vec<(String, u16)>,
}

/// Logs in to `options.portal` as a discovery session, asks `SendTargets=All` and logs out.
pub async fn discover(options: DiscoveryOptions) -> Result<Vec<DiscoveredTarget>, Error> {
    let _ = options;
    todo!()
}
