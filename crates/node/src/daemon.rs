//! `bgp4mesh run`: loads the config, serves the control socket, drives BGP,
//! and stops cleanly on SIGTERM or SIGINT.

use std::path::Path;

use anyhow::Result;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, oneshot};

use crate::bgp_driver::BgpDriver;
use crate::config::NodeConfig;
use crate::control::{self, ControlCall, Request};
use crate::devices::{self, Devices};
use crate::kernel_sync;
use crate::overlay::{OverlayDriver, Tunnels};

/// Runs the daemon in the foreground until a stop signal.
pub fn run(config_path: &Path) -> Result<()> {
    run_config(NodeConfig::load(config_path)?)
}

/// [`run`] with a config already made (`bgp4mesh run` after `join`, with
/// no file).
pub fn run_config(config: NodeConfig) -> Result<()> {
    // Two workers: socket reads and writes go on while the BGP task
    // works through a table (the task itself is one at a time, in order).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(run_async(config))
}

async fn run_async(config: NodeConfig) -> Result<()> {
    // Signals are taken over first: a SIGTERM during start-up then stops
    // the daemon through its usual path instead of killing it.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let (calls_tx, calls) = mpsc::channel::<ControlCall>(64);
    // Removes the socket file when dropped: at the end, and on every early
    // return below (a listener that cannot be bound, a netlink error...).
    let server = control::serve(&config.control_socket, calls_tx.clone())?;
    tracing::info!("control socket {}", config.control_socket.display());

    let mut driver = match config.bgp.clone() {
        Some(mut bgp) => {
            BgpDriver::resolve_next_hop_ipv6(&mut bgp).await?;
            Some(BgpDriver::new(bgp, &config.path)?)
        }
        None => None,
    };
    let kernel = match (&mut driver, config.kernel.enabled) {
        (Some(driver), true) => {
            let graceful = config
                .bgp
                .as_ref()
                .is_some_and(|b| b.speaker.neighbors.iter().any(|n| n.graceful_restart));
            let (routes, task, in_kernel, adopted) =
                kernel_sync::start(&config.kernel, graceful).await?;
            if adopted > 0 {
                driver.begin_graceful_restart(std::time::Instant::now());
            }
            if config.kernel.learn {
                driver.set_kernel_learning(config.kernel.table);
            }
            let sink_routes = routes.clone();
            driver.set_route_sink(
                Box::new(move |command| {
                    let _ = sink_routes.send(command);
                }),
                config.kernel.install_static,
                Some(in_kernel),
            );
            Some((routes, task))
        }
        _ => None,
    };
    let (mesh_stop, mesh_stopped) = oneshot::channel::<()>();
    let (mesh_ready_tx, mesh_ready) = oneshot::channel::<()>();
    let mut mesh_ready = Some(mesh_ready);
    let mesh_view = config
        .mesh
        .as_ref()
        .map(|_| bgp4mesh_agent::view::MeshView::new());
    // An overlay over the mesh hears of the mesh's peers from its agent.
    let over_mesh = config
        .overlay
        .as_ref()
        .is_some_and(|o| o.over.contains(&crate::config::overlay::Over::Mesh));
    let (wires_tx, wires_rx) = if over_mesh && config.mesh.is_some() {
        let (tx, rx) = tokio::sync::watch::channel(bgp4mesh_agent::MeshWires::default());
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    let mesh = match config.mesh.clone() {
        Some(section) => {
            let options = bgp4mesh_agent::AgentOptions {
                state_dir: section.state_dir,
                interface: section.interface,
                backend: section
                    .backend
                    .parse()
                    .map_err(|e: String| anyhow::anyhow!("mesh.backend: {e}"))?,
                // A border tells the controller when its upstream is gone.
                upstream: driver.as_mut().map(|d| d.watch_upstream()),
                // ... and offers the mesh what it learns, by `[mesh] export`.
                bgp_ranges: driver.as_mut().and_then(|d| d.export_to_mesh()),
                ready: Some(mesh_ready_tx),
                // ... and announces its block once the controller makes it
                // an exit the nodes use.
                announce: driver.as_mut().map(|d| {
                    let (open, gate) = tokio::sync::watch::channel(false);
                    d.hold_announcements_until(gate);
                    open
                }),
                view: mesh_view.clone(),
                relay_port: section.relay.then_some(section.relay_port),
                wires: wires_tx,
            };
            let stopper = calls_tx.clone();
            Some(tokio::spawn(async move {
                let stop = async {
                    let _ = mesh_stopped.await;
                };
                let result = bgp4mesh_agent::run(options, stop).await;
                if let Err(e) = &result {
                    tracing::error!("mesh: {e:#}");
                    // The mesh was the point: stop the daemon with it.
                    request_shutdown(&stopper).await;
                }
                result
            }))
        }
        None => None,
    };
    let reloader = calls_tx.clone();
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the configuration");
            let (reply, answer) = oneshot::channel();
            if reloader
                .send(ControlCall {
                    request: Request::Reload,
                    reply,
                })
                .await
                .is_err()
            {
                return;
            }
            if let Ok(response) = answer.await
                && let Some(error) = response.error
            {
                tracing::error!("reload refused: {error}");
            }
        }
    });
    let stopper = calls_tx.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        request_shutdown(&stopper).await;
    });
    match driver {
        Some(driver) => {
            tracing::info!(
                "BGP: AS {}, router id {}, {} neighbor(s)",
                config
                    .bgp
                    .as_ref()
                    .map(|b| b.speaker.asn)
                    .unwrap_or_default(),
                config
                    .bgp
                    .as_ref()
                    .map(|b| b.speaker.router_id.to_string())
                    .unwrap_or_default(),
                config
                    .bgp
                    .as_ref()
                    .map(|b| b.speaker.neighbors.len())
                    .unwrap_or_default()
            );
            // A border announces the block only once its mesh can carry
            // the traffic that will come (or after 10 s, whatever the mesh).
            if mesh.is_some()
                && let Some(ready) = mesh_ready.take()
                && tokio::time::timeout(std::time::Duration::from_secs(10), ready)
                    .await
                    .is_err()
            {
                tracing::warn!("the mesh is not up after 10 s; starting BGP anyway");
            }
            // The interfaces first: the peerings' sessions start with BGP,
            // and a static route's device must be there.
            let devices = Devices::start(&devices::specs(&config)).await?;
            let (driver_tx, driver_calls) = mpsc::channel::<ControlCall>(64);
            let front = tokio::spawn(serve_devices(
                calls,
                Some(driver_tx),
                devices,
                Overlaid::of(&config, wires_rx),
                mesh_view,
            ));
            driver.run(driver_calls).await;
            // The sessions are closed: the tunnels can go.
            if let Ok(mut devices) = front.await {
                devices.stop().await;
            }
        }
        None => {
            if mesh.is_none() && config.wireguard.is_empty() {
                tracing::warn!(
                    "no [bgp], [mesh] or [[wireguard]] section: nothing to run but the control socket"
                );
            }
            let devices = Devices::start(&devices::specs(&config)).await?;
            let mut devices = serve_devices(
                calls,
                None,
                devices,
                Overlaid::of(&config, wires_rx),
                mesh_view,
            )
            .await;
            devices.stop().await;
        }
    }
    let _ = mesh_stop.send(());
    let mesh_failed = match mesh {
        Some(task) => matches!(task.await, Ok(Err(_))),
        None => false,
    };
    if let Some((routes, task)) = kernel {
        // Closing the channel lets the kernel task finish: apply what is
        // queued, then remove our routes unless told to keep them.
        drop(routes);
        let _ = task.await;
    }
    drop(server);
    if mesh_failed {
        anyhow::bail!("the mesh stopped (see the log above)");
    }
    Ok(())
}

