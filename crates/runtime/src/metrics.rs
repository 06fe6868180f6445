//! Prometheus metrics and the health endpoint every processor serves (`METRICS_ADDR`,
//! `/metrics` and `/health`). The series live in a `prometheus-client` registry (the
//! Prometheus project's own Rust client; OpenMetrics text exposition); the consumer loop,
//! settlement, the sink and the channels register theirs in [`global`] by name and labels.

use std::{
    collections::HashMap,
    future::Future,
    net::SocketAddr,
    sync::{Mutex, OnceLock},
    time::{Duration, Instant},
};

pub use prometheus_client::metrics::{counter::Counter, gauge::Gauge, histogram::Histogram};
use prometheus_client::{metrics::family::Family, registry::Registry};

/// A series' labels, in the order given.
type Labels = Vec<(String, String)>;

/// Latency buckets, seconds: 1 ms to 60 s.
const BOUNDS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0,
];

fn latency_histogram() -> Histogram {
    Histogram::new(BOUNDS)
}

/// One metric family of each kind, registered under its name on first use.
#[derive(Debug, Clone)]
enum Fam {
    Counter(Family<Labels, Counter>),
    Gauge(Family<Labels, Gauge>),
    Histogram(Family<Labels, Histogram, fn() -> Histogram>),
}

/// The record counters every processor reports under its group, whatever loop it runs:
/// records received, records done, records sent to the dead-letter topic.
#[derive(Debug, Clone)]
pub struct RecordCounters {
    pub consumed: Counter,
    pub processed: Counter,
    pub quarantined: Counter,
}

impl RecordCounters {
    /// The counters of `group` in the process's registry.
    pub fn for_group(group: &str) -> Self {
        let m = global();
        let l = [("group", group)];
        RecordCounters {
            consumed: m.counter(
                "billing_records_consumed_total",
                "Records received from the broker.",
                &l,
            ),
            processed: m.counter(
                "billing_records_processed_total",
                "Records handled successfully.",
                &l,
            ),
            quarantined: m.counter(
                "billing_dead_letters_total",
                "Records sent to the dead-letter topic.",
                &l,
            ),
        }
    }

    /// Adds to the three counters.
    pub fn add(&self, consumed: u64, processed: u64, quarantined: u64) {
        self.consumed.inc_by(consumed);
        self.processed.inc_by(processed);
        self.quarantined.inc_by(quarantined);
    }
}

/// The registry, and the process's health.
#[derive(Debug, Default)]
pub struct Metrics {
    registry: Mutex<Registry>,
    families: Mutex<HashMap<String, Fam>>,
    heartbeat: Mutex<Option<Instant>>,
    /// Why the main loop, although beating, is not making progress (a held record past its
    /// due time), if it is not.
    stuck: Mutex<Option<&'static str>>,
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Metrics {
    /// The family `name`, made and registered by `make` on first use. Counters are registered
    /// without their `_total` suffix, which the exposition adds.
    fn family(&self, name: &str, help: &str, make: impl FnOnce() -> Fam) -> Fam {
        let mut families = lock(&self.families);
        if let Some(f) = families.get(name) {
            return f.clone();
        }
        let f = make();
        let mut registry = lock(&self.registry);
        // The exposition ends every help text with a full stop of its own.
        let help = help.strip_suffix('.').unwrap_or(help);
        match &f {
            Fam::Counter(c) => {
                let base = name.strip_suffix("_total").unwrap_or(name);
                registry.register(base, help, c.clone());
            }
            Fam::Gauge(g) => registry.register(name, help, g.clone()),
            Fam::Histogram(h) => registry.register(name, help, h.clone()),
        }
        families.insert(name.to_string(), f.clone());
        f
    }

    /// A counter (created on first use). `name` ends in `_total`.
    pub fn counter(&self, name: &str, help: &str, l: &[(&str, &str)]) -> Counter {
        match self.family(name, help, || Fam::Counter(Family::default())) {
            Fam::Counter(f) => f.get_or_create(&labels(l)).clone(),
            _ => Counter::default(),
        }
    }

    /// A gauge.
    pub fn gauge(&self, name: &str, help: &str, l: &[(&str, &str)]) -> Gauge {
        match self.family(name, help, || Fam::Gauge(Family::default())) {
            Fam::Gauge(f) => f.get_or_create(&labels(l)).clone(),
            _ => Gauge::default(),
        }
    }

    /// A latency histogram (seconds) with buckets from 1 ms to 60 s.
    pub fn histogram(&self, name: &str, help: &str, l: &[(&str, &str)]) -> Histogram {
        let make = || {
            Fam::Histogram(Family::new_with_constructor(
                latency_histogram as fn() -> Histogram,
            ))
        };
        match self.family(name, help, make) {
            Fam::Histogram(f) => f.get_or_create(&labels(l)).clone(),
            _ => latency_histogram(),
        }
    }

    /// Removes one series (a revoked partition's lag, which is no longer this process's to
    /// report).
    pub fn remove(&self, name: &str, l: &[(&str, &str)]) {
        let l = labels(l);
        match lock(&self.families).get(name) {
            Some(Fam::Counter(f)) => {
                f.remove(&l);
            }
            Some(Fam::Gauge(f)) => {
                f.remove(&l);
            }
            Some(Fam::Histogram(f)) => {
                f.remove(&l);
            }
            None => {}
        }
    }

    /// Removes the consumer-lag series of a revoked partition.
    pub fn remove_lag(&self, group: &str, topic: &str, partition: i32) {
        let p = partition.to_string();
        self.remove(
            "billing_consumer_lag",
            &[("group", group), ("topic", topic), ("partition", &p)],
        );
    }

    /// Notes that the processor's main loop is alive.
    pub fn beat(&self) {
        if let Ok(mut h) = self.heartbeat.lock() {
            *h = Some(Instant::now());
        }
    }

    /// Notes whether the main loop is stuck although beating, and why.
    pub fn set_stuck(&self, why: Option<&'static str>) {
        if let Ok(mut s) = self.stuck.lock() {
            *s = why;
        }
    }

    /// Healthy when the main loop beat within `within` (or has not started beating yet).
    pub fn healthy(&self, within: Duration) -> bool {
        self.health(within).is_ok()
    }

    /// `Ok`, or why the processor is unhealthy: its main loop stopped beating within
    /// `within`, or it is stuck (see [`Metrics::set_stuck`]).
    pub fn health(&self, within: Duration) -> Result<(), &'static str> {
        let beating = self
            .heartbeat
            .lock()
            .map(|h| h.is_none_or(|t| t.elapsed() <= within))
            .unwrap_or(false);
        if !beating {
            return Err("main loop stalled");
        }
        match self.stuck.lock().map(|s| *s) {
            Ok(Some(why)) => Err(why),
            Ok(None) => Ok(()),
            Err(_) => Err("health state poisoned"),
        }
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &lock(&self.registry)) {
            tracing::warn!(error = %e, "cannot encode the metrics");
        }
        out
    }
}

