//! `billing reconcile --month`: recomputes every bill from its items and from the usage
//! topic, and lists every discrepancy.
//!
//! Three checks: (1) in SQL, each bill's totals equal its items' sums, its VAT equals 10% of
//! the taxable part truncated, and final = total - discount + vat; (2) each usage item's
//! amount equals the rule applied to its own snapshot (billable quantity, unit price, per
//! units); (3) each member's usage quantities in the items equal the month's valid usage
//! re-read from `usage-records` (records already quarantined in `dead_letter` excluded, each
//! usage id of a member counted once, as settlement counts it), and no usage is left without
//! a bill.

use std::collections::{HashMap, HashSet};

use billing_domain::{
    BillingMonth,
    rules::{usage_identity, validate_usage},
};
use billing_runtime::{CommonArgs, snapshot};
use billing_schema::{
    Decoder, Product, Registry, UsageRecord,
    catalogue::{PRODUCTS, USAGE_RECORDS},
};
use diesel::{
    QueryableByName,
    sql_types::{BigInt, Int4, Text},
};
use diesel_async::RunQueryDsl;
use rdkafka::{Message, message::BorrowedMessage};

use crate::OpsError;

/// One thing that does not add up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discrepancy {
    pub member_id: i64,
    pub what: String,
}

/// What reconcile checked and found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    pub bills: u64,
    pub usage_items: u64,
    pub usage_records: u64,
    pub discrepancies: Vec<Discrepancy>,
}

#[derive(Debug, QueryableByName)]
struct BadBill {
    #[diesel(sql_type = BigInt)]
    member_id: i64,
    #[diesel(sql_type = Text)]
    what: String,
}

impl From<BadBill> for Discrepancy {
    fn from(b: BadBill) -> Self {
        Discrepancy {
            member_id: b.member_id,
            what: b.what,
        }
    }
}

#[derive(Debug, QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(Debug, QueryableByName)]
struct UsageItem {
    #[diesel(sql_type = BigInt)]
    member_id: i64,
    #[diesel(sql_type = Text)]
    product_id: String,
    #[diesel(sql_type = BigInt)]
    quantity: i64,
    #[diesel(sql_type = BigInt)]
    amount: i64,
    #[diesel(sql_type = BigInt)]
    free_allowance: i64,
    #[diesel(sql_type = BigInt)]
    unit_price: i64,
    #[diesel(sql_type = BigInt)]
    per_units: i64,
}

#[derive(Debug, QueryableByName)]
struct Quarantined {
    #[diesel(sql_type = Int4)]
    partition: i32,
    #[diesel(sql_type = BigInt)]
    offset: i64,
}

