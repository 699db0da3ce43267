//! The node agent (`bgp4mesh join`, the mesh part of `bgp4mesh run`) and
//! the controller's HTTPS client (also used by the admin CLI).

#![forbid(unsafe_code)]

pub mod agent;
pub mod client;
pub mod ipv6_paths;
pub mod liveness;
pub mod probe;
pub mod probing;
pub mod relay_client;
pub mod relay_server;
pub mod traversal;
pub mod view;

pub use agent::{
    AgentOptions, Enrollment, JoinOptions, MeshWirePeer, MeshWires, join, run, write_private,
};
pub use client::Client;
