//! Adapter inventory (to be filled in).
