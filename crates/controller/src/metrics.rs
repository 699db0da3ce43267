//! Prometheus metrics in the text exposition format: API requests and
//! their latency, open agent streams, nodes online, the revision, the
//! listener's connections and the endpoint discovery's datagrams.

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Latency buckets, seconds.
const BUCKETS: [f64; 8] = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0];

#[derive(Default)]
pub struct Metrics {
    requests: [AtomicU64; 5],
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    micros: AtomicU64,
    streams: Arc<AtomicU64>,
    /// The listener's connection counters (`connections::Admission`).
    pub connections: Arc<crate::connections::ConnectionStats>,
    /// The UDP endpoint discovery's counters (`discovery`).
    pub discovery: Arc<crate::discovery::DiscoveryStats>,
}

/// Counts an open stream until dropped.
pub struct StreamGuard(Arc<AtomicU64>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    pub fn observe(&self, took: Duration, status: u16) {
        let class = usize::from((status / 100).clamp(1, 5)) - 1;
        self.requests[class].fetch_add(1, Ordering::Relaxed);
        let secs = took.as_secs_f64();
        for (bucket, le) in self.buckets.iter().zip(BUCKETS) {
            if secs <= le {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.micros.fetch_add(
            took.as_micros().min(u128::from(u64::MAX)) as u64,
            Ordering::Relaxed,
        );
    }

    pub fn stream_opened(&self) -> StreamGuard {
        self.streams.fetch_add(1, Ordering::Relaxed);
        StreamGuard(Arc::clone(&self.streams))
    }

    pub fn streams(&self) -> u64 {
        self.streams.load(Ordering::Relaxed)
    }

    pub fn render(&self, online: u64, nodes: u64, revision: u64) -> String {
        let mut out = String::new();
        let mut line = |s: String| {
            out.push_str(&s);
            out.push('\n');
        };
        line("# HELP bgp4mesh_nodes Nodes in all networks.".into());
        line("# TYPE bgp4mesh_nodes gauge".into());
        line(format!("bgp4mesh_nodes {nodes}"));
        line("# HELP bgp4mesh_nodes_online Nodes that reported in the last 90 s.".into());
        line("# TYPE bgp4mesh_nodes_online gauge".into());
        line(format!("bgp4mesh_nodes_online {online}"));
        line("# HELP bgp4mesh_stream_clients Open agent streams.".into());
        line("# TYPE bgp4mesh_stream_clients gauge".into());
        line(format!("bgp4mesh_stream_clients {}", self.streams()));
        let c = &self.connections;
        for (name, help, kind, value) in [
            (
                "connections_open",
                "Open API connections.",
                "gauge",
                &c.open,
            ),
            (
                "connections_unproven",
                "Open API connections with no valid credential yet, waiting.",
                "gauge",
                &c.unproven,
            ),
            (
                "connections_refused_total",
                "Connections refused: the connection limit was reached.",
                "counter",
                &c.refused,
            ),
            (
                "connections_evicted_total",
                "Unproven connections closed for newer ones.",
                "counter",
                &c.evicted,
            ),
            (
                "connections_timed_out_total",
                "Connections closed by the header or idle timeout.",
                "counter",
                &c.timed_out,
            ),
        ] {
            line(format!("# HELP bgp4mesh_{name} {help}"));
            line(format!("# TYPE bgp4mesh_{name} {kind}"));
            line(format!("bgp4mesh_{name} {}", value.load(Ordering::Relaxed)));
        }
        let d = &self.discovery;
        for (name, help, value) in [
            (
                "discovery_answered_total",
                "Endpoint discovery requests answered (UDP).",
                &d.answered,
            ),
            (
                "discovery_malformed_total",
                "Datagrams to the discovery ports that were no request, dropped.",
                &d.malformed,
            ),
            (
                "discovery_rate_limited_total",
                "Discovery requests over the per-source or global rate limit, dropped.",
                &d.rate_limited,
            ),
        ] {
            line(format!("# HELP bgp4mesh_{name} {help}"));
            line(format!("# TYPE bgp4mesh_{name} counter"));
            line(format!("bgp4mesh_{name} {}", value.load(Ordering::Relaxed)));
        }
        line("# HELP bgp4mesh_revision The last committed change.".into());
        line("# TYPE bgp4mesh_revision counter".into());
        line(format!("bgp4mesh_revision {revision}"));
        line("# HELP bgp4mesh_api_requests_total API requests by status class.".into());
        line("# TYPE bgp4mesh_api_requests_total counter".into());
        for (i, c) in self.requests.iter().enumerate() {
            line(format!(
                "bgp4mesh_api_requests_total{{code=\"{}xx\"}} {}",
                i + 1,
                c.load(Ordering::Relaxed)
            ));
        }
        line("# HELP bgp4mesh_api_request_seconds API latency (streams excluded).".into());
        line("# TYPE bgp4mesh_api_request_seconds histogram".into());
        let mut text = String::new();
        for (bucket, le) in self.buckets.iter().zip(BUCKETS) {
            let _ = writeln!(
                text,
                "bgp4mesh_api_request_seconds_bucket{{le=\"{le}\"}} {}",
                bucket.load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(
            text,
            "bgp4mesh_api_request_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            text,
            "bgp4mesh_api_request_seconds_sum {}",
            self.micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = write!(text, "bgp4mesh_api_request_seconds_count {count}");
        line(text);
        out
    }
}
