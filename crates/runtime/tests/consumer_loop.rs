//! The consumer loop over the real broker and registry.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use billing_runtime::{
    HandleError, Handler, Incoming, LoopConfig, Producer, Quarantine,
    consumer::{LoopDeps, StopReason, run_consumer},
    quarantine::headers,
};
use billing_schema::{
    Decoder, Encoder, UsageRecord,
    catalogue::{DEAD_LETTERS, USAGE_RECORDS},
};
use billing_testkit::TestEnv;

fn usage(n: i64, quantity: i64) -> UsageRecord {
    UsageRecord {
        usage_id: format!("u{n}"),
        member_id: 1,
        product_id: "usage-data".into(),
        quantity,
        billing_month: "2026-11".into(),
        occurred_at: 1_700_000_000_000 + n,
    }
}

/// Records what it saw; refuses negative quantities as a final error; optionally slow.
#[derive(Default)]
struct Recorder {
    seen: Mutex<Vec<(i64, String)>>,
    delay: Duration,
    started: tokio::sync::Notify,
}

impl Handler<UsageRecord> for Recorder {
    async fn handle(&self, r: &Incoming<UsageRecord>) -> Result<(), HandleError> {
        self.started.notify_one();
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        if r.value.quantity < 0 {
            return Err(HandleError::Final(format!(
                "negative quantity {}",
                r.value.quantity
            )));
        }
        self.seen
            .lock()
            .unwrap()
            .push((r.offset, r.value.usage_id.clone()));
        Ok(())
    }
}

/// The usage topic's encoder, its schema registered under the test's subject.
async fn usage_encoder(env: &TestEnv) -> Encoder<UsageRecord> {
    Encoder::register(
        &env.registry,
        &env.catalogue().value_subject(&USAGE_RECORDS.spec),
    )
    .await
    .unwrap()
}

/// Publishes usage records `0..count` (quantity 1, one key) to `topic`, in order.
async fn publish_usage(env: &TestEnv, topic: &str, count: i64) {
    publish_usage_as(env, topic, count, |n| usage(n, 1)).await;
}

/// Publishes `record(n)` for `n` in `0..count` (one key) to `topic`, in order.
async fn publish_usage_as(
    env: &TestEnv,
    topic: &str,
    count: i64,
    record: impl Fn(i64) -> UsageRecord,
) {
    let enc = usage_encoder(env).await;
    let producer = Producer::new(&env.kafka()).unwrap();
    for n in 0..count {
        let payload = enc.encode(&record(n)).unwrap();
        producer
            .send(topic, Some(b"1"), Some(&payload), None)
            .await
            .unwrap();
    }
}

/// Runs a bounded loop of `group` over `topic` with `deps` to its end (at most a minute).
async fn run_bounded(
    env: &TestEnv,
    group: &str,
    topic: &str,
    deps: LoopDeps<UsageRecord, Recorder>,
    delayed: Vec<(String, Duration)>,
) -> billing_runtime::LoopSummary {
    let mut config = LoopConfig::new(env.group(group), vec![topic.to_string()]);
    config.bounded = true;
    config.delayed = delayed.into_iter().collect();
    tokio::time::timeout(
        Duration::from_secs(60),
        run_consumer(config, deps, std::future::pending()),
    )
    .await
    .unwrap_or_else(|_| panic!("{group}: the bounded loop did not reach its end"))
    .unwrap()
}

/// The summary of a loop spawned as `run`, which must end within `secs` seconds.
async fn finished(
    run: tokio::task::JoinHandle<
        Result<billing_runtime::LoopSummary, billing_runtime::consumer::LoopError>,
    >,
    secs: u64,
) -> billing_runtime::LoopSummary {
    tokio::time::timeout(Duration::from_secs(secs), run)
        .await
        .unwrap()
        .unwrap()
        .unwrap()
}

