//! Two bill-sink instances in one group, partitions moving between them mid-load (a second
//! instance joins, then the first leaves): the database ends exactly as one calm load leaves
//! it, every bill inserted once, both instances having written a share.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use billing_bill_sink::{SinkConfig, SinkSummary};
use billing_domain::BillingMonth;
use billing_ops::{
    seed::{SeedOptions, seed},
    settle::settle,
};
use billing_runtime::CommonArgs;
use billing_testkit::{TestEnv, count};
use diesel::{QueryableByName, sql_types::Text};
use diesel_async::RunQueryDsl;
use tokio::{sync::oneshot, task::JoinHandle};

const MEMBERS: i64 = 600;

#[derive(QueryableByName)]
struct Line {
    #[diesel(sql_type = Text)]
    line: String,
}

/// Every bill, item and member as text, in id order (all columns but load timestamps).
async fn dump(url: &str) -> Vec<String> {
    let mut conn = billing_db::connect(url).await.unwrap();
    let mut out = Vec::new();
    for sql in [
        "select format('%s|%s|%s|%s|%s', id, member_id, billing_month, final_amount, settled_at) as line from bill order by id",
        "select format('%s|%s|%s|%s|%s', id, bill_id, kind, amount, snapshot::text) as line from bill_item order by id",
        "select format('%s|%s|%s|%s|%s|%s', id, name, delivery_day, dnd_start, dnd_end, plan_id) as line from member order by id",
    ] {
        let rows: Vec<Line> = diesel::sql_query(sql).load(&mut conn).await.unwrap();
        out.extend(rows.into_iter().map(|r| r.line));
    }
    out
}

fn start(common: &CommonArgs, group: &str) -> (oneshot::Sender<()>, JoinHandle<SinkSummary>) {
    let (stop, stopped) = oneshot::channel::<()>();
    let config = SinkConfig {
        group_id: group.to_string(),
        batch_size: 25,
        linger: Duration::from_millis(5),
        writers: 2,
        bounded: false,
    };
    let common = common.clone();
    let task = tokio::spawn(async move {
        billing_bill_sink::run(&common, config, async {
            let _ = stopped.await;
        })
        .await
        .unwrap()
    });
    (stop, task)
}

async fn wait_for(url: &str, sql: &str, at_least: i64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while count(url, sql).await < at_least {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never reached {at_least}: {sql}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_moving_between_two_sinks_mid_load_leave_the_rows_of_a_calm_load() {
    // Given a settled month, loaded once calmly into one schema
    let env = TestEnv::new().await;
    let mut calm = env.common.clone();
    calm.database_url = env.database().await;
    let month: BillingMonth = "2026-11".parse().unwrap();
    let options = SeedOptions {
        month,
        members: u64::try_from(MEMBERS).unwrap(),
        seed: 11,
    };
    seed(&calm, options, None).await.unwrap();
    settle(&calm, month).await.unwrap();
    let expected = dump(&calm.database_url).await;

    // When two sinks of a new group load it into another schema, the second joining and the
    // first leaving while the load is under way
    let mut common = env.common.clone();
    common.database_url = env.database().await;
    let url = common.database_url.clone();
    let group = env.group("sink-pair");
    let bills = "select count(*)::bigint as n from bill";
    let (stop_first, first) = start(&common, &group);
    wait_for(&url, bills, 50).await;
    let (stop_second, second) = start(&common, &group);
    wait_for(&url, bills, 250).await;
    stop_first.send(()).unwrap();
    let first = first.await.unwrap();
    let items = i64::try_from(expected.len()).unwrap() - 2 * MEMBERS;
    wait_for(&url, bills, MEMBERS).await;
    wait_for(&url, "select count(*)::bigint as n from bill_item", items).await;
    wait_for(&url, "select count(*)::bigint as n from member", MEMBERS).await;
    stop_second.send(()).unwrap();
    let second = second.await.unwrap();

    // Then the rows are those of the calm load, and each bill was inserted by one of them once
    assert_eq!(dump(&url).await, expected);
    assert_eq!(
        first.bills_inserted + second.bills_inserted,
        u64::try_from(MEMBERS).unwrap()
    );
    assert!(
        first.bills_inserted > 0 && second.bills_inserted > 0,
        "both instances wrote: {} and {}",
        first.bills_inserted,
        second.bills_inserted
    );
}
