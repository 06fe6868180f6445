//! Provider-grade sending around any gateway: a rate limit and a circuit breaker
//! ([`Guarded`]).
//!
//! - **Rate limit**: a token bucket per process and gateway (`rate` messages per second,
//!   evenly spaced, no bursts), shared by every send in flight. A send waits for its
//!   token; none is refused.
//! - **Circuit breaker**: after `failures` transient failures in a row the breaker opens: no
//!   send reaches the provider while it is open, and the sends that failed while it was
//!   opening, or that arrive while it is open, *wait* instead of failing. After `open_for`
//!   (doubling up to 30 s while the provider stays down) one send goes through as a probe;
//!   its success closes the breaker and the waiting sends go on. A transient failure is only
//!   returned to the channel (burning an attempt, starting the retry topics and eventually
//!   the SMS fallback) when the breaker stayed closed for a short while after it (an isolated
//!   failure), or when a send has waited `max_hold`: so an outage shorter than `max_hold`
//!   costs no attempt and sends no fallback, as long as `failures` sends are in flight when
//!   it starts (with fewer, the first `failures - 1` failures count as attempts). `max_hold` must
//!   stay below the channel's claim lease, so a waiting send still owns its delivery.
//!   While sends wait, they fill the channel's in-flight slots, and the consumer loop stops
//!   pulling: the partitions are in effect paused.
//! - Metrics: `billing_gateway_throttled_ms_total`, `billing_gateway_breaker_open`,
//!   `billing_gateway_breaker_trips_total`, `billing_gateway_held_total` (by channel).

use std::{
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::time::Instant;

use crate::{Mail, MailGateway, SendError, Sms, SmsGateway, UnknownOutcome};

/// How a gateway is guarded.
#[derive(Debug, Clone, clap::Args)]
pub struct GuardArgs {
    /// Messages per second this process sends through the gateway, at most (0: no limit).
    #[arg(long = "gateway-rate", env = "GATEWAY_RATE", default_value_t = 0.0)]
    pub rate: f64,
    /// Transient failures in a row that open the circuit breaker (0: no breaker). Defaults
    /// to 5 for real providers, 0 for the simulated one.
    #[arg(long = "gateway-breaker-failures", env = "GATEWAY_BREAKER_FAILURES")]
    pub breaker_failures: Option<u32>,
    /// How long the breaker stays open before its first probe, milliseconds (it doubles
    /// while probes fail, up to 30 s).
    #[arg(
        long = "gateway-breaker-open-ms",
        env = "GATEWAY_BREAKER_OPEN_MS",
        default_value_t = 1000
    )]
    pub open_ms: u64,
    /// How long a send may wait on an open breaker before its failure counts as an attempt,
    /// milliseconds (keep it below the claim lease).
    #[arg(
        long = "gateway-max-hold-ms",
        env = "GATEWAY_MAX_HOLD_MS",
        default_value_t = 30_000
    )]
    pub max_hold_ms: u64,
}

impl GuardArgs {
    /// Unguarded: no limit, no breaker.
    pub fn off() -> Self {
        GuardArgs {
            rate: 0.0,
            breaker_failures: Some(0),
            open_ms: 1000,
            max_hold_ms: 30_000,
        }
    }
}

/// A token bucket: `rate` tokens a second, holding at most one (no bursts: sends are spaced
/// evenly, which is what providers' per-second limits measure).
#[derive(Debug)]
struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// Takes a token, or says how long until one is there.
    fn take(&mut self, now: Instant) -> Option<Duration> {
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(1.0);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            None
        } else {
            Some(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }
}

/// The breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed {
        failures: u32,
    },
    /// No send until `until`; then one probe.
    Open {
        until: Instant,
        open_for: Duration,
    },
    /// A probe is out since `since`; the others wait for its answer (or, if it never comes,
    /// a cancelled probe, send another after [`MAX_OPEN`]).
    Probing {
        open_for: Duration,
        since: Instant,
    },
}

/// What a send may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Permit {
    Send,
    Probe,
    Wait(Duration),
}

#[derive(Debug)]
struct Breaker {
    threshold: u32,
    open_for: Duration,
    state: State,
}

const MAX_OPEN: Duration = Duration::from_secs(30);
/// How often a waiting send looks again while a probe is out.
const PROBE_POLL: Duration = Duration::from_millis(50);

impl Breaker {
    fn permit(&mut self, now: Instant) -> Permit {
        match self.state {
            State::Closed { .. } => Permit::Send,
            State::Open { until, open_for } if now >= until => {
                self.state = State::Probing {
                    open_for,
                    since: now,
                };
                Permit::Probe
            }
            State::Open { until, .. } => Permit::Wait(until - now),
            State::Probing { open_for, since } if now.duration_since(since) >= MAX_OPEN => {
                self.state = State::Probing {
                    open_for,
                    since: now,
                };
                Permit::Probe
            }
            State::Probing { .. } => Permit::Wait(PROBE_POLL),
        }
    }