/// Stands between the control socket and the BGP task: answers `show
/// peerings` and `show wireguard`, and on reload brings the interfaces to
/// the new config around the BGP driver's own reload (new ones before,
/// removed ones after, so a removed session's Cease still goes through its
/// tunnel). Everything else goes to the BGP task as it came; with no BGP
/// task (no `[bgp]`), it answers what it can. Gives the interfaces back
/// once the daemon is told to stop.
async fn serve_devices(
    mut calls: mpsc::Receiver<ControlCall>,
    driver: Option<mpsc::Sender<ControlCall>>,
    mut devices: Devices,
    overlaid: Overlaid,
    mesh_view: Option<std::sync::Arc<bgp4mesh_agent::view::MeshView>>,
) -> Devices {
    let config_path = overlaid.path.clone();
    let mut mesh_wires = overlaid.mesh.clone();
    let (mut overlay, mut overlay_error) = match overlaid.start().await {
        Ok(running) => (running, None),
        Err(e) => {
            tracing::error!("overlay: {e:#}");
            (None, Some(format!("{e:#}")))
        }
    };
    let mut overlaid = overlaid;
    let ask = |request: Request| {
        let driver = driver.clone();
        async move {
            let Some(driver) = driver else {
                // No BGP: no protocols to list (a mesh-only node), a
                // reload is the interfaces' alone.
                return match request {
                    Request::ShowProtocols { name: None } | Request::Shutdown => {
                        control::Response::ok(serde_json::json!([]))
                    }
                    Request::Reload => control::Response::ok(serde_json::Value::Null),
                    _ => control::Response::error("no [bgp] section in the config"),
                };
            };
            let (reply, answer) = oneshot::channel();
            if driver.send(ControlCall { request, reply }).await.is_err() {
                return control::Response::error("the BGP task is gone");
            }
            answer
                .await
                .unwrap_or_else(|_| control::Response::error("the BGP task is gone"))
        }
    };
    loop {
        let call = tokio::select! {
            call = calls.recv() => match call {
                Some(call) => call,
                None => break,
            },
            // The mesh's peers changed: its wires follow.
            Ok(()) = async {
                match mesh_wires.as_mut() {
                    Some(rx) => rx.changed().await,
                    None => std::future::pending().await,
                }
            } => {
                overlay_error = match Overlaid::reload(&mut overlay, &overlaid).await {
                    Ok(()) => None,
                    Err(e) => {
                        tracing::error!("overlay: {e:#}");
                        Some(format!("{e:#}"))
                    }
                };
                continue;
            }
        };
        match call.request {
            Request::ShowPeerings => {
                let sessions = ask(Request::ShowProtocols { name: None }).await.data;
                let list: Vec<serde_json::Value> = devices
                    .peerings()
                    .into_iter()
                    .map(|mut p| {
                        let session = sessions
                            .as_array()
                            .into_iter()
                            .flatten()
                            .find(|s| s["name"] == p["name"])
                            .map(|s| {
                                serde_json::json!({
                                    "state": s["state"],
                                    "up": s["up"],
                                    "since": s["since"],
                                    "info": s["info"],
                                    "routes": s["routes"],
                                })
                            })
                            .unwrap_or(serde_json::Value::Null);
                        p["session"] = session;
                        p
                    })
                    .collect();
                let _ = call
                    .reply
                    .send(control::Response::ok(serde_json::Value::Array(list)));
            }
            Request::ShowWireguard => {
                let list = serde_json::Value::Array(devices.wireguard());
                let _ = call.reply.send(control::Response::ok(list));
            }
            Request::ShowOverlay => {
                let response = match (&overlay, &overlay_error) {
                    (_, Some(e)) => {
                        control::Response::error(format!("the overlay is not as configured: {e}"))
                    }
                    (Some((_, driver)), None) => control::Response::ok(driver.show()),
                    (None, None) => control::Response::error("no [overlay] section in the config"),
                };
                let _ = call.reply.send(response);
            }
            Request::ShowMesh => {
                let Some(view) = mesh_view.clone() else {
                    let _ = call
                        .reply
                        .send(control::Response::error("no [mesh] section in the config"));
                    continue;
                };
                // Measuring round trips waits up to a second: off this task.
                tokio::spawn(async move {
                    let shown = tokio::task::spawn_blocking(move || view.show()).await;
                    let response = match shown {
                        Ok(Ok(shown)) => match serde_json::to_value(shown) {
                            Ok(v) => control::Response::ok(v),
                            Err(e) => control::Response::error(e.to_string()),
                        },
                        Ok(Err(e)) => control::Response::error(format!("{e:#}")),
                        Err(e) => control::Response::error(e.to_string()),
                    };
                    let _ = call.reply.send(response);
                });
            }
            Request::Reload => {
                let response = match crate::config::NodeConfig::load(&config_path) {
                    // The BGP task refuses it with its own words.
                    Err(_) if driver.is_some() => ask(Request::Reload).await,
                    Err(e) => control::Response::error(format!("{e:#}")),
                    Ok(new) => {
                        let wanted = devices::specs(&new);
                        let applied = devices.apply(&wanted).await;
                        let response = ask(Request::Reload).await;
                        if response.ok {
                            devices.remove_absent(&wanted).await;
                        }
                        let applied = match applied {
                            Ok(()) if response.ok => {
                                overlaid = Overlaid::of(&new, overlaid.mesh.clone());
                                let result = Overlaid::reload(&mut overlay, &overlaid).await;
                                overlay_error = result.as_ref().err().map(|e| format!("{e:#}"));
                                result
                            }
                            other => other,
                        };
                        match applied {
                            Err(e) if response.ok => control::Response::error(format!(
                                "reloaded, but {e:#} (left out; the next reload tries again)"
                            )),
                            _ => response,
                        }
                    }
                };
                let _ = call.reply.send(response);
            }
            Request::Shutdown => {
                let response = ask(Request::Shutdown).await;
                let _ = call.reply.send(response);
                break;
            }
            request => match &driver {
                Some(driver) => {
                    let call = ControlCall {
                        request,
                        reply: call.reply,
                    };
                    if driver.send(call).await.is_err() {
                        break;
                    }
                }
                None => {
                    let _ = call.reply.send(ask(request).await);
                }
            },
        }
    }
    if let Some((links, mut driver)) = overlay.take() {
        driver.remove(&links).await;
    }
    devices
}

