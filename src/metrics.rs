//! Prometheus metrics: the contract's series, in one registry per server
//! (so tests in one process never mix), served on their own listener.
//!
//! Per-RPC series are resolved once at start-up into plain atomic handles,
//! so recording a call costs a map lookup and a few atomic adds; labels are
//! never built per call.

use std::{
    collections::HashMap,
    sync::{Arc, OnceLock},
    time::Duration,
};

use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tonic::Code;

type Labels = Vec<(&'static str, String)>;

/// The series of one RPC.
pub struct RpcMetrics {
    started: Counter,
    /// One per code, made on first use (so the exposition lists codes seen).
    handled: [OnceLock<Counter>; 17],
    handled_family: Family<Labels, Counter>,
    labels: Labels,
    latency: Histogram,
}

impl RpcMetrics {
    pub fn started(&self) {
        self.started.inc();
    }

    /// Records the call's end: its code and how long it took.
    pub fn handled(&self, code: Code, elapsed: Duration) {
        let index = (code as usize).min(16);
        self.handled[index]
            .get_or_init(|| {
                let mut labels = self.labels.clone();
                labels.push(("grpc_code", code_name(code).to_owned()));
                self.handled_family.get_or_create_owned(&labels)
            })
            .inc();
        self.latency.observe(elapsed.as_secs_f64());
    }
}

/// The code's name as gRPC dashboards spell it (`OK`, `NOT_FOUND`).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Every series the server exports.
pub struct Metrics {
    registry: Registry,
    rpcs: HashMap<String, RpcMetrics>,
    streams_open: Family<Labels, Gauge>,
    db_connections: Family<Labels, Gauge>,
    login_failures: Counter,
    throttled: Family<Labels, Counter>,
    load_shed: Counter,
    sessions_revoked: Family<Labels, Counter>,
    resident_memory: Gauge,
    open_fds: Gauge,
    event_bus_connected: Gauge,
}

/// Latency buckets from 0.5 ms to about 16 s.
fn latency_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.0005, 2.0, 16)
}

impl Metrics {
    /// The registry, with one set of RPC series per method of `pool`'s
    /// services (gRPC health and reflection included).
    pub fn new(services: &[(String, String, bool)]) -> Arc<Self> {
        let mut registry = Registry::default();
        let started = Family::<Labels, Counter>::default();
        let handled = Family::<Labels, Counter>::default();
        let latency =
            Family::<Labels, Histogram>::new_with_constructor(|| Histogram::new(latency_buckets()));
        registry.register(
            "grpc_server_started",
            "RPCs started on the server",
            started.clone(),
        );
        registry.register(
            "grpc_server_handled",
            "RPCs completed on the server, by code",
            handled.clone(),
        );
        registry.register(
            "grpc_server_handling_seconds",
            "Time from the call's start to its end (the stream's, for streams)",
            latency.clone(),
        );
        let mut rpcs = HashMap::new();
        for (service, method, streaming) in services {
            let labels: Labels = vec![
                ("grpc_service", service.clone()),
                ("grpc_method", method.clone()),
                (
                    "grpc_type",
                    if *streaming { "server_stream" } else { "unary" }.to_owned(),
                ),
            ];
            rpcs.insert(
                format!("/{service}/{method}"),
                RpcMetrics {
                    started: started.get_or_create_owned(&labels),
                    handled: Default::default(),
                    handled_family: handled.clone(),
                    latency: latency.get_or_create_owned(&labels),
                    labels,
                },
            );
        }
        let streams_open = Family::<Labels, Gauge>::default();
        registry.register(
            "ai_message_streams_open",
            "Open server streams, by method",
            streams_open.clone(),
        );
        let db_connections = Family::<Labels, Gauge>::default();
        registry.register(
            "ai_message_db_connections",
            "Database connections, idle or in use",
            db_connections.clone(),
        );
        let login_failures = Counter::default();
        registry.register(
            "ai_message_login_failures",
            "Logins that did not authenticate",
            login_failures.clone(),
        );
        let throttled = Family::<Labels, Counter>::default();
        registry.register(
            "ai_message_throttled",
            "Attempts refused by login throttling, by scope",
            throttled.clone(),
        );
        let load_shed = Counter::default();
        registry.register(
            "ai_message_load_shed",
            "Calls refused because the server was at capacity",
            load_shed.clone(),
        );
        let sessions_revoked = Family::<Labels, Counter>::default();
        registry.register(
            "ai_message_sessions_revoked",
            "Sessions ended early, by reason",
            sessions_revoked.clone(),
        );
        let build_info = Family::<Labels, Gauge>::default();
        build_info
            .get_or_create(&vec![("version", env!("CARGO_PKG_VERSION").to_owned())])
            .set(1);
        registry.register("ai_message_build_info", "The running build", build_info);
        let resident_memory = Gauge::default();
        registry.register(
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            resident_memory.clone(),
        );
        let open_fds = Gauge::default();
        registry.register(
            "process_open_fds",
            "Open file descriptors",
            open_fds.clone(),
        );
        let event_bus_connected = Gauge::default();
        registry.register(
            "ai_message_event_bus_connected",
            "Whether every instance's events reach this one (1) or not (0)",
            event_bus_connected.clone(),
        );
        Arc::new(Self {
            registry,
            rpcs,
            streams_open,
            db_connections,
            login_failures,
            throttled,
            load_shed,
            sessions_revoked,
            resident_memory,
            open_fds,
            event_bus_connected,
        })
    }

