//! Settlement and the bill sink over the real broker, registry and PostgreSQL: the month
//! settles to its rules, bad records are quarantined, and re-runs, replays and crashes
//! leave exactly the same rows.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use billing_bill_sink::SinkConfig;
use billing_domain::{BillingMonth, generator::Generator, products, rules};
use billing_ops::{
    seed::{SeedOptions, seed},
    settle::settle,
};
use billing_runtime::Producer;
use billing_schema::{BillItemKind, Encoder, UsageRecord, catalogue::USAGE_RECORDS};
use billing_testkit::{TestEnv, count};
use diesel::{QueryableByName, sql_types::Text};
use diesel_async::{RunQueryDsl, SimpleAsyncConnection};

const MEMBERS: i64 = 300;

#[derive(QueryableByName)]
struct Row {
    #[diesel(sql_type = Text)]
    row: String,
}

/// Every bill and item, as text, in id order (all columns but the load timestamp).
async fn dump(url: &str) -> Vec<String> {
    let mut conn = billing_db::connect(url).await.unwrap();
    let mut rows: Vec<Row> = diesel::sql_query(
        "select format('%s|%s|%s|%s|%s|%s|%s|%s', id, member_id, billing_month, total_amount, discount_amount,
                       vat_amount, final_amount, settled_at) as row from bill order by id",
    )
    .load(&mut conn)
    .await
    .unwrap();
    rows.extend(
        diesel::sql_query(
            "select format('%s|%s|%s|%s|%s|%s|%s|%s', id, bill_id, kind, product_id, description, quantity, amount,
                           snapshot::text) as row from bill_item order by id",
        )
        .load::<Row>(&mut conn)
        .await
        .unwrap(),
    );
    rows.into_iter().map(|r| r.row).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_month_settles_to_its_rules_and_reruns_replays_and_crashes_change_nothing() {
    // Given a seeded month, with bad usage records mixed in
    let env = TestEnv::new().await;
    let mut common = env.common.clone();
    common.database_url = env.database().await;
    let month: BillingMonth = "2026-11".parse().unwrap();
    seed(
        &common,
        SeedOptions {
            month,
            members: u64::try_from(MEMBERS).unwrap(),
            seed: 5,
        },
        None,
    )
    .await
    .unwrap();
    let usage_topic = env.topic(&USAGE_RECORDS.spec);
    let enc = Encoder::<UsageRecord>::register(
        &env.registry,
        &env.catalogue().value_subject(&USAGE_RECORDS.spec),
    )
    .await
    .unwrap();
    let producer = Producer::new(&env.kafka()).unwrap();
    let bad = |member_id: i64, product: &str, quantity: i64, billing_month: &str| UsageRecord {
        usage_id: format!("bad-{member_id}-{product}"),
        member_id,
        product_id: product.into(),
        quantity,
        billing_month: billing_month.into(),
        occurred_at: 0,
    };
    for (key, payload) in [
        (
            "999999",
            enc.encode(&bad(999_999, products::DATA, 10, "2026-11"))
                .unwrap(),
        ),
        (
            "1",
            enc.encode(&bad(1, "no-such-product", 10, "2026-11"))
                .unwrap(),
        ),
        (
            "2",
            enc.encode(&bad(2, products::VOICE, -5, "2026-11")).unwrap(),
        ),
        ("3", vec![0, 0, 0]),
        (
            "4",
            enc.encode(&bad(4, products::SMS, 7, "2026-10")).unwrap(),
        ),
    ] {
        producer
            .send(&usage_topic, Some(key.as_bytes()), Some(&payload), None)
            .await
            .unwrap();
    }

    // When a settlement process is killed part-way, and then the month is settled
    let settlement_bin =
        std::path::Path::new(env!("CARGO_BIN_EXE_bill-sink")).with_file_name("settlement");
    assert!(
        settlement_bin.exists(),
        "build the workspace's binaries first (scripts/test does)"
    );
    let mut victim = std::process::Command::new(&settlement_bin)
        .args(["--month", &month.to_string(), "--parallelism", "1"])
        .env("KAFKA_BROKERS", &common.kafka_brokers)
        .env("SCHEMA_REGISTRY_URL", &common.schema_registry_url)
        .env("BILLING_TOPIC_PREFIX", &common.topic_prefix)
        .env("BILLING_PARTITIONS", common.partitions.to_string())
        .spawn()
        .unwrap();
    let bills_topic = env.topic(&billing_schema::catalogue::BILLS.spec);
    for _ in 0..600 {
        if env.record_count(&bills_topic).await > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    victim.kill().unwrap();
    victim.wait().unwrap();
    let partial = env.record_count(&bills_topic).await;
    assert!(
        partial > 0 && partial < 300,
        "killed mid-run with {partial} bills out"
    );
    let first = settle(&common, month).await.unwrap();

    // Then every bill is the rules' result for the member's data
    assert_eq!(first.settlement.bills, 300);
    assert_eq!(first.settlement.quarantined, 4);
    assert_eq!(first.settlement.other_months, 1);
    assert_eq!(first.totals.bills, MEMBERS);
    let g = Generator::new(5, month, common.billing_tz);
    let catalogue: HashMap<String, _> = products::catalogue(g.updated_at())
        .into_iter()
        .map(|p| (p.product_id.clone(), p))
        .collect();
    let settled_at = month.bounds(common.billing_tz).1.timestamp_millis();
    let mut expected = Vec::new();
    for id in 1..=MEMBERS {
        let mut usage = BTreeMap::new();
        for u in g.usage(id) {
            *usage.entry(u.product_id).or_insert(0) += u.quantity;
        }
        let b = rules::compute_bill(month, &g.member(id), &catalogue, &usage, settled_at).unwrap();
        expected.push(format!(
            "{}|{}|{}|{}|{}|{}|{}",
            b.bill_id,
            b.member_id,
            b.billing_month,
            b.total_amount,
            b.discount_amount,
            b.vat_amount,
            b.final_amount
        ));
        for i in &b.items {
            let kind = if i.kind == BillItemKind::Charge {
                "charge"
            } else {
                "discount"
            };
            expected.push(format!(
                "{}|{}|{kind}|{}|{}|{}|{}",
                i.item_id, b.bill_id, i.product_id, i.quantity, i.amount, i.description
            ));
        }
    }
    let rows = dump(&common.database_url).await;
    let mut actual = Vec::new();
    for r in &rows {
        let f: Vec<&str> = r.split('|').collect();
        if f.len() == 8 && (f[2] == "charge" || f[2] == "discount") {
            actual.push(format!(
                "{}|{}|{}|{}|{}|{}|{}",
                f[0], f[1], f[2], f[3], f[5], f[6], f[4]
            ));
        } else {
            actual.push(f[..7].join("|"));
        }
    }
    expected.sort();
    actual.sort();
    assert_eq!(actual, expected);

    // And the bad records are in dead_letter with their reasons
    let dl = |needle: &str| {
        format!(
            "select count(*)::bigint as n from dead_letter where stage = 'settlement' and reason like '%{needle}%'"
        )
    };
    let url = common.database_url.clone();
    assert_eq!(count(&url, &dl("unknown member 999999")).await, 1);
    assert_eq!(count(&url, &dl("unknown product")).await, 1);
    assert_eq!(count(&url, &dl("not positive")).await, 1);
    assert_eq!(count(&url, &dl("cannot decode")).await, 1);
    assert_eq!(
        count(&url, "select count(*)::bigint as n from member").await,
        MEMBERS
    );

    // And reconcile finds nothing wrong
    let reconciled = billing_ops::reconcile::reconcile(&common, month)
        .await
        .unwrap();
    assert_eq!(reconciled.discrepancies, vec![]);
    assert_eq!(reconciled.bills, 300);

    // When the month is settled again, and the operator replays the bills topic from the
    // beginning for the sink's group (`billing replay --to-earliest`) and the sink runs
    let again = settle(&common, month).await.unwrap();
    let sink_group = format!("{}{}", common.topic_prefix, billing_bill_sink::NAME);
    let moved = billing_ops::replay::replay(
        &common,
        &sink_group,
        &bills_topic,
        billing_ops::replay::Target::Earliest,
        false,
    )
    .await
    .unwrap();
    assert!(moved.database_rows > 0, "the sink's own offsets moved too");
    assert!(moved.moves.iter().all(|m| m.to == 0));
    let replay = billing_bill_sink::run(
        &common,
        SinkConfig {
            group_id: sink_group,
            ..SinkConfig::bounded()
        },
        std::future::pending(),
    )
    .await
    .unwrap();

    // Then nothing changed
    assert_eq!(again.sink.bills_inserted, 0);
    assert!(
        replay.bills_seen >= 600,
        "the replay read every bill event: {}",
        replay.bills_seen
    );
    assert_eq!(replay.bills_inserted, 0);
    assert_eq!(dump(&common.database_url).await, rows);

    // When a sink process is killed mid-load into an empty database and started again
    let mut crash = common.clone();
    crash.database_url = env.database().await;
    let group = env.group("crash");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_bill-sink"))
        .env("DATABASE_URL", &crash.database_url)
        .env("KAFKA_BROKERS", &crash.kafka_brokers)
        .env("SCHEMA_REGISTRY_URL", &crash.schema_registry_url)
        .env("BILLING_TOPIC_PREFIX", &crash.topic_prefix)
        .env("BILLING_PARTITIONS", crash.partitions.to_string())
        .env("BILL_SINK_GROUP", &group)
        .env("BILL_SINK_BATCH", "40")
        .env("BILL_SINK_LINGER_MS", "20")
        .spawn()
        .unwrap();
    let mut loaded = 0;
    for _ in 0..300 {
        loaded = count(
            &crash.database_url,
            "select count(*)::bigint as n from bill",
        )
        .await;
        if loaded > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(loaded > 0, "the killed sink had loaded some bills");
    billing_bill_sink::run(
        &crash,
        SinkConfig {
            group_id: group,
            ..SinkConfig::bounded()
        },
        std::future::pending(),
    )
    .await
    .unwrap();

    // Then the restarted sink finished the load to exactly the same rows
    assert_eq!(dump(&crash.database_url).await, rows);

    // And when a bill's row goes missing under its items (the sink's writers skip the per-row
    // foreign-key check), reconcile names it
    let mut conn = billing_db::connect(&crash.database_url).await.unwrap();
    let victim = count(&crash.database_url, "select min(id) as n from bill").await;
    let member = victim - rules::bill_id(month, 0);
    diesel::sql_query("set session_replication_role = replica")
        .execute(&mut conn)
        .await
        .unwrap();
    diesel::sql_query(format!("delete from bill where id = {victim}"))
        .execute(&mut conn)
        .await
        .unwrap();
    let reconciled = billing_ops::reconcile::reconcile(&crash, month)
        .await
        .unwrap();
    assert!(
        reconciled
            .discrepancies
            .iter()
            .any(|d| d.member_id == member && d.what.contains("which does not exist")),
        "{:?}",
        reconciled.discrepancies
    );

    // And when one member's usage item says one unit more than the topic, and another
    // member's usage item is gone, reconcile names both, and nothing else
    let usage = "from bill_item where kind = 'charge' and snapshot ? 'usage_unit'";
    let raised = count(&crash.database_url, &format!("select max(id) as n {usage}")).await;
    let quantity = count(
        &crash.database_url,
        &format!("select quantity as n from bill_item where id = {raised}"),
    )
    .await;
    let gone = count(
        &crash.database_url,
        &format!("select min(id) as n {usage} and bill_id > {victim}"),
    )
    .await;
    let gone_quantity = count(
        &crash.database_url,
        &format!("select quantity as n from bill_item where id = {gone}"),
    )
    .await;
    conn.batch_execute(&format!(
        "update bill_item set quantity = quantity + 1 where id = {raised}; delete from bill_item where id = {gone}"
    ))
    .await
    .unwrap();
    let member_of = |item: i64| item / 100 - rules::bill_id(month, 0);
    let reconciled = billing_ops::reconcile::reconcile(&crash, month)
        .await
        .unwrap();
    let found = |m: i64, what: &str| {
        reconciled
            .discrepancies
            .iter()
            .any(|d| d.member_id == m && d.what.contains(what))
    };
    assert!(
        found(
            member_of(raised),
            &format!("billed quantity {}, usage topic {quantity}", quantity + 1)
        ),
        "{:?}",
        reconciled.discrepancies
    );
    assert!(
        found(
            member_of(gone),
            &format!("usage {gone_quantity} on the topic but no bill item")
        ),
        "{:?}",
        reconciled.discrepancies
    );
    // (member 999999's usage has no member: quarantined by settlement in the first database,
    // not in this one, where only the sink ran)
    assert!(
        reconciled.discrepancies.iter().all(|d| {
            [member, member_of(raised), member_of(gone), 999_999].contains(&d.member_id)
        }),
        "{:?}",
        reconciled.discrepancies
    );
}
