//! Hostile and duplicated input through settlement and the bill sink, over the real broker,
//! registry and PostgreSQL: every bad record becomes a dead letter with its reason, the rest
//! of the month settles and loads to its rules, and each usage id is billed once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use billing_domain::{BillingMonth, generator::Generator, products, rules};
use billing_ops::{
    seed::{SeedOptions, seed},
    settle::settle,
};
use billing_runtime::Producer;
use billing_schema::{
    Bill, Decoder, Encoder, Member, Product, ProductKind, UsageRecord,
    catalogue::{BILLS, MEMBERS, PRODUCTS, USAGE_RECORDS},
};
use billing_testkit::{TestEnv, count};

const MEMBERS_N: i64 = 120;
const SEED: u64 = 11;

/// Members whose latest value is refused or who joined after the month: no bill.
const UNBILLED: [i64; 4] = [10, 11, 12, 13];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_records_become_dead_letters_and_each_usage_id_is_billed_once() {
    // Given a seeded month
    let env = TestEnv::new().await;
    let mut common = env.common.clone();
    common.database_url = env.database().await;
    let month: BillingMonth = "2026-11".parse().unwrap();
    seed(
        &common,
        SeedOptions {
            month,
            members: u64::try_from(MEMBERS_N).unwrap(),
            seed: SEED,
        },
        None,
    )
    .await
    .unwrap();
    let g = Generator::new(SEED, month, common.billing_tz);
    let producer = Producer::new(&env.kafka()).unwrap();
    let subject = |spec| env.catalogue().value_subject(spec);
    let members = Encoder::<Member>::register(&env.registry, &subject(&MEMBERS.spec))
        .await
        .unwrap();
    let send = async |topic: &str, key: &str, payload: &[u8]| {
        producer
            .send(topic, Some(key.as_bytes()), Some(payload), None)
            .await
            .unwrap();
    };

    // And hostile member records: a NUL in a name, a join date past year 9999, 5,000
    // copies of one add-on, a broken do-not-disturb window, ids that would collide with other
    // bills, and a value whose id is not its key
    let members_topic = env.topic(&MEMBERS.spec);
    type Mutation = Box<dyn Fn(&mut Member)>;
    let mutations: Vec<(i64, Mutation)> = vec![
        (10, Box::new(|m| m.name = "a\0b".into())),
        // 2030-01-01: a member who joins after the month (valid, not billed for it)
        (11, Box::new(|m| m.joined_on = 21_915)),
        (121, Box::new(|m| m.joined_on = i32::MAX)),
        (
            12,
            Box::new(|m| m.addon_ids = vec!["addon-music".into(); 5000]),
        ),
        (
            13,
            Box::new(|m| {
                m.dnd_start_minute = Some(-1);
                m.dnd_end_minute = Some(600);
            }),
        ),
        (10_000_000_000, Box::new(|_| {})),
        (-7, Box::new(|_| {})),
    ];
    let hostile: Vec<(String, Member)> = mutations
        .into_iter()
        .map(|(id, mutate)| {
            let mut m = g.member(id.clamp(1, MEMBERS_N));
            m.member_id = id;
            mutate(&mut m);
            (id.to_string(), m)
        })
        .chain([("100000".to_string(), g.member(14))])
        .collect();
    for (key, m) in &hostile {
        send(&members_topic, key, &members.encode(m).unwrap()).await;
    }

    // And a product with a negative price
    let products_enc = Encoder::<Product>::register(&env.registry, &subject(&PRODUCTS.spec))
        .await
        .unwrap();
    let mut evil = products::catalogue(g.updated_at())
        .into_iter()
        .find(|p| p.kind == ProductKind::Addon)
        .unwrap();
    evil.product_id = "addon-evil".into();
    evil.monthly_fee = -100;
    send(
        &env.topic(&PRODUCTS.spec),
        "addon-evil",
        &products_enc.encode(&evil).unwrap(),
    )
    .await;

    // And 50 usage records sent again unchanged (an at-least-once upstream), and one sent again
    // with the same usage id but another quantity
    let usage_topic = env.topic(&USAGE_RECORDS.spec);
    let unbilled_keys: Vec<String> = UNBILLED.iter().map(i64::to_string).collect();
    let originals: Vec<_> = env
        .read(&usage_topic, 400, Duration::from_secs(30))
        .await
        .into_iter()
        .filter(|r| !unbilled_keys.contains(&String::from_utf8(r.key.clone().unwrap()).unwrap()))
        .take(51)
        .collect();
    assert_eq!(originals.len(), 51);
    let usage_decoder = Decoder::<UsageRecord>::new(env.registry.clone());
    let usage_enc = Encoder::<UsageRecord>::register(&env.registry, &subject(&USAGE_RECORDS.spec))
        .await
        .unwrap();
    let mut repeated_members = HashSet::new();
    for r in &originals[..50] {
        let key = String::from_utf8(r.key.clone().unwrap()).unwrap();
        send(&usage_topic, &key, r.payload.as_deref().unwrap()).await;
        repeated_members.insert(key);
    }
    let mut changed = usage_decoder
        .decode(originals[50].payload.as_deref())
        .await
        .unwrap();
    changed.quantity += 1;
    let changed_key = changed.member_id.to_string();
    send(
        &usage_topic,
        &changed_key,
        &usage_enc.encode(&changed).unwrap(),
    )
    .await;

    // And forged bills on the bills topic: one whose id is not its member's, and one that adds
    // up but whose snapshot PostgreSQL cannot store (a JSON \u0000 escape), which only the
    // database refuses
    let catalogue: HashMap<String, Product> = products::catalogue(g.updated_at())
        .into_iter()
        .map(|p| (p.product_id.clone(), p))
        .collect();
    let settled_at = month.bounds(common.billing_tz).1.timestamp_millis();
    let bills_enc = Encoder::<Bill>::register(&env.registry, &subject(&BILLS.spec))
        .await
        .unwrap();
    let plain = |id: i64| {
        rules::compute_bill(
            month,
            &g.member(id),
            &catalogue,
            &BTreeMap::new(),
            settled_at,
        )
        .unwrap()
    };
    let mut wrong_id = plain(10);
    wrong_id.bill_id += 1;
    let mut bad_json = plain(13);
    bad_json.items[0].snapshot = r#"{"note":"\u0000"}"#.into();
    let bills_topic = env.topic(&BILLS.spec);
    send(&bills_topic, "10", &bills_enc.encode(&wrong_id).unwrap()).await;
    send(&bills_topic, "13", &bills_enc.encode(&bad_json).unwrap()).await;

    // When the month is settled
    let report = settle(&common, month).await.unwrap();

    // Then every other member has exactly the rules' bill, each usage id counted once
    let url = &common.database_url;
    let mut expected = BTreeMap::new();
    for id in (1..=MEMBERS_N).filter(|id| !UNBILLED.contains(id)) {
        let mut usage = BTreeMap::new();
        for u in g.usage(id) {
            *usage.entry(u.product_id).or_insert(0) += u.quantity;
        }
        let b = rules::compute_bill(month, &g.member(id), &catalogue, &usage, settled_at).unwrap();
        expected.insert(b.bill_id, (b.final_amount, b.items.len() as i64));
    }
    assert_eq!(report.settlement.bills, expected.len() as u64);
    assert_eq!(report.settlement.duplicates, 50);
    assert_eq!(report.settlement.joined_later, 1);
    assert_eq!(report.totals.bills, expected.len() as i64);
    let final_sum: i64 = expected.values().map(|v| v.0).sum();
    let items: i64 = expected.values().map(|v| v.1).sum();
    assert_eq!(report.totals.final_amount, final_sum);
    assert_eq!(report.totals.items, items);
    for id in UNBILLED {
        let sql = format!("select count(*)::bigint as n from bill where member_id = {id}");
        assert_eq!(count(url, &sql).await, 0, "member {id} has no bill");
    }
    assert_eq!(
        count(
            url,
            "select count(*)::bigint as n from bill where member_id not between 1 and 120"
        )
        .await,
        0
    );

    // And every hostile record is a dead letter with its reason, at each stage that read it
    let letters = |stage: &str, needle: &str| {
        format!(
            "select count(*)::bigint as n from dead_letter where stage = '{stage}' and reason like '%{needle}%'"
        )
    };
    for needle in [
        "name contains a NUL",
        "addon_ids has 5000 entries",
        "dnd_start_minute -1 is out of range",
        "member_id 10000000000 is out of range",
        "member_id -7 is out of range",
        "joined_on 2147483647 is out of range",
        "key \"100000\" does not match",
    ] {
        assert_eq!(
            count(url, &letters("settlement", needle)).await,
            1,
            "settlement: {needle}"
        );
        assert_eq!(
            count(url, &letters("bill-sink", needle)).await,
            1,
            "bill-sink: {needle}"
        );
    }
    assert_eq!(
        count(
            url,
            &letters("settlement", "monthly_fee -100 is out of range")
        )
        .await,
        1
    );
    assert_eq!(
        count(
            url,
            &letters("settlement", "already counted with different content")
        )
        .await,
        1
    );
    assert_eq!(
        count(url, &letters("bill-sink", "bill refused: bill id")).await,
        1
    );
    assert_eq!(
        count(url, &letters("bill-sink", "database refused the row")).await,
        1
    );
    assert!(
        count(url, &letters("settlement", "who joined after the month")).await >= 1
            || g.usage(11).is_empty()
    );

    // And both stages counted what they refused in their metrics
    let metrics = billing_runtime::metrics::global().render();
    for group in [
        "settlement".to_string(),
        format!("{}bill-sink", common.topic_prefix),
    ] {
        let line = format!("billing_dead_letters_total{{group=\"{group}\"}}");
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with(&line) && !l.ends_with(" 0")),
            "{line} in\n{metrics}"
        );
    }

    // And the member table kept the last good value of each refused member
    assert_eq!(
        count(url, "select count(*)::bigint as n from member").await,
        MEMBERS_N
    );
    let kept = format!(
        "select count(*)::bigint as n from member where id = 10 and name = '{}'",
        g.member(10).name
    );
    assert_eq!(count(url, &kept).await, 1);

    // And reconcile counts each usage id once and finds nothing wrong
    let reconciled = billing_ops::reconcile::reconcile(&common, month)
        .await
        .unwrap();
    assert_eq!(reconciled.discrepancies, vec![]);
    let billed_usage: usize = (1..=MEMBERS_N)
        .filter(|id| !UNBILLED.contains(id))
        .map(|id| g.usage(id).len())
        .sum();
    assert_eq!(reconciled.usage_records, billed_usage as u64);
    assert!(!repeated_members.is_empty());
}
