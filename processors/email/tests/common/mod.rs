//! Shared by the channel tests: bills in PostgreSQL, email requests on the topic, the
//! channel processors in this process, and waits on the database.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use billing_email::EmailChannel;
use billing_messaging::{ChannelConfig, ChannelDeps, MailGateway, SmsGateway};
use billing_runtime::{Backoff, Clock, CommonArgs, Producer};
use billing_schema::{EmailRequest, Encoder, catalogue::EMAIL_REQUESTS};
use billing_sms::SmsChannel;
use billing_testkit::{TestEnv, count, kst};
use chrono::Utc;
use diesel::{
    QueryableByName,
    sql_types::{BigInt, Int4, Text},
};
use diesel_async::{RunQueryDsl, SimpleAsyncConnection};

pub fn bill_id(member: i64) -> i64 {
    2_026_110_000_000_000 + member
}

pub fn email(member: i64) -> String {
    format!("m{member}@example.kr")
}

pub fn phone(member: i64) -> String {
    format!("+8210{member:08}")
}

/// A test environment at noon (outside the default quiet hours) on a clock running at real
/// speed, with its own schema.
pub async fn setup() -> (TestEnv, CommonArgs) {
    let env = TestEnv::new().await;
    let mut common = env.common.clone();
    common.database_url = env.database().await;
    common.clock = Clock::simulated(kst("2026-12-01T12:00:00"), 1.0);
    (env, common)
}

/// Members with November bills; `names` overrides a member's name, `emails` its address.
pub async fn bills(
    common: &CommonArgs,
    members: &[i64],
    names: &[(i64, &str)],
    emails: &[(i64, &str)],
) {
    let mut conn = billing_db::connect(&common.database_url).await.unwrap();
    let mut sql = String::new();
    for &id in members {
        let name = names
            .iter()
            .find(|n| n.0 == id)
            .map_or(format!("m{id}"), |n| n.1.replace('\'', "''"));
        let mail = emails
            .iter()
            .find(|e| e.0 == id)
            .map_or(email(id), |e| e.1.to_string());
        sql += &format!(
            "insert into member values ({id}, '{name}', '{mail}', '{p}', 1, null, null, 'plan-5g-slim', now());
             insert into bill (id, member_id, billing_month, total_amount, discount_amount, vat_amount, final_amount, settled_at)
             values ({b}, {id}, '2026-11', 50000, 0, 5000, 55000, '2026-11-30T15:00:00Z');
             insert into bill_item (id, bill_id, kind, product_id, description, quantity, amount, snapshot)
             values ({b}01, {b}, 'charge', 'plan-5g-slim', '5G 슬림', 1, 50000, '{{}}');",
            p = phone(id),
            b = bill_id(id)
        );
    }
    conn.batch_execute(&sql).await.unwrap();
}

/// Email requests for `bill_ids`, as dispatch would publish them.
pub async fn request(common: &CommonArgs, env: &TestEnv, bill_ids: &[i64]) {
    let encoder = Encoder::<EmailRequest>::register(
        &env.registry,
        &common.catalogue().value_subject(&EMAIL_REQUESTS.spec),
    )
    .await
    .unwrap();
    let producer = Producer::new(&common.kafka()).unwrap();
    let topic = env.topic(&EMAIL_REQUESTS.spec);
    for &b in bill_ids {
        let member = b - 2_026_110_000_000_000;
        let r = EmailRequest {
            delivery_id: format!("email-{b}"),
            bill_id: b,
            member_id: member,
            billing_month: "2026-11".into(),
            attempt: 0,
            requested_at: Utc::now().timestamp_millis(),
            not_before: None,
            last_error: None,
        };
        producer
            .send(
                &topic,
                Some(member.to_string().as_bytes()),
                Some(&encoder.encode(&r).unwrap()),
                None,
            )
            .await
            .unwrap();
    }
}

#[derive(Debug, QueryableByName, PartialEq, Eq, PartialOrd, Ord, Clone)]
pub struct DeliveryRow {
    #[diesel(sql_type = BigInt)]
    pub bill_id: i64,
    #[diesel(sql_type = Text)]
    pub channel: String,
    #[diesel(sql_type = Text)]
    pub status: String,
    #[diesel(sql_type = Int4)]
    pub attempts: i32,
}

pub async fn deliveries(url: &str) -> Vec<DeliveryRow> {
    let mut conn = billing_db::connect(url).await.unwrap();
    diesel::sql_query(
        "select bill_id, channel, status, attempts from delivery order by bill_id, channel",
    )
    .load(&mut conn)
    .await
    .unwrap()
}

/// Waits until `sql` (a `count(*)::bigint as n`) reaches `n`.
pub async fn wait_for(url: &str, sql: &str, n: i64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let got = count(url, sql).await;
        if got >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {sql}: {got} of {n}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn config(attempts: u32, backoff_ms: u64) -> ChannelConfig {
    ChannelConfig {
        max_in_flight: 200,
        attempts,
        backoff: Backoff {
            initial: Duration::from_millis(backoff_ms),
            max: Duration::from_secs(10),
        },
        settings_ttl: Duration::from_millis(100),
        pool_size: 4,
        claim_lease: Duration::from_secs(5),
        ..ChannelConfig::default()
    }
}

/// The email, SMS and dead-letter processors in this process until the returned sender is
/// dropped or fired.
pub async fn start<M: MailGateway + Clone, S: SmsGateway + Clone>(
    common: &CommonArgs,
    mail: M,
    sms_gateway: S,
    cfg: &ChannelConfig,
) -> (
    tokio::sync::watch::Sender<bool>,
    Vec<tokio::task::JoinHandle<()>>,
) {
    let (stop, rx) = tokio::sync::watch::channel(false);
    let until = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let pool = billing_db::pool(&common.database_url, 4).unwrap();
    let email = EmailChannel::new(common, mail).await.unwrap();
    let sms = SmsChannel::new(common, sms_gateway).await.unwrap();
    let deps = || ChannelDeps {
        pool: pool.clone(),
        stats: Arc::default(),
    };
    let mut tasks = Vec::new();
    let (c, cfg1, d, r) = (common.clone(), cfg.clone(), deps(), rx.clone());
    tasks.push(tokio::spawn(async move {
        billing_messaging::run(&c, cfg1, email, d, until(r))
            .await
            .unwrap();
    }));
    let (c, cfg2, d, r) = (common.clone(), cfg.clone(), deps(), rx.clone());
    tasks.push(tokio::spawn(async move {
        billing_messaging::run(&c, cfg2, sms, d, until(r))
            .await
            .unwrap();
    }));
    let (c, r) = (common.clone(), rx.clone());
    tasks.push(tokio::spawn(async move {
        billing_dlq::run(&c, false, until(r)).await.unwrap();
    }));
    (stop, tasks)
}

pub async fn stop(stop: tokio::sync::watch::Sender<bool>, tasks: Vec<tokio::task::JoinHandle<()>>) {
    stop.send(true).unwrap();
    for t in tasks {
        t.await.unwrap();
    }
}
