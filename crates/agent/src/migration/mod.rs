//! Live migration of a VM's storage session between host agents.
//!
//! - [`channel`]: the agents' authenticated, encrypted channel (Noise, pre-shared cluster key).
//! - `protocol`: the messages (offer, switch, abandon, forwarded commands) and their frames.
//! - `link`: the source's request/reply multiplexer over a channel.
//! - `source` and `destination`: the two sides; `source` documents the switchover.
//!
//! Not here: QEMU's own migration of the guest (the VMM moves its vrings from one agent's
//! socket to the other's; this module moves the iSCSI session under them).

pub mod channel;
pub(crate) mod destination;
pub(crate) mod link;
pub(crate) mod protocol;
pub(crate) mod source;
