//! The bgp4mesh controller (`bgp4mesh server`): networks, enrollment
//! tokens, nodes and egress gateways over a REST API; IPAM from the
//! operator's block; one push stream per agent.
//!
//! - `store`: SQLite or PostgreSQL, one code path, migrations per dialect.
//! - `hub`: the in-memory mesh, change log and per-network broadcast;
//!   `hub::watchdog`, gateways and relays whose pulses stop;
//!   `hub::relays`, relay paths for pairs behind NAT.
//! - `api`: the axum router (JSON errors, auth), one file per resource
//!   (networks, tokens, join, nodes, gateways, apitokens, agent: the SSE
//!   stream).
//! - `connections`: who may hold a connection, and for how long.
//! - `discovery`: endpoint discovery on UDP (where a node's datagrams
//!   come from), rate-limited.
//! - `ipam`, `secrets`, `tls`, `metrics`, `openapi`, `config`, `server`.

pub mod api;
pub mod config;
pub mod connections;
pub mod discovery;
pub mod hub;
pub mod ipam;
pub mod metrics;
pub mod openapi;
pub mod secrets;
pub mod server;
pub mod store;
pub mod tls;