/// Recomputes `month` and returns what disagrees.
pub async fn reconcile(
    common: &CommonArgs,
    month: BillingMonth,
) -> Result<ReconcileReport, OpsError> {
    let m = month.to_string();
    let group = format!("{}reconcile-{}", common.topic_prefix, std::process::id());
    let mut conn = billing_db::connect(&common.database_url).await?;
    let bills =
        diesel::sql_query("select count(*)::bigint as n from bill where billing_month = $1")
            .bind::<Text, _>(&m)
            .load::<Count>(&mut conn)
            .await?
            .pop()
            .map_or(0, |c| u64::try_from(c.n).unwrap_or(0));
    let mut report = ReconcileReport {
        bills,
        ..ReconcileReport::default()
    };

    // (0) Items whose bill is missing. The bill sink skips the per-row foreign-key check on
    // `bill_item` (it inserts items only with their bills), so this is checked here, over
    // the month's range of bill ids (`yyyymm * 10^10 + member id`).
    let orphans: Vec<BadBill> = diesel::sql_query(
        "select (i.bill_id - $1) as member_id,
                format('%s items of bill %s, which does not exist', count(*), i.bill_id) as what
         from bill_item i
         where i.bill_id between $1 and $2
           and not exists (select 1 from bill b where b.id = i.bill_id)
         group by i.bill_id",
    )
    .bind::<BigInt, _>(billing_domain::rules::bill_id(month, 0))
    .bind::<BigInt, _>(billing_domain::rules::bill_id(
        month,
        billing_domain::validate::MAX_MEMBER_ID,
    ))
    .load(&mut conn)
    .await?;
    report
        .discrepancies
        .extend(orphans.into_iter().map(Discrepancy::from));

    // (1) Totals, VAT and the final identity, from the items.
    let bad: Vec<BadBill> = diesel::sql_query(
        "with s as (
           select b.id, b.member_id, b.total_amount, b.discount_amount, b.vat_amount, b.final_amount,
             coalesce(sum(i.amount) filter (where i.kind = 'charge'), 0)::bigint as charges,
             coalesce(sum(i.amount) filter (where i.kind = 'discount'), 0)::bigint as discounts,
             coalesce(sum(i.amount) filter (where i.kind = 'charge' and coalesce(i.snapshot->>'kind', '') <> 'MICRO_PAYMENT'), 0)::bigint as taxable_charges,
             coalesce(sum(i.amount) filter (where i.kind = 'discount' and i.product_id <> 'rounding'), 0)::bigint as taxable_discounts
           from bill b left join bill_item i on i.bill_id = b.id
           where b.billing_month = $1 group by b.id)
         select member_id, format('bill %s: charges %s, discounts %s, vat %s, final %s; items say %s, %s, vat %s',
                id, total_amount, discount_amount, vat_amount, final_amount, charges, discounts,
                greatest(taxable_charges - taxable_discounts, 0) / 10) as what
         from s
         where total_amount <> charges or discount_amount <> discounts
            or final_amount <> total_amount - discount_amount + vat_amount
            or vat_amount <> greatest(taxable_charges - taxable_discounts, 0) / 10
            or final_amount % 10 <> 0",
    )
    .bind::<Text, _>(&m)
    .load(&mut conn)
    .await?;
    report
        .discrepancies
        .extend(bad.into_iter().map(Discrepancy::from));

    // (2) Each usage item's amount from its own snapshot.
    let items: Vec<UsageItem> = diesel::sql_query(
        // Only the snapshot's three numbers the rule needs: the JSON itself stays in the server.
        "select b.member_id, i.product_id, i.quantity, i.amount,
                coalesce((i.snapshot->>'free_allowance')::bigint, 0) as free_allowance,
                coalesce((i.snapshot->>'unit_price')::bigint, 0) as unit_price,
                coalesce((i.snapshot->>'per_units')::bigint, 1) as per_units
         from bill_item i join bill b on b.id = i.bill_id
         where b.billing_month = $1 and i.kind = 'charge' and i.snapshot ? 'usage_unit'",
    )
    .bind::<Text, _>(&m)
    .load(&mut conn)
    .await?;
    report.usage_items = items.len() as u64;
    let mut billed: HashMap<(i64, String), i64> = HashMap::with_capacity(items.len());
    for it in items {
        let (free, price, per) = (it.free_allowance, it.unit_price, it.per_units.max(1));
        let billable = if free < 0 {
            0
        } else {
            (it.quantity - free).max(0)
        };
        let expected = i64::try_from(i128::from(billable) * i128::from(price) / i128::from(per))
            .unwrap_or(i64::MAX);
        if expected != it.amount {
            report.discrepancies.push(Discrepancy {
                member_id: it.member_id,
                what: format!(
                    "{}: amount {} but the rule gives {expected}",
                    it.product_id, it.amount
                ),
            });
        }
        billed.insert((it.member_id, it.product_id), it.quantity);
    }

    // (3) Usage quantities against the usage topic.
    let catalogue = common.catalogue();
    let usage_topic = catalogue.name(&USAGE_RECORDS.spec);
    let quarantined: HashSet<(i32, i64)> = diesel::sql_query(
        "select source_partition as partition, source_offset as offset from dead_letter where source_topic = $1",
    )
    .bind::<Text, _>(&usage_topic)
    .load::<Quarantined>(&mut conn)
    .await?
    .into_iter()
    .map(|q| (q.partition, q.offset))
    .collect();
    let registry = Registry::new(&common.schema_registry_url)?;
    let product_decoder = Decoder::<Product>::new(registry.clone());
    let mut products: HashMap<String, Product> = HashMap::new();
    snapshot::read_topic(
        &common.kafka(),
        &group,
        &catalogue.name(&PRODUCTS.spec),
        async |r: &BorrowedMessage<'_>| {
            if let Ok(p) = product_decoder.decode(r.payload()).await {
                products.insert(p.product_id.clone(), p);
            }
            Ok::<(), OpsError>(())
        },
    )
    .await?;
    let usage_decoder = Decoder::<UsageRecord>::new(registry);
    let mut used: HashMap<(i64, String), i64> = HashMap::new();
    let mut seen: HashSet<(i64, u64)> = HashSet::new();
    let mut records = 0u64;
    snapshot::read_topic(
        &common.kafka(),
        &group,
        &usage_topic,
        async |r: &BorrowedMessage<'_>| {
            if quarantined.contains(&(r.partition(), r.offset())) {
                return Ok::<(), OpsError>(());
            }
            if let Ok(u) = usage_decoder.decode(r.payload()).await
                && u.billing_month == m
                && validate_usage(&products, &u.product_id, u.quantity).is_ok()
                // A repeat of an identity already counted: skipped by settlement when its
                // content is the same, quarantined (so excluded above) when it is not.
                && seen.insert(usage_identity(&u).0)
            {
                records += 1;
                *used.entry((u.member_id, u.product_id)).or_insert(0) += u.quantity;
            }
            Ok(())
        },
    )
    .await?;
    report.usage_records = records;
    for ((member, product), q) in &used {
        match billed.get(&(*member, product.clone())) {
            Some(b) if b == q => {}
            Some(b) => report.discrepancies.push(Discrepancy {
                member_id: *member,
                what: format!("{product}: billed quantity {b}, usage topic {q}"),
            }),
            None => report.discrepancies.push(Discrepancy {
                member_id: *member,
                what: format!("{product}: usage {q} on the topic but no bill item"),
            }),
        }
    }
    for ((member, product), b) in &billed {
        if !used.contains_key(&(*member, product.clone())) {
            report.discrepancies.push(Discrepancy {
                member_id: *member,
                what: format!("{product}: billed quantity {b} with no usage on the topic"),
            });
        }
    }
    report
        .discrepancies
        .sort_by(|a, b| (a.member_id, &a.what).cmp(&(b.member_id, &b.what)));
    Ok(report)
}