    /// The provider answered (accepted, or refused for good).
    fn answered(&mut self) {
        self.state = State::Closed { failures: 0 };
    }

    /// A transient failure; returns whether the breaker is (now) open or probing.
    fn failed(&mut self, now: Instant, probe: bool) -> bool {
        match self.state {
            State::Closed { failures } => {
                let failures = failures + 1;
                if self.threshold > 0 && failures >= self.threshold {
                    self.state = State::Open {
                        until: now + self.open_for,
                        open_for: self.open_for,
                    };
                } else {
                    self.state = State::Closed { failures };
                }
            }
            State::Probing { open_for, .. } if probe => {
                let open_for = (open_for * 2).min(MAX_OPEN);
                self.state = State::Open {
                    until: now + open_for,
                    open_for,
                };
            }
            State::Open { .. } | State::Probing { .. } => {}
        }
        !matches!(self.state, State::Closed { .. })
    }

    fn is_open(&self) -> bool {
        !matches!(self.state, State::Closed { .. })
    }
}

#[derive(Debug)]
struct Metrics {
    throttled: billing_runtime::metrics::Counter,
    open: billing_runtime::metrics::Gauge,
    trips: billing_runtime::metrics::Counter,
    held: billing_runtime::metrics::Counter,
}

impl Metrics {
    fn new(channel: &str) -> Self {
        let m = billing_runtime::metrics::global();
        let l = [("channel", channel)];
        Metrics {
            throttled: m.counter(
                "billing_gateway_throttled_ms",
                "Milliseconds sends waited for the rate limit.",
                &l,
            ),
            open: m.gauge(
                "billing_gateway_breaker_open",
                "1 while the channel's circuit breaker is open or probing.",
                &l,
            ),
            trips: m.counter(
                "billing_gateway_breaker_trips",
                "Times the circuit breaker opened.",
                &l,
            ),
            held: m.counter(
                "billing_gateway_held",
                "Sends that waited on an open breaker instead of failing.",
                &l,
            ),
        }
    }
}

#[derive(Debug)]
struct Shared {
    bucket: Option<Mutex<Bucket>>,
    /// Failures that open the breaker (0: no breaker).
    threshold: u32,
    breaker: Mutex<Breaker>,
    max_hold: Duration,
    metrics: Metrics,
}

/// A gateway with a rate limit and a circuit breaker (see the module docs).
#[derive(Debug, Clone)]
pub struct Guarded<G> {
    inner: G,
    shared: Arc<Shared>,
}

impl<G> Guarded<G> {
    /// Guards `inner`, the `channel`'s gateway; `breaker_default` applies when the arguments
    /// leave the breaker's threshold unset.
    pub fn new(inner: G, channel: &str, args: &GuardArgs, breaker_default: u32) -> Self {
        let now = Instant::now();
        let bucket = (args.rate > 0.0).then(|| {
            Mutex::new(Bucket {
                rate: args.rate,
                tokens: 1.0,
                at: now,
            })
        });
        let threshold = args.breaker_failures.unwrap_or(breaker_default);
        let breaker = Breaker {
            threshold,
            open_for: Duration::from_millis(args.open_ms.max(1)),
            state: State::Closed { failures: 0 },
        };
        Guarded {
            inner,
            shared: Arc::new(Shared {
                bucket,
                threshold,
                breaker: Mutex::new(breaker),
                max_hold: Duration::from_millis(args.max_hold_ms),
                metrics: Metrics::new(channel),
            }),
        }
    }

    async fn throttle(&self) {
        let Some(bucket) = &self.shared.bucket else {
            return;
        };
        loop {
            let wait = match bucket.lock() {
                Ok(mut b) => b.take(Instant::now()),
                Err(_) => None,
            };
            let Some(wait) = wait else { return };
            self.shared
                .metrics
                .throttled
                .inc_by(u64::try_from(wait.as_millis()).unwrap_or(0));
            tokio::time::sleep(wait).await;
        }
    }

    fn permit(&self) -> Permit {
        self.shared
            .breaker
            .lock()
            .map_or(Permit::Send, |mut b| b.permit(Instant::now()))
    }

    fn is_open(&self) -> bool {
        self.shared.breaker.lock().is_ok_and(|b| b.is_open())
    }

    /// Records a transient failure; returns whether the breaker is open now.
    fn failed(&self, probe: bool, error: &str) -> bool {
        let Ok(mut b) = self.shared.breaker.lock() else {
            return false;
        };
        let was_open = b.is_open();
        let open = b.failed(Instant::now(), probe);
        self.shared.metrics.open.set(i64::from(open));
        if open && !was_open {
            self.shared.metrics.trips.inc();
            tracing::warn!(error, "circuit breaker opened: sends wait for the provider");
        }
        open
    }

