//! Metrics (to be filled in).
