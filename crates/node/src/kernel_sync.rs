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

/// What the kernel task is asked to do.
#[derive(Debug)]
pub enum KernelCommand {
    /// Install (Some) or remove (None) our route for a prefix.
    Route(IpNet, Option<Target>),
    /// A graceful restart is over: remove what the previous run left that
    /// was not installed again.
    FlushStale,
    /// Answered once every command sent before it is applied.
    Barrier(tokio::sync::oneshot::Sender<()>),
}

pub type RouteSender = mpsc::UnboundedSender<KernelCommand>;

/// Prefixes the kernel holds a route of ours for, for `show route`.
pub type InKernel = std::sync::Arc<std::sync::RwLock<std::collections::HashSet<IpNet>>>;

/// Opens the FIB and starts the task. What a previous run left is removed,
/// or with `graceful` (a graceful restart) kept until `FlushStale`; the
/// last value is how many routes were kept. Drop every sender to stop the
/// task: it then removes our routes unless `keep_routes_on_exit`.
pub async fn start(
    config: &KernelSection,
    graceful: bool,
) -> Result<(RouteSender, JoinHandle<()>, InKernel, usize)> {
    let mut fib = Fib::connect(FibConfig {
        table: config.table,
        metric: config.metric,
        prefsrc_ipv4: config.prefsrc_ipv4,
        prefsrc_ipv6: config.prefsrc_ipv6,
    })?;
    let mut adopted = 0;
    if graceful {
        adopted = fib.adopt_stale().await?;
        if adopted > 0 {
            tracing::info!(
                "kernel: keeping {adopted} routes of the previous run in table {} until the neighbours' End-of-RIB (graceful restart)",
                config.table
            );
        }
    } else {
        let stale = fib.remove_stale().await?;
        if stale > 0 {
            tracing::info!(
                "kernel: removed {stale} routes left by a previous run in table {}",
                config.table
            );
        }
    }
    let keep = config.keep_routes_on_exit;
    let (tx, mut rx) = mpsc::unbounded_channel::<KernelCommand>();
    let in_kernel = InKernel::default();
    let published = in_kernel.clone();
    let task = tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut batch: HashMap<IpNet, Option<Target>> = HashMap::new();
            let mut flush_stale = false;
            let mut barriers = Vec::new();
            let mut next = Some(first);
            while let Some(command) = next {
                match command {
                    KernelCommand::Route(prefix, target) => {
                        batch.insert(prefix, target);
                    }
                    KernelCommand::FlushStale => flush_stale = true,
                    KernelCommand::Barrier(done) => barriers.push(done),
                }
                next = rx.try_recv().ok();
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
            if flush_stale {
                let report = fib.flush_stale().await;
                tracing::info!(
                    "kernel: graceful restart over: {} stale routes removed",
                    report.removed
                );
            }
            for done in barriers {
                let _ = done.send(());
            }
        }
        if !keep {
            let report = fib.remove_all().await;
            tracing::info!("kernel: removed our {} routes", report.removed);
        }
    });
    Ok((tx, task, in_kernel, adopted))
}
