//! Where the month stands, and "did member 123 get their bill?": read-only views for the
//! console (and anyone with the crate).

use billing_runtime::CommonArgs;
use chrono::{DateTime, NaiveTime, Utc};
use diesel::{
    OptionalExtension, QueryableByName,
    sql_types::{BigInt, Integer, Nullable, SmallInt, Text, Time, Timestamptz},
};
use diesel_async::RunQueryDsl;

use crate::OpsError;

/// One billing month's figures.
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName)]
pub struct Month {
    #[diesel(sql_type = Text)]
    pub billing_month: String,
    #[diesel(sql_type = BigInt)]
    pub bills: i64,
    /// Sum of final amounts, won.
    #[diesel(sql_type = BigInt)]
    pub final_amount: i64,
    #[diesel(sql_type = BigInt)]
    pub dispatched: i64,
    #[diesel(sql_type = BigInt)]
    pub sent_email: i64,
    #[diesel(sql_type = BigInt)]
    pub sent_sms: i64,
    /// Bills whose last attempt failed and that wait for a retry.
    #[diesel(sql_type = BigInt)]
    pub failed: i64,
    /// Bills undeliverable on every channel.
    #[diesel(sql_type = BigInt)]
    pub dead: i64,
    /// Dispatched, neither sent nor dead yet.
    #[diesel(sql_type = BigInt)]
    pub pending: i64,
}

/// Every billing month, newest first.
pub async fn months(common: &CommonArgs) -> Result<Vec<Month>, OpsError> {
    let mut conn = billing_db::connect(&common.database_url).await?;
    Ok(diesel::sql_query(
        "with per_bill as (
           select b.billing_month, b.final_amount, d.bill_id is not null as dispatched,
                  bool_or(v.status = 'sent' and v.channel = 'email') as sent_email,
                  bool_or(v.status = 'sent' and v.channel = 'sms') as sent_sms,
                  bool_or(v.status = 'failed') as failed,
                  bool_or(v.status = 'dead' and v.channel = 'sms') as dead
           from bill b
           left join dispatch d on d.bill_id = b.id
           left join delivery v on v.bill_id = b.id
           group by b.id, b.billing_month, b.final_amount, d.bill_id)
         select billing_month, count(*)::bigint as bills,
                coalesce(sum(final_amount), 0)::bigint as final_amount,
                count(*) filter (where dispatched)::bigint as dispatched,
                count(*) filter (where sent_email)::bigint as sent_email,
                count(*) filter (where sent_sms)::bigint as sent_sms,
                count(*) filter (where failed and not coalesce(sent_email or sent_sms or dead, false))::bigint as failed,
                count(*) filter (where dead and not coalesce(sent_email or sent_sms, false))::bigint as dead,
                count(*) filter (where dispatched and not coalesce(sent_email or sent_sms or dead, false))::bigint as pending
         from per_bill group by billing_month order by billing_month desc",
    )
    .load(&mut conn)
    .await?)
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// Members on file.
pub async fn member_count(common: &CommonArgs) -> Result<i64, OpsError> {
    let mut conn = billing_db::connect(&common.database_url).await?;
    let c: Count = diesel::sql_query("select count(*)::bigint as n from member")
        .get_result(&mut conn)
        .await?;
    Ok(c.n)
}

/// A member as the console shows it (personal data unmasked only on the member page).
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName)]
pub struct MemberView {
    #[diesel(sql_type = BigInt)]
    pub id: i64,
    #[diesel(sql_type = Text)]
    pub name: String,
    #[diesel(sql_type = Text)]
    pub email: String,
    #[diesel(sql_type = Text)]
    pub phone: String,
    #[diesel(sql_type = SmallInt)]
    pub delivery_day: i16,
    #[diesel(sql_type = Nullable<Time>)]
    pub dnd_start: Option<NaiveTime>,
    #[diesel(sql_type = Nullable<Time>)]
    pub dnd_end: Option<NaiveTime>,
    #[diesel(sql_type = Text)]
    pub plan_id: String,
}

/// One bill of a member, with its items and every delivery row.
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName)]
pub struct BillLine {
    #[diesel(sql_type = BigInt)]
    pub id: i64,
    #[diesel(sql_type = Text)]
    pub billing_month: String,
    #[diesel(sql_type = BigInt)]
    pub final_amount: i64,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub dispatched_at: Option<DateTime<Utc>>,
}

/// One item of a bill.
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName)]
pub struct ItemLine {
    #[diesel(sql_type = BigInt)]
    pub bill_id: i64,
    #[diesel(sql_type = Text)]
    pub kind: String,
    #[diesel(sql_type = Text)]
    pub description: String,
    #[diesel(sql_type = BigInt)]
    pub quantity: i64,
    #[diesel(sql_type = BigInt)]
    pub amount: i64,
}

