//! Feeds best-route changes to the kernel module: one task owns the
//! [`Fib`], coalesces what queued up (only the last change per prefix
//! matters) and applies it in pipelined batches.

use std::collections::HashMap;

use anyhow::Result;
use bgp4mesh_kernel::{Fib, FibConfig, Target};
use ipnet::IpNet;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::config::KernelSection;

pub type RouteSender = mpsc::UnboundedSender<(IpNet, Option<Target>)>;

/// Prefixes the kernel holds a route of ours for, for `show route`.
pub type InKernel = std::sync::Arc<std::sync::RwLock<std::collections::HashSet<IpNet>>>;

/// Opens the FIB, removes what a previous run left, and starts the task.
/// Drop every sender to stop it: it then removes our routes unless
/// `keep_routes_on_exit`.
pub async fn start(config: &KernelSection) -> Result<(RouteSender, JoinHandle<()>, InKernel)> {
    let mut fib = Fib::connect(FibConfig {
        table: config.table,
        metric: config.metric,
        prefsrc_ipv4: config.prefsrc_ipv4,
        prefsrc_ipv6: config.prefsrc_ipv6,
    })?;
    let stale = fib.remove_stale().await?;
    if stale > 0 {
        tracing::info!(
            "kernel: removed {stale} routes left by a previous run in table {}",
            config.table
        );
    }
    let keep = config.keep_routes_on_exit;
    let (tx, mut rx) = mpsc::unbounded_channel::<(IpNet, Option<Target>)>();
    let in_kernel = InKernel::default();
    let published = in_kernel.clone();
    let task = tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut batch: HashMap<IpNet, Option<Target>> = HashMap::new();
            batch.insert(first.0, first.1);
            while let Ok((prefix, target)) = rx.try_recv() {
                batch.insert(prefix, target);
            }
            let prefixes: Vec<IpNet> = batch.keys().copied().collect();
            let report = fib.apply(batch.into_iter().collect()).await;
            if let Ok(mut set) = published.write() {
                for prefix in prefixes {
                    if fib.installed().contains_key(&prefix) {
                        set.insert(prefix);
                    } else {
                        set.remove(&prefix);
                    }
                }
            }
            tracing::debug!(
                "kernel: {} installed, {} removed, {} failed",
                report.installed,
                report.removed,
                report.failed
            );
        }
        if !keep {
            let report = fib.remove_all().await;
            tracing::info!("kernel: removed our {} routes", report.removed);
        }
    });
    Ok((tx, task, in_kernel))
}
