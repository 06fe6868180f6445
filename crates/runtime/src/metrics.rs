//! Prometheus metrics and the health endpoint every processor serves (`METRICS_ADDR`,
//! `/metrics` and `/health`). A small registry of counters, gauges and histograms in the text
//! exposition format; the consumer loop and the channels register theirs in [`global`].

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    future::Future,
    net::SocketAddr,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// A histogram with fixed bucket bounds (seconds).
#[derive(Debug)]
pub struct Histogram {
    bounds: Vec<f64>,
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    /// Sum in microseconds.
    sum_us: AtomicU64,
}

impl Histogram {
    fn new(bounds: &[f64]) -> Self {
        Histogram {
            bounds: bounds.to_vec(),
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (b, n) in self.bounds.iter().zip(&self.buckets) {
            if secs <= *b {
                n.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(
            u64::try_from(d.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }
}

#[derive(Debug, Clone)]
enum Metric {
    Counter(Arc<AtomicU64>),
    Gauge(Arc<AtomicI64>),
    Histogram(Arc<Histogram>),
}

/// Name, help, and the series by label set.
type Family = (String, BTreeMap<String, Metric>);

/// The record counters every processor reports under its group, whatever loop it runs:
/// records received, records done, records sent to the dead-letter topic.
#[derive(Debug, Clone)]
pub struct RecordCounters {
    pub consumed: Arc<AtomicU64>,
    pub processed: Arc<AtomicU64>,
    pub quarantined: Arc<AtomicU64>,
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
        use std::sync::atomic::Ordering::Relaxed;
        self.consumed.fetch_add(consumed, Relaxed);
        self.processed.fetch_add(processed, Relaxed);
        self.quarantined.fetch_add(quarantined, Relaxed);
    }
}

/// The registry.
#[derive(Debug, Default)]
pub struct Metrics {
    families: Mutex<BTreeMap<String, Family>>,
    heartbeat: Mutex<Option<Instant>>,
    /// Why the main loop, although beating, is not making progress (a held record past its
    /// due time), if it is not.
    stuck: Mutex<Option<&'static str>>,
}

fn labels(pairs: &[(&str, &str)]) -> String {
    if pairs.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect();
    format!("{{{}}}", inner.join(","))
}

impl Metrics {
    fn get(
        &self,
        name: &str,
        help: &str,
        l: &[(&str, &str)],
        make: impl FnOnce() -> Metric,
    ) -> Metric {
        let mut f = self
            .families
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let fam = f
            .entry(name.to_string())
            .or_insert_with(|| (help.to_string(), BTreeMap::new()));
        fam.1.entry(labels(l)).or_insert_with(make).clone()
    }

    /// A counter (created on first use).
    pub fn counter(&self, name: &str, help: &str, l: &[(&str, &str)]) -> Arc<AtomicU64> {
        match self.get(name, help, l, || Metric::Counter(Arc::default())) {
            Metric::Counter(c) => c,
            _ => Arc::default(),
        }
    }

    /// A gauge.
    pub fn gauge(&self, name: &str, help: &str, l: &[(&str, &str)]) -> Arc<AtomicI64> {
        match self.get(name, help, l, || Metric::Gauge(Arc::default())) {
            Metric::Gauge(g) => g,
            _ => Arc::default(),
        }
    }

    /// A latency histogram (seconds) with buckets from 1 ms to 60 s.
    pub fn histogram(&self, name: &str, help: &str, l: &[(&str, &str)]) -> Arc<Histogram> {
        const BOUNDS: [f64; 12] = [
            0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0,
        ];
        match self.get(name, help, l, || {
            Metric::Histogram(Arc::new(Histogram::new(&BOUNDS)))
        }) {
            Metric::Histogram(h) => h,
            _ => Arc::new(Histogram::new(&BOUNDS)),
        }
    }

    /// Removes one series (a revoked partition's lag, which is no longer this process's to
    /// report).
    pub fn remove(&self, name: &str, l: &[(&str, &str)]) {
        let mut f = self
            .families
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(fam) = f.get_mut(name) {
            fam.1.remove(&labels(l));
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

    /// The text exposition format.
    pub fn render(&self) -> String {
        let f = self
            .families
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut out = String::new();
        for (name, (help, series)) in f.iter() {
            let kind = match series.values().next() {
                Some(Metric::Counter(_)) => "counter",
                Some(Metric::Gauge(_)) => "gauge",
                Some(Metric::Histogram(_)) => "histogram",
                None => continue,
            };
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (l, m) in series {
                match m {
                    Metric::Counter(c) => {
                        let _ = writeln!(out, "{name}{l} {}", c.load(Ordering::Relaxed));
                    }
                    Metric::Gauge(g) => {
                        let _ = writeln!(out, "{name}{l} {}", g.load(Ordering::Relaxed));
                    }
                    Metric::Histogram(h) => {
                        let inner = l.trim_start_matches('{').trim_end_matches('}');
                        let sep = if inner.is_empty() { "" } else { "," };
                        for (b, n) in h.bounds.iter().zip(&h.buckets) {
                            let _ = writeln!(
                                out,
                                "{name}_bucket{{{inner}{sep}le=\"{b}\"}} {}",
                                n.load(Ordering::Relaxed)
                            );
                        }
                        let count = h.count.load(Ordering::Relaxed);
                        let _ = writeln!(out, "{name}_bucket{{{inner}{sep}le=\"+Inf\"}} {count}");
                        #[allow(clippy::cast_precision_loss)]
                        let sum = h.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
                        let _ = writeln!(out, "{name}_sum{l} {sum}\n{name}_count{l} {count}");
                    }
                }
            }
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
        .route("/metrics", get(|| async { global().render() }))
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
        m.counter("billing_records_total", "records", &[("topic", "a")])
            .fetch_add(3, Ordering::Relaxed);
        m.gauge("billing_in_flight", "in flight", &[])
            .store(7, Ordering::Relaxed);
        m.histogram("billing_handle_seconds", "latency", &[("topic", "a")])
            .observe(Duration::from_millis(20));
        let text = m.render();
        assert!(
            text.contains(
                "# TYPE billing_records_total counter\nbilling_records_total{topic=\"a\"} 3"
            ),
            "{text}"
        );
        assert!(text.contains("billing_in_flight 7"), "{text}");
        assert!(
            text.contains("billing_handle_seconds_bucket{topic=\"a\",le=\"0.05\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("billing_handle_seconds_bucket{topic=\"a\",le=\"0.01\"} 0"),
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
