//! The control socket's requests (`bgp4mesh show …`, `bgp4mesh bgp …`),
//! answered from the BGP task.

use std::time::Instant;

use bgp4mesh_bgp::speaker::Speaker;

use super::BgpDriver;
use crate::control::{Request, Response};
use crate::show;

impl BgpDriver {
    /// Answers one request (Shutdown is the run loop's).
    pub(super) fn on_control(&mut self, request: Request) -> Response {
        let now = Instant::now();
        let neighbor = |speaker: &Speaker, name: &str| {
            speaker
                .neighbor_by_name(name)
                .ok_or_else(|| format!("no neighbor named {name:?}"))
        };
        let result: Result<serde_json::Value, String> = match request {
            Request::ShowProtocols { name } => show::protocols(&self.speaker, name.as_deref(), now),
            Request::ShowRoute { prefix, export } => match export {
                Some(name) => neighbor(&self.speaker, &name)
                    .map(|id| show::exported(&self.speaker, id, prefix, now)),
                None => Ok(show::routes(
                    &self.speaker,
                    prefix,
                    now,
                    self.kernel.in_kernel(),
                )),
            },
            Request::Enable { name } => neighbor(&self.speaker, &name).map(|id| {
                self.speaker.enable(now, id);
                serde_json::Value::Null
            }),
            Request::Disable { name, message } => neighbor(&self.speaker, &name).map(|id| {
                self.speaker
                    .disable(now, id, message.as_deref().unwrap_or(""));
                serde_json::Value::Null
            }),
            Request::Restart { name } => neighbor(&self.speaker, &name).map(|id| {
                self.speaker.restart(now, id, "restarted by the operator");
                serde_json::Value::Null
            }),
            Request::Refresh { name } => neighbor(&self.speaker, &name).map(|id| {
                self.speaker.refresh(now, id);
                serde_json::Value::Null
            }),
            Request::Reload => self.reload(now).map(|()| serde_json::Value::Null),
            Request::ShowBfd => Ok(show::bfd_sessions(self.bfd.sessions(), &self.speaker, now)),
            Request::Shutdown => Ok(serde_json::Value::Null),
            // The daemon answers them (it owns the interfaces) before
            // requests reach the BGP task.
            Request::ShowPeerings => Err("show peerings: answered by the daemon".into()),
            Request::ShowWireguard => Err("show wireguard: answered by the daemon".into()),
            Request::ShowOverlay => Err("show overlay: answered by the daemon".into()),
            Request::ShowMesh => Err("show mesh: answered by the daemon".into()),
        };
        match result {
            Ok(data) => Response::ok(data),
            Err(error) => Response::error(error),
        }
    }
}
