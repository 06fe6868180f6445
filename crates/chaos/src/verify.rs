//! What a chaos run must leave behind, computed without the platform (the rules and the
//! simulated provider's seeded draws), and the checks of what it did leave.

use std::collections::{BTreeMap, HashMap, HashSet};

use billing_domain::{BillingMonth, generator::Generator, products, rules};
use billing_messaging::{SimulatedGateway, hours::Window};
use chrono::{DateTime, NaiveTime, Utc};
use chrono_tz::Tz;
use diesel::{
    QueryableByName,
    sql_types::{BigInt, Int4, Nullable, Text, Time, Timestamptz},
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use billing_runtime::Clock;

use crate::hostile::Injected;

/// A bill's delivery rows: (channel, status, attempts), by channel.
pub type History = Vec<(String, String, i32)>;

/// What a run without kills gives.
pub struct Expected {
    /// Bill id → (member id, final amount, items).
    pub bills: BTreeMap<i64, (i64, i64, i64)>,
    pub histories: BTreeMap<i64, History>,
    /// Member id → do-not-disturb window.
    pub dnd: HashMap<i64, Window>,
}

/// The month's bills by the rules, and each bill's delivery history by the provider's draws.
pub fn expected(
    g: &Generator,
    month: BillingMonth,
    members: i64,
    tz: Tz,
    gateway: &SimulatedGateway,
    attempts: i32,
) -> anyhow::Result<Expected> {
    let catalogue = products::catalogue(g.updated_at())
        .into_iter()
        .map(|p| (p.product_id.clone(), p))
        .collect();
    let settled_at = month.bounds(tz).1.timestamp_millis();
    let mut e = Expected {
        bills: BTreeMap::new(),
        histories: BTreeMap::new(),
        dnd: HashMap::new(),
    };
    for id in 1..=members {
        let m = g.member(id);
        if !rules::member_in_month(&m, month) {
            continue;
        }
        let mut usage = BTreeMap::new();
        for u in g.usage(id) {
            *usage.entry(u.product_id).or_insert(0) += u.quantity;
        }
        let b = rules::compute_bill(month, &m, &catalogue, &usage, settled_at)?;
        let items = i64::try_from(b.items.len())?;
        e.bills.insert(b.bill_id, (id, b.final_amount, items));
        let invalid = m.email.ends_with(".invalid");
        e.histories.insert(
            b.bill_id,
            gateway.calm_history(b.bill_id, invalid, attempts),
        );
        if let (Some(s), Some(t)) = (m.dnd_start_minute, m.dnd_end_minute) {
            e.dnd.insert(id, window(s, t, tz));
        }
    }
    Ok(e)
}

fn window(start: i32, end: i32, tz: Tz) -> Window {
    let at = |m: i32| {
        let m = u32::try_from(m).unwrap_or(0);
        NaiveTime::from_hms_opt(m / 60, m % 60, 0).unwrap_or(NaiveTime::MIN)
    };
    Window {
        start: at(start),
        end: at(end),
        tz,
    }
}

#[derive(QueryableByName)]
struct BillRow {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = BigInt)]
    member_id: i64,
    #[diesel(sql_type = BigInt)]
    final_amount: i64,
    #[diesel(sql_type = BigInt)]
    items: i64,
}

#[derive(QueryableByName)]
struct DeliveryRow {
    #[diesel(sql_type = BigInt)]
    bill_id: i64,
    #[diesel(sql_type = BigInt)]
    member_id: i64,
    #[diesel(sql_type = Text)]
    channel: String,
    #[diesel(sql_type = Text)]
    status: String,
    #[diesel(sql_type = Int4)]
    attempts: i32,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    sent_at: Option<DateTime<Utc>>,
}

