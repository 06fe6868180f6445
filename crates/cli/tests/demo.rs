//! `billing demo` as the README runs it, on a small month: the real binaries, broker, registry
//! and PostgreSQL, on a fast simulated clock.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use billing_testkit::TestEnv;
use diesel::{QueryableByName, sql_types::BigInt};
use diesel_async::RunQueryDsl;

#[derive(QueryableByName, Debug, PartialEq, Eq)]
struct Outcome {
    #[diesel(sql_type = BigInt)]
    bills: i64,
    #[diesel(sql_type = BigInt)]
    finished: i64,
    #[diesel(sql_type = BigInt)]
    sent_twice: i64,
    #[diesel(sql_type = BigInt)]
    attempts: i64,
}

const OUTCOME: &str = "
    select (select count(*) from bill where billing_month = '2026-11') as bills,
           (select count(distinct bill_id) from delivery where status in ('sent', 'dead')) as finished,
           (select count(*) from (select bill_id from delivery where status = 'sent'
                                  group by bill_id having count(*) > 1) x) as sent_twice,
           (select coalesce(sum(attempts), 0) from delivery)::bigint as attempts";

fn demo(env: &TestEnv, database_url: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_billing"))
        .args([
            "demo",
            "--members",
            "150",
            "--month",
            "2026-11",
            "--speed",
            "172800",
            "--gateway-latency-ms",
            "20",
            "--gateway-failure-rate",
            "0.1",
            "--timeout-min",
            "5",
            "--quiet",
            "--no-console",
        ])
        .env("DATABASE_URL", database_url)
        .env("KAFKA_BROKERS", &env.common.kafka_brokers)
        .env("SCHEMA_REGISTRY_URL", &env.common.schema_registry_url)
        .env("BILLING_TOPIC_PREFIX", &env.common.topic_prefix)
        .env("BILLING_PARTITIONS", env.common.partitions.to_string())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "billing demo failed: {}\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_plays_a_month_to_the_end_and_a_second_run_changes_nothing() {
    // Given a fresh schema and topic prefix
    let env = TestEnv::new().await;
    let url = env.database().await;

    // When the demo plays November (seeded, settled, delivered in December)
    let report = demo(&env, &url);

    // Then every bill ended sent or dead, none sent twice, and the report says so
    let mut conn = billing_db::connect(&url).await.unwrap();
    let first: Outcome = diesel::sql_query(OUTCOME)
        .get_result(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        (first.bills, first.finished, first.sent_twice),
        (150, 150, 0),
        "{report}"
    );
    assert!(first.attempts >= 150, "{first:?}");
    assert!(report.contains("150"), "{report}");

    // And a second run finds the month done and sends nothing more
    let again = demo(&env, &url);
    let second: Outcome = diesel::sql_query(OUTCOME)
        .get_result(&mut conn)
        .await
        .unwrap();
    assert_eq!(second, first, "{again}");
}