/// One delivery row (a channel's state for a bill).
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName)]
pub struct DeliveryLine {
    #[diesel(sql_type = BigInt)]
    pub bill_id: i64,
    #[diesel(sql_type = Text)]
    pub channel: String,
    #[diesel(sql_type = Text)]
    pub status: String,
    #[diesel(sql_type = Integer)]
    pub attempts: i32,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub sent_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Text>)]
    pub last_error: Option<String>,
}

/// Everything about one member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberHistory {
    pub member: MemberView,
    pub bills: Vec<BillLine>,
    pub items: Vec<ItemLine>,
    pub deliveries: Vec<DeliveryLine>,
}

/// Member `id` with their bills (newest first), items and deliveries.
pub async fn member(common: &CommonArgs, id: i64) -> Result<MemberHistory, OpsError> {
    let mut conn = billing_db::connect(&common.database_url).await?;
    let member: MemberView = diesel::sql_query(
        "select id, name, email, phone, delivery_day, dnd_start, dnd_end, plan_id from member where id = $1",
    )
    .bind::<BigInt, _>(id)
    .get_result(&mut conn)
    .await
    .optional()?
    .ok_or_else(|| OpsError::NotFound(format!("no member {id}")))?;
    let bills = diesel::sql_query(
        "select b.id, b.billing_month, b.final_amount, d.requested_at as dispatched_at
         from bill b left join dispatch d on d.bill_id = b.id
         where b.member_id = $1 order by b.billing_month desc",
    )
    .bind::<BigInt, _>(id)
    .load(&mut conn)
    .await?;
    let items = diesel::sql_query(
        "select i.bill_id, i.kind, i.description, i.quantity, i.amount
         from bill_item i join bill b on b.id = i.bill_id where b.member_id = $1 order by i.id",
    )
    .bind::<BigInt, _>(id)
    .load(&mut conn)
    .await?;
    let deliveries = diesel::sql_query(
        "select v.bill_id, v.channel, v.status, v.attempts, v.sent_at, v.last_error
         from delivery v join bill b on b.id = v.bill_id where b.member_id = $1
         order by v.bill_id, v.channel",
    )
    .bind::<BigInt, _>(id)
    .load(&mut conn)
    .await?;
    Ok(MemberHistory {
        member,
        bills,
        items,
        deliveries,
    })
}

/// A processor's consumer group as the broker sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupState {
    pub group: String,
    /// The broker's word for it (`Stable`, `Empty`, `PreparingRebalance`, ...), or why it
    /// could not be asked.
    pub state: String,
    /// Instances in the group now.
    pub members: usize,
    /// Records on its topics not yet committed past (high watermark minus committed offset).
    pub lag: i64,
    /// The topics it has committed offsets on.
    pub topics: Vec<String>,
}

/// The long-running processors' groups (settlement uses a group per run and is not listed).
pub const GROUPS: [&str; 4] = ["bill-sink", "dlq", "email", "sms"];

/// The state, size and lag of every processor group, asked of the broker (blocking calls,
/// each with a short timeout; run off the async threads).
pub async fn groups(common: &CommonArgs) -> Result<Vec<GroupState>, OpsError> {
    let common = common.clone();
    tokio::task::spawn_blocking(move || groups_blocking(&common))
        .await
        .map_err(|e| OpsError::Stack(e.to_string()))?
}

fn groups_blocking(common: &CommonArgs) -> Result<Vec<GroupState>, OpsError> {
    use rdkafka::{
        Offset, TopicPartitionList,
        consumer::{BaseConsumer, Consumer},
    };
    let timeout = std::time::Duration::from_secs(2);
    let catalogue = common.catalogue();
    let topics: Vec<String> = billing_schema::catalogue::ALL
        .iter()
        .map(|s| catalogue.name(s))
        .collect();
    let mut out = Vec::new();
    let mut ends = None;
    for name in GROUPS {
        let group = format!("{}{name}", common.topic_prefix);
        let consumer: BaseConsumer = common.kafka().consumer_config(&group).create()?;
        let ends = match &ends {
            Some(e) => e,
            None => ends.insert(billing_runtime::consumer::end_offsets(&consumer, &topics)?),
        };
        let (state, members) = match consumer.fetch_group_list(Some(&group), timeout) {
            Ok(list) => list
                .groups()
                .first()
                .map_or(("no such group".to_string(), 0), |g| {
                    (g.state().to_string(), g.members().len())
                }),
            Err(e) => (format!("cannot ask: {e}"), 0),
        };
        let mut tpl = TopicPartitionList::new();
        for (t, p) in ends.keys() {
            tpl.add_partition(t, *p);
        }
        let committed = consumer.committed_offsets(tpl, timeout)?;
        let mut lag = 0;
        let mut group_topics = std::collections::BTreeSet::new();
        for el in committed.elements() {
            if let Offset::Offset(o) = el.offset()
                && let Some((_, high)) = ends.get(&(el.topic().to_string(), el.partition()))
            {
                lag += (high - o).max(0);
                group_topics.insert(el.topic().to_string());
            }
        }
        out.push(GroupState {
            group,
            state,
            members,
            lag,
            topics: group_topics.into_iter().collect(),
        });
    }
    Ok(out)
}
