//! Sans-IO BGP-4 for bgp4mesh.
//!
//! No sockets, no async runtime, no clock: the node daemon's driver feeds
//! bytes, timer expiries and configuration in, and carries out what comes
//! back (bytes to send, timers to arm, routes to install). That keeps every
//! behaviour testable on virtual time, byte for byte.

#![forbid(unsafe_code)]

pub mod export_set;
pub mod policy;
pub mod rib;
pub mod session;
pub mod speaker;
pub mod wire;
