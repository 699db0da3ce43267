//! The bgp4mesh node daemon (`bgp4mesh run`): configuration, the tokio
//! drivers of the sans-IO protocol cores, and the control socket that
//! `bgp4mesh show …` talks to.

pub mod bgp_driver;
pub mod bgp_reader;
pub mod config;
pub mod control;
pub mod daemon;
pub mod devices;
pub mod kernel_sync;
pub mod overlay;
pub mod show;
pub mod transport;
