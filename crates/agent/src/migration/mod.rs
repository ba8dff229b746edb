//! Live migration of a VM's storage session from this host to another agent.
//!
//! - [`channel`]: the agents' authenticated, encrypted channel (Noise, pre-shared cluster key).

pub mod channel;
