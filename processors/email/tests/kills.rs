//! Two instances of every messaging processor in one group, killed (SIGKILL) and restarted
//! throughout a delivery run at 50 % gateway failures, over the real broker, registry and
//! PostgreSQL. The history must be exactly what the same run without kills gives.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::BTreeMap,
    process::{Child, Command},
    time::{Duration, Instant},
};

use billing_messaging::{SimulatedGateway, SimulationArgs};
use billing_runtime::{Clock, Producer};
use billing_schema::{EmailRequest, Encoder, catalogue::EMAIL_REQUESTS};
use billing_testkit::{TestEnv, count};
use chrono::Utc;
use diesel::{
    QueryableByName,
    sql_types::{BigInt, Int4, Text},
};
use diesel_async::{RunQueryDsl, SimpleAsyncConnection};

const BILLS: i64 = 400;
const ATTEMPTS: i32 = 3;
const FAILURE_RATE: f64 = 0.5;
const SEED: u64 = 11;

fn bill_id(member: i64) -> i64 {
    2_026_110_000_000_000 + member
}

#[derive(QueryableByName)]
struct Row {
    #[diesel(sql_type = BigInt)]
    bill_id: i64,
    #[diesel(sql_type = Text)]
    channel: String,
    #[diesel(sql_type = Text)]
    status: String,
    #[diesel(sql_type = Int4)]
    attempts: i32,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_killed_and_restarted_throughout_change_no_bills_history() {
    // Given bills (every 50th member's address undeliverable) and their email requests
    let env = TestEnv::new().await;
    let mut common = env.common.clone();
    common.database_url = env.database().await;
    common.clock = Clock::simulated(billing_testkit::kst("2026-12-01T12:00:00"), 1.0);
    let url = common.database_url.clone();
    let mut conn = billing_db::connect(&url).await.unwrap();
    conn.batch_execute(&format!(
        "insert into member select g, 'm' || g, 'm' || g || case when g % 50 = 0 then '@bounce.invalid' else '@example.kr' end,
                '+8210' || lpad(g::text, 8, '0'), 1, null, null, 'plan-5g-slim', now() from generate_series(1, {BILLS}) g;
         insert into bill (id, member_id, billing_month, total_amount, discount_amount, vat_amount, final_amount, settled_at)
         select 2026110000000000 + g, g, '2026-11', 50000, 0, 5000, 55000, '2026-11-30T15:00:00Z' from generate_series(1, {BILLS}) g;"
    ))
    .await
    .unwrap();
    let encoder = Encoder::<EmailRequest>::register(
        &env.registry,
        &common.catalogue().value_subject(&EMAIL_REQUESTS.spec),
    )
    .await
    .unwrap();
    let producer = Producer::new(&common.kafka()).unwrap();
    for m in 1..=BILLS {
        let r = EmailRequest {
            delivery_id: format!("email-{}", bill_id(m)),
            bill_id: bill_id(m),
            member_id: m,
            billing_month: "2026-11".into(),
            attempt: 0,
            requested_at: Utc::now().timestamp_millis(),
            not_before: None,
            last_error: None,
        };
        let key = m.to_string();
        producer
            .send(
                &env.topic(&EMAIL_REQUESTS.spec),
                Some(key.as_bytes()),
                Some(&encoder.encode(&r).unwrap()),
                None,
            )
            .await
            .unwrap();
    }

    // When two email, two sms and two dlq processes run in their groups, and one of them is
    // killed and started again every 1.5 s for 40 s
    let bin = |name: &str| std::path::Path::new(env!("CARGO_BIN_EXE_email")).with_file_name(name);
    let spawn = |name: &str| -> Child {
        Command::new(bin(name))
            .env("DATABASE_URL", &url)
            .env("KAFKA_BROKERS", &common.kafka_brokers)
            .env("SCHEMA_REGISTRY_URL", &common.schema_registry_url)
            .env("BILLING_TOPIC_PREFIX", &common.topic_prefix)
            .env("BILLING_PARTITIONS", common.partitions.to_string())
            .env("BILLING_CLOCK", common.clock.to_string())
            .env(
                "KAFKA_PROPERTIES",
                "session.timeout.ms=6000,heartbeat.interval.ms=1000",
            )
            .env("GATEWAY_LATENCY_MS", "500")
            .env("EMAIL_MAX_IN_FLIGHT", "10")
            .env("SMS_MAX_IN_FLIGHT", "10")
            .env("GATEWAY_FAILURE_RATE", FAILURE_RATE.to_string())
            .env("GATEWAY_SEED", SEED.to_string())
            .env("GATEWAY_MAILBOX", "postgres")
            .env("EMAIL_ATTEMPTS", ATTEMPTS.to_string())
            .env("SMS_ATTEMPTS", ATTEMPTS.to_string())
            .env("EMAIL_BACKOFF_MS", "300")
            .env("SMS_BACKOFF_MS", "300")
            .env("EMAIL_CLAIM_LEASE_MS", "2000")
            .env("SMS_CLAIM_LEASE_MS", "2000")
            .env("METRICS_ADDR", "127.0.0.1:0")
            .env("RUST_LOG", "error")
            .spawn()
            .unwrap()
    };
    let names = ["email", "email", "sms", "sms", "dlq", "dlq"];
    let mut procs: Vec<Child> = names.iter().map(|n| spawn(n)).collect();
    let mut kills = 0u32;
    let started = Instant::now();
    let mut pick: u64 = SEED;
    while started.elapsed() < Duration::from_secs(40) {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        pick = pick
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let i = usize::try_from(pick >> 33).unwrap() % procs.len();
        procs[i].kill().unwrap();
        procs[i].wait().unwrap();
        procs[i] = spawn(names[i]);
        kills += 1;
    }
    let finished = "select count(distinct bill_id)::bigint as n from delivery where status in ('sent', 'dead')";
    let deadline = Instant::now() + Duration::from_secs(180);
    while count(&url, finished).await < BILLS {
        assert!(
            Instant::now() < deadline,
            "{} of {BILLS} bills finished",
            count(&url, finished).await
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let dead = "select count(*)::bigint as n from delivery where status = 'dead'";
    let letters = "select count(*)::bigint as n from dead_letter where stage = 'undeliverable'";
    let deadline = Instant::now() + Duration::from_secs(60);
    while count(&url, letters).await < count(&url, dead).await {
        assert!(
            Instant::now() < deadline,
            "undeliverable letters never recorded"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    for p in &mut procs {
        p.kill().unwrap();
        p.wait().unwrap();
    }

    // Then every bill's history is the one the run without kills gives
    let gateway = SimulatedGateway::new(
        "email",
        &SimulationArgs {
            latency_ms: 0,
            failure_rate: FAILURE_RATE,
            seed: SEED,
            mailbox: "memory".into(),
        },
        None,
    )
    .unwrap();
    let rows: Vec<Row> = diesel::sql_query(
        "select bill_id, channel, status, attempts from delivery order by bill_id, channel",
    )
    .load(&mut conn)
    .await
    .unwrap();
    let mut actual: BTreeMap<i64, Vec<(String, String, i32)>> = BTreeMap::new();
    for r in rows {
        actual
            .entry(r.bill_id)
            .or_default()
            .push((r.channel, r.status, r.attempts));
    }
    let expect: BTreeMap<i64, Vec<(String, String, i32)>> = (1..=BILLS)
        .map(|m| {
            (
                bill_id(m),
                gateway.calm_history(bill_id(m), m % 50 == 0, ATTEMPTS),
            )
        })
        .collect();
    assert_eq!(actual, expect);

    // And each bill was accepted by the provider once, on one channel: counted at the gateway
    let accepted = "select count(*)::bigint as n from gateway_mailbox";
    let sent = "select count(*)::bigint as n from delivery where status = 'sent'";
    assert_eq!(count(&url, accepted).await, count(&url, sent).await);
    assert_eq!(
        count(&url, "select count(*)::bigint as n from (select split_part(idempotency_key, '-', 2) from gateway_mailbox group by 1 having count(*) > 1) t").await,
        0
    );
    // And exactly one undeliverable letter per dead bill, and every SMS after a recorded give-up
    assert_eq!(count(&url, letters).await, count(&url, dead).await);
    assert_eq!(
        count(&url, "select count(*)::bigint as n from delivery s where s.channel = 'sms' and not exists
                     (select 1 from delivery e where e.bill_id = s.bill_id and e.channel = 'email' and e.status = 'failed' and e.handover = 'give-up')").await,
        0
    );
    let resubmitted = count(
        &url,
        "select coalesce(sum(resubmissions), 0)::bigint as n from gateway_mailbox",
    )
    .await;
    println!(
        "{kills} kills; {BILLS} bills: {} sent, {} dead; {resubmitted} submissions after the provider had accepted (de-duplicated by key)",
        count(&url, sent).await,
        count(&url, dead).await
    );
}