/// What the overlay is made from: `[overlay]` and the tunnels it goes over.
struct Overlaid {
    path: std::path::PathBuf,
    overlay: Option<crate::config::overlay::Overlay>,
    peerings: Vec<crate::config::Peering>,
    wireguard: Vec<crate::config::Wireguard>,
    /// The mesh's addresses, from its agent (an overlay over the mesh).
    mesh: Option<tokio::sync::watch::Receiver<bgp4mesh_agent::MeshWires>>,
}

impl Overlaid {
    fn of(
        config: &NodeConfig,
        mesh: Option<tokio::sync::watch::Receiver<bgp4mesh_agent::MeshWires>>,
    ) -> Overlaid {
        Overlaid {
            path: config.path.clone(),
            overlay: config.overlay.clone(),
            peerings: config.peerings.clone(),
            wireguard: config.wireguard.clone(),
            mesh,
        }
    }

    /// The mesh's addresses now (a copy: the channel is not held).
    fn mesh_now(&self) -> Option<bgp4mesh_agent::MeshWires> {
        self.mesh.as_ref().map(|rx| rx.borrow().clone())
    }

    /// Makes the overlay once the tunnels are up (`None` without
    /// `[overlay]`). On a failure nothing of it is left; the caller logs it,
    /// the tunnels and BGP run on without it, and a reload tries again.
    async fn start(&self) -> Result<Option<(bgp4mesh_kernel::links::Links, OverlayDriver)>> {
        let Some(overlay) = self.overlay.as_ref() else {
            return Ok(None);
        };
        let links = bgp4mesh_kernel::links::Links::connect()?;
        let mesh = self.mesh_now();
        let tunnels = Tunnels {
            peerings: &self.peerings,
            wireguard: &self.wireguard,
            mesh: mesh.as_ref(),
        };
        let driver = OverlayDriver::start(&links, overlay, tunnels).await?;
        tracing::info!(
            "overlay: bridge {} with {} wire(s)",
            overlay.bridge,
            driver.wires()
        );
        Ok(Some((links, driver)))
    }

