//! The reference offload adapter (to be filled in).
