//! The host agent (`viscsi host`): owns the VMs of one host.
//!
//! It finds the host's adapters ([`inventory`]), picks a data path for each VM (offload when
//! an offload adapter with a free function reaches the target, else software) and records
//! why, keeps VM records in an embedded store ([`store`]) so that a restarted agent takes its
//! VMs back, watches adapters and moves exactly the VMs of a failed one to the software path,
//! and serves a control API (HTTP/JSON on a unix socket) and Prometheus metrics ([`metrics`]).
//!
//! Not here: the data paths themselves (`viscsi-datapath`, `viscsi-hba`), the VM's virtual
//! bus, command-line parsing.

pub mod inventory;
pub mod metrics;
pub mod migration;
pub mod store;

pub mod api;
pub mod client;
mod host;
pub mod model;
mod select;
mod settle;
mod vm;

pub use host::{Agent, AgentError, HostOptions, MigrationOptions};
pub use vm::Vm;