    fn answered(&self, probe: bool) {
        if let Ok(mut b) = self.shared.breaker.lock() {
            if b.is_open() || probe {
                tracing::info!("circuit breaker closed: the provider answers again");
            }
            b.answered();
        }
        self.shared.metrics.open.set(0);
    }

    /// Waits on an open breaker; `false` once the send has waited `max_hold`.
    async fn wait(&self, d: Duration, deadline: Instant, held: &mut bool) -> bool {
        if !*held {
            *held = true;
            self.shared.metrics.held.inc();
        }
        if Instant::now() + d > deadline {
            return false;
        }
        tokio::time::sleep(d).await;
        true
    }

    /// Sends through the breaker and the limit; see the module docs for what waits.
    async fn guarded<F, Fut>(&self, send: F) -> Result<(), SendError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<(), SendError>>,
    {
        let deadline = Instant::now() + self.shared.max_hold;
        let mut held = false;
        loop {
            let probe = match self.permit() {
                Permit::Send => false,
                Permit::Probe => true,
                Permit::Wait(d) => {
                    if !self.wait(d, deadline, &mut held).await {
                        return Err(SendError::Transient(
                            "the provider is down (circuit breaker open)".into(),
                        ));
                    }
                    continue;
                }
            };
            self.throttle().await;
            let e = match send().await {
                Err(SendError::Transient(e)) => e,
                other => {
                    self.answered(probe);
                    return other;
                }
            };
            let mut open = self.failed(probe, &e);
            if !open && self.shared.threshold > 0 && Instant::now() < deadline {
                // Perhaps the start of an outage: the sends in flight beside this one are
                // failing too. Look again shortly before the failure burns an attempt.
                tokio::time::sleep(SETTLE).await;
                open = self.is_open();
            }
            if !open || Instant::now() >= deadline {
                return Err(SendError::Transient(e));
            }
            held = true;
        }
    }
}

/// How long a transient failure waits to see whether it is the start of an outage.
const SETTLE: Duration = Duration::from_millis(300);

impl<G: MailGateway> MailGateway for Guarded<G> {
    async fn send(&self, mail: &Mail) -> Result<(), SendError> {
        self.guarded(|| self.inner.send(mail)).await
    }

    fn unknown_outcome(&self) -> UnknownOutcome {
        self.inner.unknown_outcome()
    }
}

impl<G: SmsGateway> SmsGateway for Guarded<G> {
    async fn send(&self, sms: &Sms) -> Result<(), SendError> {
        self.guarded(|| self.inner.send(sms)).await
    }

    fn unknown_outcome(&self) -> UnknownOutcome {
        self.inner.unknown_outcome()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_bucket_spaces_sends_evenly() {
        let t0 = Instant::now();
        let mut b = Bucket {
            rate: 10.0,
            tokens: 1.0,
            at: t0,
        };
        assert_eq!(b.take(t0), None);
        let wait = b.take(t0).unwrap();
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-9);
        assert_eq!(b.take(t0 + Duration::from_millis(100)), None);
    }

    #[test]
    fn the_breaker_opens_after_its_threshold_probes_and_closes() {
        let t0 = Instant::now();
        let mut b = Breaker {
            threshold: 3,
            open_for: Duration::from_secs(1),
            state: State::Closed { failures: 0 },
        };
        assert!(!b.failed(t0, false));
        assert!(!b.failed(t0, false));
        assert!(b.failed(t0, false));
        assert_eq!(b.permit(t0), Permit::Wait(Duration::from_secs(1)));
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(b.permit(t1), Permit::Probe);
        assert_eq!(b.permit(t1), Permit::Wait(PROBE_POLL));
        // A failed probe doubles the open time.
        assert!(b.failed(t1, true));
        assert_eq!(b.permit(t1), Permit::Wait(Duration::from_secs(2)));
        assert_eq!(b.permit(t1 + Duration::from_secs(2)), Permit::Probe);
        b.answered();
        assert_eq!(b.permit(t1), Permit::Send);
    }

    #[test]
    fn an_isolated_failure_never_opens_a_breaker_and_zero_disables_it() {
        let t0 = Instant::now();
        let mut b = Breaker {
            threshold: 3,
            open_for: Duration::from_secs(1),
            state: State::Closed { failures: 0 },
        };
        b.failed(t0, false);
        b.answered();
        b.failed(t0, false);
        b.failed(t0, false);
        assert_eq!(b.permit(t0), Permit::Send);
        let mut off = Breaker {
            threshold: 0,
            open_for: Duration::from_secs(1),
            state: State::Closed { failures: 0 },
        };
        for _ in 0..100 {
            assert!(!off.failed(t0, false));
        }
    }
}