/// The process's registry.
pub fn global() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(Metrics::default)
}

/// Serves `/metrics` and `/health` (200 while the main loop beat in the last 60 s, else 503)
/// on `addr` until `shutdown`. Port 0 picks a free port; the bound address is logged.
pub async fn serve(
    addr: SocketAddr,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<SocketAddr> {
    use axum::{Router, http::StatusCode, routing::get};
    let app = Router::new()
        .route(
            "/metrics",
            get(|| async {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    global().render(),
                )
            }),
        )
        .route(
            "/health",
            get(|| async {
                match global().health(Duration::from_secs(60)) {
                    Ok(()) => (StatusCode::OK, "ok"),
                    Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tracing::info!(%bound, "metrics and health endpoint");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::warn!(error = %e, "metrics endpoint stopped");
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_text_format() {
        let m = Metrics::default();
        m.counter("billing_records_total", "records.", &[("topic", "a")])
            .inc_by(3);
        m.gauge("billing_in_flight", "in flight", &[]).set(7);
        m.histogram("billing_handle_seconds", "latency", &[("topic", "a")])
            .observe(0.020);
        m.gauge("billing_consumer_lag", "lag", &[("partition", "1")])
            .set(5);
        m.remove("billing_consumer_lag", &[("partition", "1")]);
        let text = m.render();
        assert!(
            text.contains("# TYPE billing_records counter\nbilling_records_total{topic=\"a\"} 3"),
            "{text}"
        );
        assert!(text.contains("billing_in_flight{} 7"), "{text}");
        assert!(
            text.contains("# HELP billing_in_flight in flight.\n"),
            "{text}"
        );
        assert!(
            text.contains("billing_handle_seconds_bucket{le=\"0.05\",topic=\"a\"} 1"),
            "{text}"
        );
        assert!(!text.contains("billing_consumer_lag{"), "{text}");
        assert!(
            text.contains("billing_handle_seconds_bucket{le=\"0.01\",topic=\"a\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("billing_handle_seconds_count{topic=\"a\"} 1"),
            "{text}"
        );
        assert!(m.healthy(Duration::from_secs(1)));
    }

    #[test]
    fn a_beating_loop_that_is_stuck_is_unhealthy() {
        let m = Metrics::default();
        m.beat();
        assert_eq!(m.health(Duration::from_secs(60)), Ok(()));
        m.set_stuck(Some("a held record is past its due time"));
        assert_eq!(
            m.health(Duration::from_secs(60)),
            Err("a held record is past its due time")
        );
        m.set_stuck(None);
        assert_eq!(m.health(Duration::from_secs(60)), Ok(()));
    }
}
