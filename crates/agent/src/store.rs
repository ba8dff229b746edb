//! Store (to be filled in).
