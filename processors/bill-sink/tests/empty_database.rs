//! The bill sink's offsets live in PostgreSQL with its rows: a database that holds none for a
//! partition (emptied, restored from before the first load, or new beside old topics) is
//! loaded from the topics, whatever offsets the consumer group committed in Kafka.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use billing_bill_sink::SinkConfig;
use billing_domain::BillingMonth;
use billing_ops::{
    seed::{SeedOptions, seed},
    settle::settle,
};
use billing_testkit::{TestEnv, count};
use diesel_async::SimpleAsyncConnection;

const MEMBERS: i64 = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emptied_database_is_loaded_again_although_the_group_committed_in_kafka() {
    // Given a month settled and loaded, so the sink's group has committed its offsets in Kafka
    let env = TestEnv::new().await;
    let mut common = env.common.clone();
    common.database_url = env.database().await;
    let month: BillingMonth = "2026-11".parse().unwrap();
    let options = SeedOptions {
        month,
        members: u64::try_from(MEMBERS).unwrap(),
        seed: 5,
    };
    seed(&common, options, None).await.unwrap();
    settle(&common, month).await.unwrap();
    let url = common.database_url.clone();
    let bills = "select count(*)::bigint as n from bill";
    assert_eq!(count(&url, bills).await, MEMBERS);

    // When the database loses every row and offset the sink wrote
    let mut conn = billing_db::connect(&url).await.unwrap();
    conn.batch_execute("truncate bill_item, bill, member, consumer_offset cascade")
        .await
        .unwrap();

    // Then the sink, run again in the same group, loads the month again
    let config = SinkConfig {
        group_id: format!("{}{}", common.topic_prefix, billing_bill_sink::NAME),
        ..SinkConfig::bounded()
    };
    let run = billing_bill_sink::run(&common, config, std::future::pending());
    let summary = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the sink never loaded the records the group had committed past")
        .unwrap();
    assert_eq!(summary.bills_inserted, u64::try_from(MEMBERS).unwrap());
    assert_eq!(count(&url, bills).await, MEMBERS);
    assert_eq!(
        count(&url, "select count(*)::bigint as n from member").await,
        MEMBERS
    );
}
