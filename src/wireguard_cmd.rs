//! `bgp4mesh wireguard IFACE`: a standalone userspace WireGuard device with
//! its UAPI socket, a drop-in for `wireguard-go IFACE` (wg-quick runs it as
//! `WG_QUICK_USERSPACE_IMPLEMENTATION=bgp4mesh-wireguard`).
//!
//! Without `--foreground` it starts itself again in the background and
//! returns once the UAPI socket answers, as wireguard-go does. The device
//! stops on SIGTERM/SIGINT or when its interface is deleted.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bgp4mesh_wireguard::uapi_server::SOCKET_DIR;
use bgp4mesh_wireguard::{Device, DeviceOptions, TimerParams, UapiServer};

pub fn run(
    interface: &str,
    foreground: bool,
    mtu: u16,
    log_level: &str,
    rekey_after_time: Option<u64>,
) -> Result<()> {
    if interface.is_empty() || interface.len() > 15 || interface.contains(['/', ' ']) {
        bail!("{interface:?} is not an interface name (1 to 15 characters, no '/' or space)");
    }
    if !foreground {
        return start_in_background(interface, mtu, log_level, rekey_after_time);
    }
    crate::init_logs(log_level)?;
    let mut options = DeviceOptions::new(interface);
    options.mtu = mtu;
    if let Some(seconds) = rekey_after_time {
        let after = Duration::from_secs(seconds);
        options.timer_params = Some(TimerParams {
            rekey_after_time: after..=after,
            ..TimerParams::default()
        });
    }
    let device = Arc::new(Device::create(options).context("creating the WireGuard device")?);
    let _uapi = UapiServer::start(Arc::clone(&device)).context("starting the UAPI socket")?;
    let stopper = device.stopper();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let wait = {
            let device = Arc::clone(&device);
            tokio::task::spawn_blocking(move || device.wait())
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping"),
            _ = term.recv() => tracing::info!("SIGTERM: stopping"),
            _ = wait => {}
        }
        stopper.stop();
        anyhow::Ok(())
    })?;
    Ok(())
}

fn start_in_background(
    interface: &str,
    mtu: u16,
    log_level: &str,
    rekey_after_time: Option<u64>,
) -> Result<()> {
    let exe = std::env::current_exe().context("finding our own executable")?;
    let mut child = Command::new(exe);
    child
        .args(["wireguard", "--foreground", "--mtu", &mtu.to_string()])
        .args(["--log-level", log_level])
        .args(
            rekey_after_time
                .iter()
                .flat_map(|s| ["--rekey-after-time".to_string(), s.to_string()]),
        )
        .arg(interface)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: setsid is async-signal-safe and touches no memory of ours; it
    // detaches the child from our session so it outlives the caller.
    unsafe {
        child.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = child.spawn().context("starting the background device")?;
    let socket = Path::new(SOCKET_DIR).join(format!("{interface}.sock"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            bail!(
                "the device exited ({status}); run `bgp4mesh wireguard --foreground {interface}` to see why"
            );
        }
        if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("{} did not appear within 10 s", socket.display())
}
