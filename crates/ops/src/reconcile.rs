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
//!
//! Memory stays flat in the month's size: the items are streamed through a cursor, each side
//! of check (3) is a sorted list of 16-byte (member, product) quantities, and the topic is
//! read two partitions at a time, holding one partition's usage identities each. The SQL
//! checks, the items and the topic are read at once (1,000,000 members: 52.10 s and 756 MB
//! before, 25.18 s and 260 MB after; docs/benchmarks.md).

use std::{
    cmp::Ordering,
    collections::{HashMap, HashSet},
};

use billing_domain::{
    BillingMonth,
    rules::{usage_identity, validate_usage},
};
use billing_runtime::{
    CommonArgs,
    snapshot::{self, PartitionReader},
};
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

/// Recomputes `month` and returns what disagrees. The SQL checks, the items' stream and the
/// usage topic are read at once, on their own connections.
pub async fn reconcile(
    common: &CommonArgs,
    month: BillingMonth,
) -> Result<ReconcileReport, OpsError> {
    let m = month.to_string();
    let group = format!("{}reconcile-{}", common.topic_prefix, std::process::id());
    let registry = Registry::new(&common.schema_registry_url)?;
    let products = read_products(common, &registry, &group).await?;
    let checks = bill_checks(common, month);
    let items = usage_items(common, month, &products);
    let topic = topic_usage(common, &registry, &group, &m, &products);
    let ((bills, mut discrepancies), items, topic) = futures::try_join!(checks, items, topic)?;
    discrepancies.extend(items.discrepancies);
    discrepancies.extend(compare(items.billed, topic.used, &products));
    discrepancies.sort_by(|a, b| (a.member_id, &a.what).cmp(&(b.member_id, &b.what)));
    Ok(ReconcileReport {
        bills,
        usage_items: items.count,
        usage_records: topic.records,
        discrepancies,
    })
}

/// The month's bill count, and checks (0) and (1), in SQL.
async fn bill_checks(
    common: &CommonArgs,
    month: BillingMonth,
) -> Result<(u64, Vec<Discrepancy>), OpsError> {
    let m = month.to_string();
    let mut conn = billing_db::connect(&common.database_url).await?;
    let bills =
        diesel::sql_query("select count(*)::bigint as n from bill where billing_month = $1")
            .bind::<Text, _>(&m)
            .load::<Count>(&mut conn)
            .await?
            .pop()
            .map_or(0, |c| u64::try_from(c.n).unwrap_or(0));
    let mut report = Vec::new();

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
    report.extend(orphans.into_iter().map(Discrepancy::from));

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
    report.extend(bad.into_iter().map(Discrepancy::from));
    Ok((bills, report))
}

/// The catalogue as the usage topic is checked against it, with each product's index: a
/// (member, product) pair is one `u64` (`member << 16 | index`), so the month's millions of
/// usage pairs take 16 bytes each on either side.
struct Products {
    by_id: HashMap<String, Product>,
    index: HashMap<String, u16>,
    names: Vec<String>,
}

impl Products {
    fn key(&self, member: i64, product: &str) -> Option<u64> {
        let index = *self.index.get(product)?;
        let member = u64::try_from(member).ok().filter(|m| *m < 1 << 47)?;
        Some(member << 16 | u64::from(index))
    }

    /// The member and product of a key.
    fn split(&self, key: u64) -> (i64, &str) {
        let member = i64::try_from(key >> 16).unwrap_or(i64::MAX);
        let index = usize::try_from(key & 0xffff).unwrap_or(0);
        (member, &self.names[index])
    }
}

async fn read_products(
    common: &CommonArgs,
    registry: &Registry,
    group: &str,
) -> Result<Products, OpsError> {
    let decoder = Decoder::<Product>::new(registry.clone());
    let mut by_id: HashMap<String, Product> = HashMap::new();
    snapshot::read_topic(
        &common.kafka(),
        group,
        &common.catalogue().name(&PRODUCTS.spec),
        async |r: &BorrowedMessage<'_>| {
            if let Ok(p) = decoder.decode(r.payload()).await {
                by_id.insert(p.product_id.clone(), p);
            }
            Ok::<(), OpsError>(())
        },
    )
    .await?;
    let mut names: Vec<String> = by_id.keys().cloned().collect();
    names.sort_unstable();
    names.truncate(usize::from(u16::MAX));
    let index = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.clone(), u16::try_from(i).unwrap_or(u16::MAX)))
        .collect();
    Ok(Products {
        by_id,
        index,
        names,
    })
}

