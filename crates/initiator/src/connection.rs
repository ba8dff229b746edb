//! one connection