async fn deps<H: Handler<UsageRecord>>(
    env: &TestEnv,
    handler: Arc<H>,
    stage: &str,
) -> LoopDeps<UsageRecord, H> {
    let producer = Producer::new(&env.kafka()).unwrap();
    let dlq = Encoder::register(
        &env.registry,
        &env.catalogue().value_subject(&DEAD_LETTERS.spec),
    )
    .await
    .unwrap();
    LoopDeps {
        kafka: env.kafka(),
        decoder: Arc::new(Decoder::new(env.registry.clone())),
        handler,
        quarantine: Quarantine::new(
            producer,
            env.topic(&DEAD_LETTERS.spec),
            stage,
            Arc::new(dlq),
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_records_are_quarantined_and_the_loop_goes_on() {
    // Given a partition holding good records, a short payload, an unknown schema id and a
    // record the handler refuses
    let env = TestEnv::with_partitions(1).await;
    let topic = env.topic(&USAGE_RECORDS.spec);
    let enc = usage_encoder(&env).await;
    let producer = Producer::new(&env.kafka()).unwrap();
    let payloads: Vec<Vec<u8>> = vec![
        enc.encode(&usage(0, 10)).unwrap(),
        vec![0, 0, 1],
        vec![0, 0x7f, 0xff, 0xff, 0xfe, 2, 4],
        enc.encode(&usage(3, -5)).unwrap(),
        enc.encode(&usage(4, 20)).unwrap(),
    ];
    for p in &payloads {
        producer
            .send(&topic, Some(b"1"), Some(p), None)
            .await
            .unwrap();
    }

    // When the loop runs over it in bounded mode
    let handler = Arc::new(Recorder::default());
    let mut config = LoopConfig::new(env.group("loop"), vec![topic.clone()]);
    config.bounded = true;
    let summary = tokio::time::timeout(
        Duration::from_secs(60),
        run_consumer(
            config,
            deps(&env, handler.clone(), "test-stage").await,
            std::future::pending(),
        ),
    )
    .await
    .expect("bounded loop ends by itself")
    .unwrap();

    // Then the good records were handled, the three bad ones quarantined with reasons, and
    // the offset moved past all of them
    assert_eq!(summary.stopped_by, StopReason::EndOfInput);
    assert_eq!(
        (summary.processed, summary.quarantined, summary.abandoned),
        (2, 3, 0)
    );
    assert_eq!(
        *handler.seen.lock().unwrap(),
        vec![(0, "u0".to_string()), (4, "u4".to_string())]
    );
    let dead = env
        .read(&env.topic(&DEAD_LETTERS.spec), 3, Duration::from_secs(20))
        .await;
    assert_eq!(dead.len(), 3);
    let mut by_offset: Vec<_> = dead
        .iter()
        .map(|d| {
            (
                d.headers[headers::SOURCE_OFFSET].parse::<i64>().unwrap(),
                d.headers[headers::REASON].clone(),
                d,
            )
        })
        .collect();
    by_offset.sort_by_key(|x| x.0);
    assert_eq!(
        by_offset.iter().map(|x| x.0).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert!(
        by_offset[0].1.contains("shorter than"),
        "{}",
        by_offset[0].1
    );
    assert!(
        by_offset[1].1.contains("not known to the registry"),
        "{}",
        by_offset[1].1
    );
    assert_eq!(by_offset[2].1, "negative quantity -5");
    for (offset, _, d) in &by_offset {
        assert_eq!(d.headers[headers::SOURCE_TOPIC], topic);
        assert_eq!(d.headers[headers::STAGE], "test-stage");
        // The dead letter carries the original bytes.
        let letter: billing_schema::DeadLetter = Decoder::new(env.registry.clone())
            .decode(d.payload.as_deref())
            .await
            .unwrap();
        assert_eq!(
            letter.payload.as_deref(),
            Some(payloads[usize::try_from(*offset).unwrap()].as_slice())
        );
        assert_eq!(letter.source_offset, *offset);
    }
    assert_eq!(
        env.committed(&env.group("loop"), &topic).await.get(&0),
        Some(&5)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drains_cleanly_on_shutdown_and_resumes_without_loss_or_repeat() {
    // Given 40 records on one partition and a slow handler
    let env = TestEnv::with_partitions(1).await;
    let topic = env.topic(&USAGE_RECORDS.spec);
    publish_usage(&env, &topic, 40).await;
    let slow = Arc::new(Recorder {
        delay: Duration::from_millis(150),
        ..Recorder::default()
    });
    let mut config = LoopConfig::new(env.group("drain"), vec![topic.clone()]);
    config.max_in_flight = 8;

    // When shutdown is requested while records are in flight
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(run_consumer(
        config.clone(),
        deps(&env, slow.clone(), "drain").await,
        async {
            let _ = stop_rx.await;
        },
    ));
    slow.started.notified().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop_tx.send(()).unwrap();
    let first = finished(run, 30).await;

    // Then everything begun was finished and committed, contiguously
    assert_eq!(first.stopped_by, StopReason::Shutdown);
    assert_eq!(first.abandoned, 0);
    assert!(
        first.processed > 0 && first.processed < 40,
        "processed {}",
        first.processed
    );
    let first_seen: Vec<i64> = slow.seen.lock().unwrap().iter().map(|s| s.0).collect();
    let mut sorted = first_seen.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        (0..i64::try_from(first.processed).unwrap()).collect::<Vec<_>>()
    );
    let committed = env.committed(&env.group("drain"), &topic).await;
    assert_eq!(
        committed.get(&0),
        Some(&i64::try_from(first.processed).unwrap())
    );

    // And a second run picks up exactly where the first stopped
    let fast = Arc::new(Recorder::default());
    config.bounded = true;
    let second = tokio::time::timeout(
        Duration::from_secs(60),
        run_consumer(
            config,
            deps(&env, fast.clone(), "drain").await,
            std::future::pending(),
        ),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(first.processed + second.processed, 40);
    let mut all: Vec<i64> = first_seen;
    all.extend(fast.seen.lock().unwrap().iter().map(|s| s.0));
    all.sort_unstable();
    assert_eq!(all, (0..40).collect::<Vec<_>>());
}

fn not_before(at_ms: i64) -> rdkafka::message::OwnedHeaders {
    rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
        key: billing_runtime::NOT_BEFORE,
        value: Some(at_ms.to_string().as_bytes()),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_before_holds_only_on_delayed_topics_and_never_past_their_delay() {
    // Given a record whose not-before header is the end of time
    let env = TestEnv::with_partitions(1).await;
    let topic = env.topic(&USAGE_RECORDS.spec);
    let enc = usage_encoder(&env).await;
    let producer = Producer::new(&env.kafka()).unwrap();
    for n in 0..2 {
        producer
            .send(
                &topic,
                Some(b"1"),
                Some(&enc.encode(&usage(n, 1)).unwrap()),
                Some(not_before(i64::MAX)),
            )
            .await
            .unwrap();
    }

    for (group, delayed) in [
        // When a loop reads it from a topic that is not a delay topic
        ("plain", vec![]),
        // And when a loop reads it from a delay topic whose longest hold is a second
        ("delayed", vec![(topic.clone(), Duration::from_secs(1))]),
    ] {
        let handler = Arc::new(Recorder::default());
        let d = deps(&env, handler.clone(), "test-stage").await;
        let summary = run_bounded(&env, group, &topic, d, delayed).await;

        // Then both records are handled: the header is ignored, or its hold clamped
        assert_eq!(summary.processed, 2, "{group}");
        assert_eq!(handler.seen.lock().unwrap().len(), 2, "{group}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_partitions_moved_away_and_back_mid_run_lose_nothing() {
    // Given a delay topic of four partitions: records due in a few seconds, then records due
    // some seconds later
    let env = TestEnv::with_partitions(4).await;
    let topic = env.topic(&USAGE_RECORDS.spec);
    let enc = usage_encoder(&env).await;
    let producer = Producer::new(&env.kafka()).unwrap();
    let now = chrono::Utc::now().timestamp_millis();
    let records = 40;
    for n in 0..records {
        let due = now + if n < 20 { 4_000 } else { 14_000 };
        producer
            .send(
                &topic,
                Some((n % 20).to_string().as_bytes()),
                Some(&enc.encode(&usage(n, 1)).unwrap()),
                Some(not_before(due)),
            )
            .await
            .unwrap();
    }
    let group = env.group("scale");
    let instance = |handler: Arc<Recorder>, stop: Arc<tokio::sync::Notify>| {
        let (env, topic, group) = (env.clone(), topic.clone(), group.clone());
        tokio::spawn(async move {
            let mut config = LoopConfig::new(group, vec![topic.clone()]);
            config.delayed = [(topic, Duration::from_secs(30))].into_iter().collect();
            run_consumer(
                config,
                deps(&env, handler, "test-stage").await,
                async move { stop.notified().await },
            )
            .await
            .unwrap()
        })
    };
    let wait_until = async |what: &str, secs: u64, done: &dyn Fn() -> bool| {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        while !done() {
            assert!(tokio::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };

    // When one instance holds the first records with its partitions paused, a second one joins
    // the group and takes some of them, handles what falls due there, and leaves again, so its
    // partitions go back to the first instance while their later records are still held
    let (a, b) = (Arc::new(Recorder::default()), Arc::new(Recorder::default()));
    let (stop_a, stop_b) = (
        Arc::new(tokio::sync::Notify::new()),
        Arc::new(tokio::sync::Notify::new()),
    );
    let first = instance(a.clone(), stop_a.clone());
    let held = billing_runtime::metrics::global().gauge(
        "billing_held_partitions",
        "Partitions paused until a delayed record is due.",
        &[("group", &group)],
    );
    wait_until("the first instance never held a record", 30, &|| {
        held.get() > 0
    })
    .await;
    let second = instance(b.clone(), stop_b.clone());
    wait_until("the second instance never handled a record", 60, &|| {
        !b.seen.lock().unwrap().is_empty()
    })
    .await;
    stop_b.notify_waiters();
    second.await.unwrap();

    // Then every record is handled by one instance or the other, and the group's committed
    // offsets reach the end of every partition
    let all: std::collections::BTreeSet<String> = (0..records).map(|n| format!("u{n}")).collect();
    let seen = || -> std::collections::BTreeSet<String> {
        a.seen
            .lock()
            .unwrap()
            .iter()
            .chain(b.seen.lock().unwrap().iter())
            .map(|(_, id)| id.clone())
            .collect()
    };
    wait_until(
        "records never handled after the partitions came back",
        90,
        &|| seen() == all,
    )
    .await;
    stop_a.notify_waiters();
    first.await.unwrap();
    let committed = env.committed(&group, &topic).await;
    let total: i64 = committed.values().sum();
    assert_eq!(total, records, "committed offsets {committed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_of_foreign_recursive_or_zero_width_schemas_are_quarantined() {
    // Given a usage topic holding a good record, then records framed with a schema registered
    // under another subject, with a registered recursive schema (100,000 levels deep), and with
    // an array-of-null schema claiming eight million items, then another good record
    let env = TestEnv::with_partitions(1).await;
    let topic = env.topic(&USAGE_RECORDS.spec);
    let usage_subject = env.catalogue().value_subject(&USAGE_RECORDS.spec);
    let enc = Encoder::<UsageRecord>::register(&env.registry, &usage_subject)
        .await
        .unwrap();
    let hostile_subject = format!("{}hostile-value", env.common.topic_prefix);
    let register = |subject: String, schema: &'static str| {
        let registry = env.registry.clone();
        async move { registry.register(&subject, schema).await.unwrap() }
    };
    let foreign = register(
        format!("{}other-value", env.common.topic_prefix),
        r#"{"type":"record","name":"Other","fields":[{"name":"x","type":"long"}]}"#,
    )
    .await;
    let recursive = register(
        hostile_subject.clone(),
        r#"{"type":"record","name":"Node","fields":[{"name":"next","type":["null","Node"]}]}"#,
    )
    .await;
    let nulls = register(
        format!("{}nulls-value", env.common.topic_prefix),
        r#"{"type":"record","name":"Nulls","fields":[{"name":"a","type":{"type":"array","items":"null"}}]}"#,
    )
    .await;
    let frame = |id: u32, body: &[u8]| {
        let mut v = vec![0u8];
        v.extend_from_slice(&id.to_be_bytes());
        v.extend_from_slice(body);
        v
    };
    let mut deep = vec![2u8; 100_000];
    deep.push(0);
    // zig-zag varint of 8,000,000 items, then the end of the array
    let mut count = Vec::new();
    let mut n: u64 = 8_000_000 << 1;
    while n >= 0x80 {
        count.push(u8::try_from(n & 0x7f).unwrap() | 0x80);
        n >>= 7;
    }
    count.push(u8::try_from(n).unwrap());
    count.push(0);
    let producer = Producer::new(&env.kafka()).unwrap();
    for payload in [
        enc.encode(&usage(0, 1)).unwrap(),
        frame(foreign, &[2]),
        frame(recursive, &deep),
        frame(nulls, &count),
        enc.encode(&usage(4, 1)).unwrap(),
    ] {
        producer
            .send(&topic, Some(b"1"), Some(&payload), None)
            .await
            .unwrap();
    }

    // When a loop reads the topic with a decoder for the usage subject (and, to reach the
    // schema checks, the subjects of the other two)
    let handler = Arc::new(Recorder::default());
    let mut d = deps(&env, handler.clone(), "test-stage").await;
    d.decoder = Arc::new(Decoder::for_subjects(
        env.registry.clone(),
        vec![
            usage_subject,
            hostile_subject,
            format!("{}nulls-value", env.common.topic_prefix),
        ],
    ));
    let summary = run_bounded(&env, "hostile", &topic, d, vec![]).await;

    // Then the good records are handled and each hostile one is quarantined with its reason
    assert_eq!((summary.processed, summary.quarantined), (2, 3));
    let dead = env
        .read(&env.topic(&DEAD_LETTERS.spec), 3, Duration::from_secs(20))
        .await;
    let reasons: Vec<&str> = dead
        .iter()
        .map(|d| d.headers[headers::REASON].as_str())
        .collect();
    for expected in ["is not registered under", "contains itself", "zero-width"] {
        assert_eq!(
            reasons.iter().filter(|r| r.contains(expected)).count(),
            1,
            "{expected}: {reasons:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_too_large_for_the_topic_is_written_without_its_payload() {
    // Given a record of almost a megabyte that does not decode: its dead letter, with the
    // payload inside, would exceed the broker's message size
    let env = TestEnv::with_partitions(1).await;
    let topic = env.topic(&USAGE_RECORDS.spec);
    let producer = Producer::new(&env.kafka()).unwrap();
    let big = vec![1u8; 999_900];
    producer
        .send(&topic, Some(b"1"), Some(&big), None)
        .await
        .unwrap();

    // When the loop reads it
    let d = deps(&env, Arc::new(Recorder::default()), "test-stage").await;
    let summary = run_bounded(&env, "big", &topic, d, vec![]).await;

    // Then it is quarantined: the letter names the source record and says the payload was
    // left out, and the offset moves on
    assert_eq!(summary.quarantined, 1);
    let dead = env
        .read(&env.topic(&DEAD_LETTERS.spec), 1, Duration::from_secs(20))
        .await;
    let reason = &dead[0].headers[headers::REASON];
    assert!(
        reason.contains("payload of 999900 bytes left out"),
        "{reason}"
    );
    assert_eq!(dead[0].headers[headers::SOURCE_OFFSET], "0");
}

/// Passes records below `open_below` at once; holds the others until `open` turns true.
struct Gate {
    open_below: i64,
    open: tokio::sync::watch::Receiver<bool>,
}

impl Handler<UsageRecord> for Gate {
    async fn handle(&self, r: &Incoming<UsageRecord>) -> Result<(), HandleError> {
        if r.offset >= self.open_below {
            let mut open = self.open.clone();
            let _ = open.wait_for(|o| *o).await;
        }
        Ok(())
    }
}

/// The loop's `billing_consumer_lag` for `group` and partition 0, if reported.
fn reported_lag(group: &str) -> Option<i64> {
    let text = billing_runtime::metrics::global().render();
    text.lines()
        .filter(|l| l.starts_with("billing_consumer_lag{"))
        .find(|l| l.contains(&format!("group=\"{group}\"")) && l.contains("partition=\"0\""))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_is_reported_while_records_wait() {
    // Given ten records, of which the loop may finish only the first four
    let env = TestEnv::with_partitions(1).await;
    let topic = env.topic(&USAGE_RECORDS.spec);
    publish_usage(&env, &topic, 10).await;
    let (open, gate) = tokio::sync::watch::channel(false);
    let handler = Arc::new(Gate {
        open_below: 4,
        open: gate,
    });
    let group = env.group("lag");
    let config = LoopConfig::new(group.clone(), vec![topic]);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(run_consumer(
        config,
        deps(&env, handler, "lag").await,
        async {
            let _ = stopped.await;
        },
    ));

    // When the loop has run for a while with six records unfinished
    let mut lag = None;
    for _ in 0..60 {
        lag = reported_lag(&group);
        if lag == Some(6) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Then its lag is the six records behind the partition's end (from librdkafka's
    // statistics: the stored offset 4 against the high watermark 10)
    assert_eq!(lag, Some(6));
    open.send(true).unwrap();
    stop.send(()).unwrap();
    let summary = finished(run, 30).await;
    assert_eq!(summary.processed, 10);
}

/// Holds every record until `open` turns true, counting how many are inside at once.
struct Counted {
    inside: std::sync::atomic::AtomicUsize,
    most: std::sync::atomic::AtomicUsize,
    open: tokio::sync::watch::Receiver<bool>,
}

impl Handler<UsageRecord> for Counted {
    async fn handle(&self, _: &Incoming<UsageRecord>) -> Result<(), HandleError> {
        use std::sync::atomic::Ordering::SeqCst;
        let now = self.inside.fetch_add(1, SeqCst) + 1;
        self.most.fetch_max(now, SeqCst);
        let mut open = self.open.clone();
        let _ = open.wait_for(|o| *o).await;
        self.inside.fetch_sub(1, SeqCst);
        Ok(())
    }
}

/// Publishes ten usage records of about 10 kB each (a long usage id) to `topic`.
async fn publish_large_usage(env: &TestEnv, topic: &str) {
    publish_usage_as(env, topic, 10, |n| UsageRecord {
        usage_id: format!("u{n}-{}", "x".repeat(10_000)),
        ..usage(n, 1)
    })
    .await;
}

/// Runs a bounded loop over `topic` whose records stay inside the handler until `open` turns
/// true, `budget` bytes in flight; returns how many were inside at once after two seconds,
/// and the loop's summary once opened.
async fn in_flight_under_budget(
    env: &TestEnv,
    topic: &str,
    budget: usize,
) -> (usize, billing_runtime::LoopSummary) {
    let (open, gate) = tokio::sync::watch::channel(false);
    let handler = Arc::new(Counted {
        inside: 0.into(),
        most: 0.into(),
        open: gate,
    });
    let mut config = LoopConfig::new(env.group(&format!("budget{budget}")), vec![topic.into()]);
    config.bounded = true;
    config.max_in_flight = 100;
    config.max_in_flight_bytes = budget;
    let deps = deps(env, handler.clone(), "budget").await;
    let run = tokio::spawn(run_consumer(config, deps, std::future::pending()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let inside = handler.inside.load(std::sync::atomic::Ordering::SeqCst);
    open.send(true).unwrap();
    let summary = finished(run, 60).await;
    (inside, summary)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_in_flight_stay_within_their_byte_budget() {
    // Given ten records of about 10 kB on one partition, and room for 100 records in flight
    let env = TestEnv::with_partitions(1).await;
    let topic = env.topic(&USAGE_RECORDS.spec);
    publish_large_usage(&env, &topic).await;

    // When the loop may hold 25,000 bytes of records in flight
    let (inside, summary) = in_flight_under_budget(&env, &topic, 25_000).await;

    // Then it takes records while it is under the budget (the third crosses it) and no more,
    // and every record is processed once the handler lets them go
    assert_eq!(inside, 3);
    assert_eq!(summary.processed, 10);

    // And a budget smaller than one record still lets records through, one at a time
    let (inside, summary) = in_flight_under_budget(&env, &topic, 1_000).await;
    assert_eq!(inside, 1);
    assert_eq!(summary.processed, 10);
}