/// The month's usage items, as the bills say.
#[derive(Default)]
struct Billed {
    count: u64,
    /// (member, product) key and quantity, sorted by key, one entry per key.
    billed: Vec<(u64, i64)>,
    /// Items whose amount the rule does not give, or whose product is not in the catalogue.
    discrepancies: Vec<Discrepancy>,
}

/// Streams the month's usage items (a cursor over the items' primary-key range, so memory
/// stays one fetch deep) and checks each amount against its own snapshot (check 2).
async fn usage_items(
    common: &CommonArgs,
    month: BillingMonth,
    products: &Products,
) -> Result<Billed, OpsError> {
    use diesel_async::{AsyncConnection, AsyncPgConnection};
    let (first, last) = (
        billing_domain::rules::bill_id(month, 0),
        billing_domain::rules::bill_id(month, billing_domain::validate::MAX_MEMBER_ID),
    );
    // Only the snapshot's three numbers the rule needs: the JSON itself stays in the server.
    // Integers only, formatted here: a cursor's query takes no parameters.
    let declare = format!(
        "declare usage_items no scroll cursor for
         select i.bill_id - {first} as member_id, i.product_id, i.quantity, i.amount,
                coalesce((i.snapshot->>'free_allowance')::bigint, 0) as free_allowance,
                coalesce((i.snapshot->>'unit_price')::bigint, 0) as unit_price,
                coalesce((i.snapshot->>'per_units')::bigint, 1) as per_units
         from bill_item i
         where i.id between {} and {} and i.kind = 'charge' and i.snapshot ? 'usage_unit'",
        first * 100,
        last * 100 + 99
    );
    let mut conn = billing_db::connect(&common.database_url).await?;
    let mut out = conn
        .transaction::<_, OpsError, _>(async move |c: &mut AsyncPgConnection| {
            let mut out = Billed::default();
            diesel::sql_query(declare).execute(c).await?;
            loop {
                let rows: Vec<UsageItem> = diesel::sql_query("fetch 50000 from usage_items")
                    .load(c)
                    .await?;
                if rows.is_empty() {
                    return Ok(out);
                }
                for item in rows {
                    out.check(item, products);
                }
            }
        })
        .await?;
    out.billed.sort_unstable_by_key(|(key, _)| *key);
    out.billed = merge_sums(std::mem::take(&mut out.billed));
    Ok(out)
}

impl Billed {
    fn check(&mut self, it: UsageItem, products: &Products) {
        self.count += 1;
        let (free, price, per) = (it.free_allowance, it.unit_price, it.per_units.max(1));
        let billable = if free < 0 {
            0
        } else {
            (it.quantity - free).max(0)
        };
        let expected = i64::try_from(i128::from(billable) * i128::from(price) / i128::from(per))
            .unwrap_or(i64::MAX);
        if expected != it.amount {
            self.discrepancies.push(Discrepancy {
                member_id: it.member_id,
                what: format!(
                    "{}: amount {} but the rule gives {expected}",
                    it.product_id, it.amount
                ),
            });
        }
        match products.key(it.member_id, &it.product_id) {
            Some(key) => self.billed.push((key, it.quantity)),
            None => self.discrepancies.push(Discrepancy {
                member_id: it.member_id,
                what: format!(
                    "{}: billed quantity {} with no usage on the topic",
                    it.product_id, it.quantity
                ),
            }),
        }
    }
}

/// Sorted (key, quantity) pairs with each key's quantities summed into one entry.
fn merge_sums(sorted: Vec<(u64, i64)>) -> Vec<(u64, i64)> {
    let mut out: Vec<(u64, i64)> = Vec::with_capacity(sorted.len());
    for (key, q) in sorted {
        match out.last_mut() {
            Some((last, sum)) if *last == key => *sum = sum.saturating_add(q),
            _ => out.push((key, q)),
        }
    }
    out
}

/// The month's valid usage on the topic.
struct TopicUsage {
    records: u64,
    /// (member, product) key and quantity, sorted by key, one entry per key.
    used: Vec<(u64, i64)>,
}