#[derive(QueryableByName)]
struct N {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct Quiet {
    #[diesel(sql_type = Time)]
    start_time: NaiveTime,
    #[diesel(sql_type = Time)]
    end_time: NaiveTime,
}

/// The figures of a run and every check that failed.
#[derive(Debug, Default)]
pub struct Verdict {
    pub bills: usize,
    pub sent_email: usize,
    pub sent_sms: usize,
    pub dead: usize,
    /// Members without their bill, or bills not finished (neither sent nor dead).
    pub lost: usize,
    /// Bills loaded twice, or a bill accepted by the provider more than once.
    pub duplicates: i64,
    /// Submissions the provider de-duplicated by key (the same message submitted again
    /// after it had been accepted).
    pub resubmissions: i64,
    pub hostile_lettered: usize,
    /// The longest time, on the simulated clock, from a send's decision (`sent_at`) to the
    /// provider's recorded acceptance, seconds.
    pub acceptance_lag_max: i64,
    pub failures: Vec<String>,
}

async fn count(conn: &mut AsyncPgConnection, sql: &str) -> anyhow::Result<i64> {
    Ok(diesel::sql_query(sql).get_result::<N>(conn).await?.n)
}

/// Checks the run's tables against `e` and the hostile records against the dead letters.
pub async fn verify(
    conn: &mut AsyncPgConnection,
    e: &Expected,
    injected: &[Injected],
    tz: Tz,
    clock: &Clock,
) -> anyhow::Result<Verdict> {
    let mut v = Verdict::default();
    check_bills(conn, e, &mut v).await?;
    check_deliveries(conn, e, tz, &mut v).await?;
    check_provider(conn, &mut v).await?;
    check_sent_at(conn, clock, &mut v).await?;
    check_letters(conn, injected, &mut v).await?;
    Ok(v)
}

async fn check_bills(
    conn: &mut AsyncPgConnection,
    e: &Expected,
    v: &mut Verdict,
) -> anyhow::Result<()> {
    let rows: Vec<BillRow> = diesel::sql_query(
        "select b.id, b.member_id, b.final_amount, count(i.id)::bigint as items
         from bill b left join bill_item i on i.bill_id = b.id group by b.id",
    )
    .load(conn)
    .await?;
    v.bills = rows.len();
    let actual: BTreeMap<i64, (i64, i64, i64)> = rows
        .into_iter()
        .map(|r| (r.id, (r.member_id, r.final_amount, r.items)))
        .collect();
    v.lost += e.bills.keys().filter(|b| !actual.contains_key(b)).count();
    for (id, want) in &e.bills {
        if let Some(got) = actual.get(id).filter(|got| *got != want) {
            v.failures.push(format!(
                "bill {id}: (member, final, items) {got:?}, the rules say {want:?}"
            ));
        }
    }
    let extra: Vec<&i64> = actual.keys().filter(|b| !e.bills.contains_key(b)).collect();
    if !extra.is_empty() {
        v.failures.push(format!(
            "{} bills nobody should have: {extra:?}",
            extra.len()
        ));
    }
    Ok(())
}

async fn check_deliveries(
    conn: &mut AsyncPgConnection,
    e: &Expected,
    tz: Tz,
    v: &mut Verdict,
) -> anyhow::Result<()> {
    let rows: Vec<DeliveryRow> = diesel::sql_query(
        "select d.bill_id, b.member_id, d.channel, d.status, d.attempts, d.sent_at
         from delivery d join bill b on b.id = d.bill_id order by d.bill_id, d.channel",
    )
    .load(conn)
    .await?;
    let quiet: Quiet =
        diesel::sql_query("select start_time, end_time from quiet_hours where id = 1")
            .get_result(conn)
            .await?;
    let quiet = Window {
        start: quiet.start_time,
        end: quiet.end_time,
        tz,
    };
    let mut actual: BTreeMap<i64, History> = BTreeMap::new();
    let mut in_window = 0;
    for r in &rows {
        match (r.status.as_str(), r.channel.as_str()) {
            ("sent", "email") => v.sent_email += 1,
            ("sent", _) => v.sent_sms += 1,
            ("dead", _) => v.dead += 1,
            _ => {}
        }
        if let Some(at) = r.sent_at {
            let dnd = e.dnd.get(&r.member_id);
            in_window += usize::from(quiet.contains(at) || dnd.is_some_and(|w| w.contains(at)));
        }
        actual.entry(r.bill_id).or_default().push((
            r.channel.clone(),
            r.status.clone(),
            r.attempts,
        ));
    }
    if in_window > 0 {
        v.failures.push(format!(
            "{in_window} messages sent in quiet hours or a member's window"
        ));
    }
    let finished = |h: &History| h.iter().any(|(_, s, _)| s == "sent" || s == "dead");
    v.lost += e
        .bills
        .keys()
        .filter(|b| !actual.get(*b).is_some_and(finished))
        .count();
    let differ: Vec<&i64> = e
        .histories
        .iter()
        .filter(|(b, h)| actual.get(*b).is_some_and(|a| a != *h))
        .map(|(b, _)| b)
        .collect();
    if let Some(first) = <[&i64]>::first(&differ) {
        v.failures.push(format!(
            "{} bills' delivery history differs from the run without kills; bill {first}: {:?}, expected {:?}",
            differ.len(),
            actual.get(first),
            e.histories.get(first)
        ));
    }
    Ok(())
}

/// Counted at the provider: one acceptance per sent delivery, none for another.
async fn check_provider(conn: &mut AsyncPgConnection, v: &mut Verdict) -> anyhow::Result<()> {
    let accepted = count(conn, "select count(*)::bigint as n from gateway_mailbox").await?;
    let sent = i64::try_from(v.sent_email + v.sent_sms)?;
    if accepted != sent {
        v.failures.push(format!(
            "the provider accepted {accepted} messages, `delivery` records {sent} sent"
        ));
    }
    v.duplicates = count(
        conn,
        "select count(*)::bigint as n from (select split_part(idempotency_key, '-', 2)
         from gateway_mailbox group by 1 having count(*) > 1) t",
    )
    .await?;
    v.resubmissions = count(
        conn,
        "select coalesce(sum(resubmissions), 0)::bigint as n from gateway_mailbox",
    )
    .await?;
    let unmatched = count(
        conn,
        "select count(*)::bigint as n from delivery d where d.status = 'sent' and not exists
         (select 1 from gateway_mailbox g where g.idempotency_key = d.channel || '-' || d.bill_id)",
    )
    .await?;
    if unmatched > 0 {
        v.failures.push(format!(
            "{unmatched} sent deliveries the provider never accepted"
        ));
    }
    let orphans = count(
        conn,
        "select count(*)::bigint as n from delivery s where s.channel = 'sms' and not exists
         (select 1 from delivery e where e.bill_id = s.bill_id and e.channel = 'email'
          and e.status = 'failed' and e.handover = 'give-up')",
    )
    .await?;
    if orphans > 0 {
        v.failures.push(format!(
            "{orphans} SMS deliveries without a recorded email give-up"
        ));
    }
    Ok(())
}

