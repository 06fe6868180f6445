//! The messaging platform over the real broker, registry and PostgreSQL: email, retries with
//! backoff, SMS fallback, dead letters, quiet hours at send time, templates, and a processor
//! killed mid-batch. Gateways are test doubles that record what would have been sent, or the
//! simulated provider with its PostgreSQL mailbox.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use billing_messaging::{ChannelConfig, Mail, MailGateway, SendError, Sms, SmsGateway};
use billing_runtime::{CommonArgs, Producer};
use billing_schema::{EmailRequest, Encoder, catalogue::EMAIL_REQUESTS};
use billing_testkit::count;
use chrono::Utc;
use diesel_async::SimpleAsyncConnection;

/// What a gateway double was asked to send.
#[derive(Debug, Clone)]
struct Sent {
    channel: &'static str,
    key: String,
    to: String,
    body: String,
    started: Instant,
    ok: bool,
}

/// A gateway that fails the next sends to an address as scripted, and records every send.
#[derive(Debug, Clone, Default)]
struct Scripted {
    log: Arc<Mutex<Vec<Sent>>>,
    script: Arc<Mutex<HashMap<String, VecDeque<SendError>>>>,
}

impl Scripted {
    fn fail(&self, to: &str, errors: Vec<SendError>) {
        self.script.lock().unwrap().insert(to.into(), errors.into());
    }

    async fn submit(
        &self,
        channel: &'static str,
        key: &str,
        to: &str,
        body: &str,
    ) -> Result<(), SendError> {
        let started = Instant::now();
        tokio::time::sleep(Duration::from_millis(30)).await;
        let outcome = self
            .script
            .lock()
            .unwrap()
            .get_mut(to)
            .and_then(VecDeque::pop_front);
        self.log.lock().unwrap().push(Sent {
            channel,
            key: key.into(),
            to: to.into(),
            body: body.into(),
            started,
            ok: outcome.is_none(),
        });
        outcome.map_or(Ok(()), Err)
    }

    fn sends(&self, channel: &str, to: &str) -> Vec<Sent> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.channel == channel && s.to == to)
            .cloned()
            .collect()
    }
}

impl MailGateway for Scripted {
    async fn send(&self, m: &Mail) -> Result<(), SendError> {
        self.submit("email", &m.idempotency_key, &m.to, &m.html)
            .await
    }
}

impl SmsGateway for Scripted {
    async fn send(&self, m: &Sms) -> Result<(), SendError> {
        self.submit("sms", &m.idempotency_key, &m.to, &m.text).await
    }
}

/// The email, SMS and dead-letter processors on the scripted gateway.
async fn start(
    common: &CommonArgs,
    gateway: &Scripted,
    cfg: &ChannelConfig,
) -> (
    tokio::sync::watch::Sender<bool>,
    Vec<tokio::task::JoinHandle<()>>,
) {
    common::start(common, gateway.clone(), gateway.clone(), cfg).await
}