    /// Brings a running overlay to a reloaded config: made, changed or
    /// removed.
    async fn reload(
        running: &mut Option<(bgp4mesh_kernel::links::Links, OverlayDriver)>,
        new: &Overlaid,
    ) -> Result<()> {
        match (running.as_mut(), &new.overlay) {
            (Some((links, driver)), Some(overlay)) => {
                let mesh = new.mesh_now();
                let tunnels = Tunnels {
                    peerings: &new.peerings,
                    wireguard: &new.wireguard,
                    mesh: mesh.as_ref(),
                };
                driver.apply(links, overlay, tunnels).await
            }
            (Some(_), None) => {
                if let Some((links, mut driver)) = running.take() {
                    driver.remove(&links).await;
                }
                Ok(())
            }
            (None, Some(_)) => {
                *running = new.start().await?;
                Ok(())
            }
            (None, None) => Ok(()),
        }
    }
}

/// Asks the daemon's main loop to stop (as `bgp4mesh` on the control socket
/// would) and waits for its answer.
async fn request_shutdown(calls: &mpsc::Sender<ControlCall>) {
    let (reply, answer) = oneshot::channel();
    let _ = calls
        .send(ControlCall {
            request: Request::Shutdown,
            reply,
        })
        .await;
    let _ = answer.await;
}