    /// The series of the RPC at `path` (`/aimessage.v1.AuthService/Login`).
    pub fn rpc(&self, path: &str) -> Option<&RpcMetrics> {
        self.rpcs.get(path)
    }

    /// Counts what a refusal's ErrorInfo reason says happened.
    pub fn refused(&self, reason: &str) {
        match reason {
            "LOGIN_FAILED" => {
                self.login_failures.inc();
            }
            "ACCOUNT_THROTTLED" => {
                self.throttled
                    .get_or_create(&vec![("scope", "account".to_owned())])
                    .inc();
            }
            "ADDRESS_THROTTLED" => {
                self.throttled
                    .get_or_create(&vec![("scope", "address".to_owned())])
                    .inc();
            }
            "SERVER_OVERLOADED" => {
                self.load_shed.inc();
            }
            _ => {}
        }
    }

    /// A stream of `method` opened; the guard closes it when dropped.
    pub fn stream_opened(self: &Arc<Self>, method: &'static str) -> StreamGuard {
        let gauge = self
            .streams_open
            .get_or_create_owned(&vec![("grpc_method", method.to_owned())]);
        gauge.inc();
        StreamGuard(gauge)
    }

    /// `count` sessions ended for `reason` (lower-case, `logout`).
    pub fn sessions_revoked(&self, reason: &str, count: u64) {
        if count > 0 {
            self.sessions_revoked
                .get_or_create(&vec![("reason", reason.to_owned())])
                .inc_by(count);
        }
    }

    /// The text exposition, after sampling the gauges that are read, not fed.
    pub fn render(&self, pool: crate::storage::PoolState, event_bus_connected: bool) -> String {
        self.event_bus_connected.set(i64::from(event_bus_connected));
        for (state, value) in [("idle", pool.idle), ("in_use", pool.in_use)] {
            self.db_connections
                .get_or_create(&vec![("state", state.to_owned())])
                .set(i64::try_from(value).unwrap_or(i64::MAX));
        }
        let (rss, fds) = process_stats();
        self.resident_memory.set(rss);
        self.open_fds.set(fds);
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// Keeps `ai_message_streams_open` counted while a stream lives.
pub struct StreamGuard(Gauge);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Resident bytes and open descriptors of this process, from /proc.
fn process_stats() -> (i64, i64) {
    let page = 4096;
    let rss = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|statm| statm.split_whitespace().nth(1)?.parse::<i64>().ok())
        .map_or(0, |pages| pages * page);
    let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |entries| entries.count() as i64);
    (rss, fds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpc_series_carry_the_dashboard_labels() {
        let metrics = Metrics::new(&[("aimessage.v1.AuthService".into(), "Login".into(), false)]);
        let login = metrics.rpc("/aimessage.v1.AuthService/Login").unwrap();
        login.started();
        login.handled(Code::Unauthenticated, Duration::from_millis(3));
        metrics.refused("LOGIN_FAILED");
        let text = metrics.render(crate::storage::PoolState { idle: 2, in_use: 1 }, false);
        assert!(text.contains(
            r#"grpc_server_started_total{grpc_service="aimessage.v1.AuthService",grpc_method="Login",grpc_type="unary"} 1"#
        ), "{text}");
        assert!(text.contains(
            r#"grpc_server_handled_total{grpc_service="aimessage.v1.AuthService",grpc_method="Login",grpc_type="unary",grpc_code="UNAUTHENTICATED"} 1"#
        ), "{text}");
        assert!(
            text.contains("grpc_server_handling_seconds_count{"),
            "{text}"
        );
        assert!(text.contains("ai_message_login_failures_total 1"), "{text}");
        assert!(
            text.contains(r#"ai_message_db_connections{state="in_use"} 1"#),
            "{text}"
        );
        assert!(text.contains("ai_message_event_bus_connected 0"), "{text}");
        assert!(
            text.contains(r#"ai_message_build_info{version=""#),
            "{text}"
        );
    }
}