/// Reads the usage topic two partitions at a time (check 3): records already quarantined
/// in `dead_letter` are excluded, and each usage id of a member is counted once per
/// partition, as settlement's per-partition tasks count it. Memory: one partition's
/// identities at a time, and 16 bytes per (member, product).
async fn topic_usage(
    common: &CommonArgs,
    registry: &Registry,
    group: &str,
    month: &str,
    products: &Products,
) -> Result<TopicUsage, OpsError> {
    use futures::{StreamExt, TryStreamExt};
    let kafka = common.kafka();
    let topic = common.catalogue().name(&USAGE_RECORDS.spec);
    let mut conn = billing_db::connect(&common.database_url).await?;
    let quarantined: HashSet<(i32, i64)> = diesel::sql_query(
        "select source_partition as partition, source_offset as offset from dead_letter where source_topic = $1",
    )
    .bind::<Text, _>(&topic)
    .load::<Quarantined>(&mut conn)
    .await?
    .into_iter()
    .map(|q| (q.partition, q.offset))
    .collect();
    let decoder = Decoder::<UsageRecord>::new(registry.clone());
    let ends = snapshot::capture(&kafka, group, std::slice::from_ref(&topic))?;
    let partitions: Vec<i32> = ends.keys().map(|(_, p)| *p).collect();
    let parts: Vec<(u64, Vec<(u64, i64)>)> = futures::stream::iter(partitions)
        .map(|p| {
            let (kafka, ends, topic, decoder, quarantined) =
                (&kafka, &ends, &topic, &decoder, &quarantined);
            async move {
                let Some(mut reader) = PartitionReader::open_in(kafka, group, ends, topic, p)?
                else {
                    return Ok::<_, OpsError>((0, Vec::new()));
                };
                let mut used: HashMap<u64, i64> = HashMap::new();
                let mut seen: HashSet<(i64, u64)> = HashSet::new();
                let mut records = 0u64;
                while let Some(r) = reader.next().await {
                    let r = r?;
                    if quarantined.contains(&(r.partition(), r.offset())) {
                        continue;
                    }
                    if let Ok(u) = decoder.decode(r.payload()).await
                        && u.billing_month == month
                        && validate_usage(&products.by_id, &u.product_id, u.quantity).is_ok()
                        && let Some(key) = products.key(u.member_id, &u.product_id)
                        // A repeat of an identity already counted: skipped by settlement when
                        // its content is the same, quarantined (so excluded above) when not.
                        && seen.insert(usage_identity(&u).0)
                    {
                        records += 1;
                        let q = used.entry(key).or_insert(0);
                        *q = q.saturating_add(u.quantity);
                    }
                }
                Ok((records, used.into_iter().collect()))
            }
        })
        .buffer_unordered(2)
        .try_collect()
        .await?;
    let records = parts.iter().map(|(n, _)| n).sum();
    let mut used: Vec<(u64, i64)> = parts.into_iter().flat_map(|(_, u)| u).collect();
    used.sort_unstable_by_key(|(key, _)| *key);
    Ok(TopicUsage {
        records,
        used: merge_sums(used),
    })
}

/// Walks the two sorted sides together: a quantity that differs, usage with no item, an item
/// with no usage.
fn compare(
    billed: Vec<(u64, i64)>,
    used: Vec<(u64, i64)>,
    products: &Products,
) -> Vec<Discrepancy> {
    let mut out = Vec::new();
    let mut note = |key: u64, what: &dyn Fn(&str) -> String| {
        let (member_id, product) = products.split(key);
        out.push(Discrepancy {
            member_id,
            what: what(product),
        });
    };
    let (mut b, mut u) = (billed.into_iter().peekable(), used.into_iter().peekable());
    loop {
        let order = match (b.peek(), u.peek()) {
            (None, None) => break,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some((bk, _)), Some((uk, _))) => bk.cmp(uk),
        };
        match order {
            Ordering::Equal => {
                if let (Some((key, bq)), Some((_, uq))) = (b.next(), u.next())
                    && bq != uq
                {
                    note(key, &|p| {
                        format!("{p}: billed quantity {bq}, usage topic {uq}")
                    });
                }
            }
            Ordering::Less => {
                if let Some((key, bq)) = b.next() {
                    note(key, &|p| {
                        format!("{p}: billed quantity {bq} with no usage on the topic")
                    });
                }
            }
            Ordering::Greater => {
                if let Some((key, uq)) = u.next() {
                    note(key, &|p| {
                        format!("{p}: usage {uq} on the topic but no bill item")
                    });
                }
            }
        }
    }
    out
}