fn transient() -> SendError {
    SendError::Transient("gateway unavailable".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bill_ends_sent_by_email_or_sms_or_dead_once() {
    // Given bills whose email and SMS gateways fail as scripted (3 attempts, 300 ms backoff)
    let (env, common) = setup().await;
    bills(
        &common,
        &[1, 2, 3, 4, 5, 6, 7],
        &[(6, "<script>alert('x')</script>")],
        &[(4, "m4@bounce.invalid")],
    )
    .await;
    let gateway = Scripted::default();
    gateway.fail(&email(2), vec![transient()]);
    gateway.fail(&email(3), vec![transient(), transient(), transient()]);
    gateway.fail(
        "m4@bounce.invalid",
        vec![SendError::Permanent("no such domain".into())],
    );
    gateway.fail(&email(5), vec![transient(), transient(), transient()]);
    gateway.fail(&phone(5), vec![transient(), transient(), transient()]);

    // When dispatch's requests arrive (member 7's twice, and one for a bill that does not exist)
    let mut ids: Vec<i64> = (1..=7).map(bill_id).collect();
    ids.push(bill_id(7));
    ids.push(bill_id(999));
    request(&common, &env, &ids).await;
    let (s, tasks) = start(&common, &gateway, &config(3, 300)).await;
    let url = common.database_url.clone();
    wait_for(
        &url,
        "select count(*)::bigint as n from delivery where status in ('sent', 'dead')",
        7,
        Duration::from_secs(60),
    )
    .await;
    wait_for(
        &url,
        "select count(*)::bigint as n from dead_letter",
        2,
        Duration::from_secs(30),
    )
    .await;

    // Then each bill ends in exactly one of sent-by-email, sent-by-SMS, or dead
    let row = |b: i64, c: &str, s: &str, a: i32| DeliveryRow {
        bill_id: bill_id(b),
        channel: c.into(),
        status: s.into(),
        attempts: a,
    };
    assert_eq!(
        deliveries(&url).await,
        vec![
            row(1, "email", "sent", 1),
            row(2, "email", "sent", 2),
            row(3, "email", "failed", 3),
            row(3, "sms", "sent", 1),
            row(4, "email", "failed", 1),
            row(4, "sms", "sent", 1),
            row(5, "email", "failed", 3),
            row(5, "sms", "dead", 3),
            row(6, "email", "sent", 1),
            row(7, "email", "sent", 1),
        ]
    );
    // And retries kept the configured backoff (300 ms, then 600 ms), less at most a quarter of
    // it (the jitter that spreads an outage's retries)
    let tries = gateway.sends("email", &email(3));
    assert_eq!(tries.len(), 3);
    assert!(tries[1].started - tries[0].started >= Duration::from_millis(225));
    assert!(tries[2].started - tries[1].started >= Duration::from_millis(450));
    assert!(
        gateway.sends("email", &email(2))[1].started - gateway.sends("email", &email(2))[0].started
            >= Duration::from_millis(225)
    );
    // And a permanent failure went straight to SMS
    assert_eq!(gateway.sends("email", "m4@bounce.invalid").len(), 1);
    assert_eq!(gateway.sends("sms", &phone(4)).len(), 1);
    // And the duplicate request sent nothing twice
    let key = format!("email-{}", bill_id(7));
    assert_eq!(
        gateway
            .sends("email", &email(7))
            .iter()
            .filter(|s| s.ok && s.key == key)
            .count(),
        1
    );
    // And the member's name is inert in the HTML
    let html = &gateway.sends("email", &email(6))[0].body;
    assert!(
        html.contains("&lt;script&gt;alert('x')&lt;/script&gt;"),
        "{html}"
    );
    assert!(!html.contains("<script>"));
    // And the SMS is the short summary
    assert!(gateway.sends("sms", &phone(3))[0].body.contains("55,000원"));
    // And the dead letters name the undeliverable bill with its history, and the unknown bill
    let letters = billing_ops::dlq::list(
        &common,
        &billing_ops::dlq::Filter {
            limit: 10,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let dead = letters
        .iter()
        .find(|l| l.stage == "undeliverable")
        .expect("undeliverable letter");
    assert!(
        dead.reason.contains(&bill_id(5).to_string()),
        "{}",
        dead.reason
    );
    assert_eq!(
        dead.attempts.as_array().unwrap().len(),
        3,
        "{:?}",
        dead.attempts
    );
    let unknown = letters
        .iter()
        .find(|l| l.stage == "email")
        .expect("quarantined request");
    assert!(unknown.reason.contains("not found"), "{}", unknown.reason);

    // When the operator replays the undeliverable bill's letter and the SMS gateway works again
    let replayed = billing_ops::dlq::replay(&common, &[dead.id], 10)
        .await
        .unwrap();
    assert_eq!(replayed, vec![dead.id]);
    wait_for(&url, &format!("select count(*)::bigint as n from delivery where bill_id = {} and channel = 'sms' and status = 'sent'", bill_id(5)), 1, Duration::from_secs(30)).await;
    stop(s, tasks).await;
    // Then it is delivered by SMS, and the letter is marked replayed
    let after = billing_ops::dlq::list(
        &common,
        &billing_ops::dlq::Filter {
            stage: Some("undeliverable".into()),
            include_replayed: true,
            limit: 10,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(after[0].replayed_at.is_some());
    assert_eq!(
        count(
            &url,
            "select count(*)::bigint as n from delivery where status = 'sent'"
        )
        .await,
        7
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_due_in_quiet_hours_waits_for_their_end() {
    // Given a bill whose first email attempt fails (retry after 1 s)
    let (env, common) = setup().await;
    bills(&common, &[1], &[], &[]).await;
    let gateway = Scripted::default();
    gateway.fail(&email(1), vec![transient()]);
    request(&common, &env, &[bill_id(1)]).await;
    let (s, tasks) = start(&common, &gateway, &config(3, 1000)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while gateway.sends("email", &email(1)).is_empty() {
        assert!(Instant::now() < deadline, "no first attempt");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // When the operator sets quiet hours from now to 4 s from now, before the retry is due
    let now = common.clock.now().with_timezone(&chrono_tz::Asia::Seoul);
    let end = now + chrono::Duration::seconds(4);
    let mut conn = billing_db::connect(&common.database_url).await.unwrap();
    conn.batch_execute(&format!(
        "update quiet_hours set start_time = '{}', end_time = '{}' where id = 1",
        (now - chrono::Duration::seconds(1)).format("%H:%M:%S%.3f"),
        end.format("%H:%M:%S%.3f")
    ))
    .await
    .unwrap();
    let quiet_ends = Instant::now() + Duration::from_secs(4);
    wait_for(
        &common.database_url,
        "select count(*)::bigint as n from delivery where status = 'sent'",
        1,
        Duration::from_secs(30),
    )
    .await;
    stop(s, tasks).await;

    // Then the retry went out only after the quiet hours ended
    let tries = gateway.sends("email", &email(1));
    assert_eq!(tries.len(), 2);
    assert!(
        tries[1].started + Duration::from_millis(200) >= quiet_ends,
        "sent {:?} before the end",
        quiet_ends - tries[1].started
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_are_checked_at_activation() {
    let (_env, common) = setup().await;
    bills(&common, &[1], &[(1, "<b>Kim</b>")], &[]).await;
    // Given a new email version that forgets the amount
    let broken = billing_ops::templates::create(
        &common,
        "email",
        "monthly-bill",
        Some("{{billing_month}}"),
        "{{member_name}}님, {{billing_month}} 청구서입니다.",
    )
    .await
    .unwrap();
    assert_eq!(broken.version, 2);
    // When it is activated, then it is refused, and version 1 stays active
    let refused = billing_ops::templates::activate(&common, broken.id)
        .await
        .unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("missing required placeholder {{final_amount}}"),
        "{refused}"
    );
    let active: Vec<_> = billing_ops::templates::list(&common)
        .await
        .unwrap()
        .into_iter()
        .filter(|t| t.active && t.channel == "email")
        .collect();
    assert_eq!(active.len(), 1);
    assert_eq!(active[0].version, 1);
    // When a correct version is activated and previewed with a real bill
    let good = billing_ops::templates::create(
        &common,
        "email",
        "monthly-bill",
        Some("{{billing_month}} 청구서"),
        "{{member_name}}님\n\n금액: {{final_amount}}",
    )
    .await
    .unwrap();
    let activated = billing_ops::templates::activate(&common, good.id)
        .await
        .unwrap();
    assert!(activated.active);
    let (subject, html) = billing_ops::templates::preview(&common, good.id, None)
        .await
        .unwrap();
    // Then it is the only active one, and its preview is the bill, escaped
    assert_eq!(subject.as_deref(), Some("2026-11 청구서"));
    assert!(
        html.contains("&lt;b&gt;Kim&lt;/b&gt;님") && html.contains("금액: 55,000원"),
        "{html}"
    );
    let active: Vec<_> = billing_ops::templates::list(&common)
        .await
        .unwrap()
        .into_iter()
        .filter(|t| t.active && t.channel == "email")
        .collect();
    assert_eq!(
        active.iter().map(|t| t.version).collect::<Vec<_>>(),
        vec![3]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_processor_killed_mid_batch_sends_nothing_twice() {
    // Given 2,000 requests and the email binary sending through the simulated provider (1 s
    // latency, no failures) with its mailbox in PostgreSQL
    let (env, common) = setup().await;
    let mut conn = billing_db::connect(&common.database_url).await.unwrap();
    conn.batch_execute(
        "insert into member select g, 'm' || g, 'm' || g || '@example.kr', '+8210' || lpad(g::text, 8, '0'), 1, null, null, 'plan-5g-slim', now() from generate_series(1, 2000) g;
         insert into bill (id, member_id, billing_month, total_amount, discount_amount, vat_amount, final_amount, settled_at)
         select 2026110000000000 + g, g, '2026-11', 50000, 0, 5000, 55000, '2026-11-30T15:00:00Z' from generate_series(1, 2000) g;",
    )
    .await
    .unwrap();
    let ids: Vec<i64> = (1..=2000).map(bill_id).collect();
    request(&common, &env, &ids).await;
    let spawn = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_email"))
            .env("DATABASE_URL", &common.database_url)
            .env("KAFKA_BROKERS", &common.kafka_brokers)
            .env("SCHEMA_REGISTRY_URL", &common.schema_registry_url)
            .env("BILLING_TOPIC_PREFIX", &common.topic_prefix)
            .env("BILLING_PARTITIONS", common.partitions.to_string())
            .env("BILLING_CLOCK", common.clock.to_string())
            .env("GATEWAY_LATENCY_MS", "1000")
            .env("GATEWAY_FAILURE_RATE", "0")
            .env("GATEWAY_MAILBOX", "postgres")
            .env("EMAIL_MAX_IN_FLIGHT", "500")
            .env("EMAIL_CLAIM_LEASE_MS", "5000")
            .env("METRICS_ADDR", "127.0.0.1:0")
            .spawn()
            .unwrap()
    };
    let url = common.database_url.clone();

    // When it is killed (SIGKILL) with sends in flight, and started again
    let mut first = spawn();
    wait_for(
        &url,
        "select count(*)::bigint as n from gateway_mailbox",
        300,
        Duration::from_secs(60),
    )
    .await;
    first.kill().unwrap();
    first.wait().unwrap();
    let at_kill = count(
        &url,
        "select count(*)::bigint as n from delivery where status = 'sent'",
    )
    .await;
    let mut second = spawn();
    wait_for(
        &url,
        "select count(*)::bigint as n from delivery where status = 'sent'",
        2000,
        Duration::from_secs(120),
    )
    .await;
    second.kill().unwrap();
    second.wait().unwrap();

    // Then every bill was delivered once: one accepted message per bill, one `sent` row per bill
    assert!(at_kill < 2000, "killed after everything was sent");
    assert_eq!(
        count(&url, "select count(*)::bigint as n from gateway_mailbox").await,
        2000
    );
    assert_eq!(
        count(
            &url,
            "select count(distinct bill_id)::bigint as n from delivery where status = 'sent'"
        )
        .await,
        2000
    );
    // And what the killed process had in flight was resubmitted under the same idempotency key,
    // at most the in-flight cap of it
    let resubmitted = count(
        &url,
        "select coalesce(sum(resubmissions), 0)::bigint as n from gateway_mailbox",
    )
    .await;
    assert!(resubmitted <= 500, "{resubmitted} resubmissions");
    println!(
        "killed with {at_kill} recorded sent; {resubmitted} sends resubmitted and de-duplicated by key"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_the_email_topic_sends_nothing_twice() {
    // Given three bills delivered by email
    let (env, common) = setup().await;
    bills(&common, &[1, 2, 3], &[], &[]).await;
    let gateway = Scripted::default();
    request(&common, &env, &[bill_id(1), bill_id(2), bill_id(3)]).await;
    let url = common.database_url.clone();
    let (s, tasks) = start(&common, &gateway, &config(3, 300)).await;
    wait_for(
        &url,
        "select count(*)::bigint as n from delivery where status = 'sent'",
        3,
        Duration::from_secs(30),
    )
    .await;
    stop(s, tasks).await;
    let before = deliveries(&url).await;

    // When the operator replays the email topic from the beginning for the email group
    let group = format!("{}email", common.topic_prefix);
    let topic = env.topic(&EMAIL_REQUESTS.spec);
    let dry = billing_ops::replay::replay(
        &common,
        &group,
        &topic,
        billing_ops::replay::Target::Earliest,
        true,
    )
    .await
    .unwrap();
    assert_eq!(
        dry.moves.iter().map(|m| m.from.unwrap_or(0)).sum::<i64>(),
        3,
        "{dry:?}"
    );
    billing_ops::replay::replay(
        &common,
        &group,
        &topic,
        billing_ops::replay::Target::Earliest,
        false,
    )
    .await
    .unwrap();
    assert_eq!(env.committed(&group, &topic).await.values().sum::<i64>(), 0);
    // and the processors run again until the group is back at the end
    let (s, tasks) = start(&common, &gateway, &config(3, 300)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while env.committed(&group, &topic).await.values().sum::<i64>() < 3 {
        assert!(Instant::now() < deadline, "the replay did not finish");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop(s, tasks).await;

    // Then every request was read again and nothing was sent twice or changed
    assert_eq!(gateway.log.lock().unwrap().len(), 3);
    assert_eq!(deliveries(&url).await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_requests_neither_borrow_another_bills_key_nor_stall_the_topic() {
    // Given two members' bills, and a forged request for bill 1 that names bill 2's delivery
    // id and carries a not-before at the end of time, ahead of the real requests
    let (env, common) = setup().await;
    bills(&common, &[1, 2], &[], &[]).await;
    let encoder = Encoder::<EmailRequest>::register(
        &env.registry,
        &common.catalogue().value_subject(&EMAIL_REQUESTS.spec),
    )
    .await
    .unwrap();
    let forged = EmailRequest {
        delivery_id: format!("email-{}", bill_id(2)),
        bill_id: bill_id(1),
        member_id: 1,
        billing_month: "2026-11".into(),
        attempt: 0,
        requested_at: Utc::now().timestamp_millis(),
        not_before: None,
        last_error: None,
    };
    let forever = rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
        key: billing_runtime::NOT_BEFORE,
        value: Some(i64::MAX.to_string().as_bytes()),
    });
    Producer::new(&common.kafka())
        .unwrap()
        .send(
            &env.topic(&EMAIL_REQUESTS.spec),
            Some(b"1"),
            Some(&encoder.encode(&forged).unwrap()),
            Some(forever),
        )
        .await
        .unwrap();
    request(&common, &env, &[bill_id(2)]).await;

    // When the channels run
    let gateway = Scripted::default();
    let (s, tasks) = start(&common, &gateway, &config(3, 50)).await;
    let url = common.database_url.clone();
    wait_for(
        &url,
        "select count(*)::bigint as n from delivery where status = 'sent'",
        2,
        Duration::from_secs(30),
    )
    .await;
    stop(s, tasks).await;

    // Then each bill went out once under its own key: the forged header held nothing, and the
    // forged delivery id did not take bill 2's key
    let one = gateway.sends("email", &email(1));
    let two = gateway.sends("email", &email(2));
    assert_eq!((one.len(), two.len()), (1, 1));
    assert_eq!(one[0].key, format!("email-{}", bill_id(1)));
    assert_eq!(two[0].key, format!("email-{}", bill_id(2)));
}