/// `sent_at` is the instant the send was decided (simulated clock); the provider recorded its
/// acceptance in real time. For every message accepted once, the decision must not come after
/// the acceptance (read on the same clock, with a minute's slack for the mailbox's batching):
/// a later `sent_at` would belong to another attempt than the one that went out.
async fn check_sent_at(
    conn: &mut AsyncPgConnection,
    clock: &Clock,
    v: &mut Verdict,
) -> anyhow::Result<()> {
    let Clock::Simulated {
        start,
        speed,
        anchor,
    } = *clock
    else {
        return Ok(());
    };
    let late: N = diesel::sql_query(
        "select count(*)::bigint as n from delivery d
         join gateway_mailbox g on g.idempotency_key = d.channel || '-' || d.bill_id
         where d.status = 'sent' and g.resubmissions = 0
           and d.sent_at > $1 + (g.accepted_at - $2) * $3 + interval '1 minute'",
    )
    .bind::<Timestamptz, _>(start)
    .bind::<Timestamptz, _>(anchor)
    .bind::<diesel::sql_types::Double, _>(speed)
    .get_result(conn)
    .await?;
    if late.n > 0 {
        v.failures.push(format!(
            "{} sent deliveries record a sent_at after the provider accepted them",
            late.n
        ));
    }
    let lead: N = diesel::sql_query(
        "select coalesce(max(extract(epoch from $1 + (g.accepted_at - $2) * $3 - d.sent_at)), 0)::bigint as n
         from delivery d join gateway_mailbox g on g.idempotency_key = d.channel || '-' || d.bill_id
         where d.status = 'sent' and g.resubmissions = 0",
    )
    .bind::<Timestamptz, _>(start)
    .bind::<Timestamptz, _>(anchor)
    .bind::<diesel::sql_types::Double, _>(speed)
    .get_result(conn)
    .await?;
    v.acceptance_lag_max = lead.n;
    Ok(())
}

async fn check_letters(
    conn: &mut AsyncPgConnection,
    injected: &[Injected],
    v: &mut Verdict,
) -> anyhow::Result<()> {
    let per_dead = count(
        conn,
        "select count(*)::bigint as n from (select d.bill_id from delivery d
         left join dead_letter l on l.stage = 'undeliverable'
           and l.reason like 'bill ' || d.bill_id || ' undeliverable%'
         where d.status = 'dead' group by d.bill_id having count(l.id) <> 1) t",
    )
    .await?;
    let letters = count(
        conn,
        "select count(*)::bigint as n from dead_letter where stage = 'undeliverable'",
    )
    .await?;
    if per_dead > 0 || letters != i64::try_from(v.dead)? {
        v.failures.push(format!(
            "{letters} undeliverable letters for {} dead bills ({per_dead} bills without exactly one)",
            v.dead
        ));
    }
    #[derive(QueryableByName)]
    struct Origin {
        #[diesel(sql_type = Text)]
        source_topic: String,
        #[diesel(sql_type = Int4)]
        source_partition: i32,
        #[diesel(sql_type = BigInt)]
        source_offset: i64,
    }
    let origins: HashSet<(String, i32, i64)> =
        diesel::sql_query("select source_topic, source_partition, source_offset from dead_letter")
            .load::<Origin>(conn)
            .await?
            .into_iter()
            .map(|o| (o.source_topic, o.source_partition, o.source_offset))
            .collect();
    for i in injected {
        if origins.contains(&(i.topic.clone(), i.partition, i.offset)) {
            v.hostile_lettered += 1;
        } else {
            v.failures.push(format!(
                "hostile record never a dead letter: {} ({}[{}]@{})",
                i.what, i.topic, i.partition, i.offset
            ));
        }
    }
    Ok(())
}
