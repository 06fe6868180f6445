//! Dispatch passes over real PostgreSQL, broker and registry, on an injected clock.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{collections::HashSet, time::Duration};

use billing_dispatch::{
    Drill, PassSummary, Scope, Trigger, reservation, run_pass, run_pass_drill, run_pass_interrupted,
};
use billing_schema::{Decoder, EmailRequest, catalogue::EMAIL_REQUESTS};
use billing_testkit::{TestEnv, kst};
use diesel::{QueryableByName, sql_types::Text};
use diesel_async::{AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};

fn bill_id(member: i64) -> i64 {
    2_026_100_000_000_000 + member
}

/// (member id, delivery day, do-not-disturb window).
type MemberSpec = (i64, i32, Option<(&'static str, &'static str)>);

fn pass(selected: u64, held: u64, published: u64) -> PassSummary {
    PassSummary {
        quiet_hours: false,
        selected,
        held,
        published,
        reservations_fired: 0,
    }
}

#[derive(QueryableByName)]
struct TriggerRow {
    #[diesel(sql_type = Text)]
    trigger: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatch_picks_the_right_bills_at_the_right_time_once() {
    // Given October's bills, delivered in November on each member's day
    let env = TestEnv::new().await;
    let mut common = env.common.clone();
    common.database_url = env.database().await;
    let mut conn = billing_db::connect(&common.database_url).await.unwrap();
    let members: [MemberSpec; 8] = [
        (1, 24, None),                     // due today
        (2, 25, None),                     // due tomorrow
        (3, 31, None),                     // day 31 in a 30-day month: the 30th
        (4, 10, None),                     // day passed without a dispatch: caught up
        (5, 24, Some(("22:00", "09:30"))), // window crossing midnight
        (6, 24, Some(("09:00", "12:00"))), // window within the day
        (8, 28, None),                     // sent early by a reservation
        (9, 28, Some(("12:00", "14:00"))), // in the reservation, but in its window then
    ];
    let mut sql = String::new();
    for (id, day, dnd) in members {
        let (s, e) = dnd.map_or(("null".to_string(), "null".to_string()), |(s, e)| {
            (format!("'{s}'"), format!("'{e}'"))
        });
        sql += &format!(
            "insert into member values ({id}, 'm{id}', 'm{id}@example.kr', '+8210{id:08}', {day}, {s}, {e}, 'plan-5g-slim', now());
             insert into bill (id, member_id, billing_month, total_amount, discount_amount, vat_amount, final_amount, settled_at)
             values ({b}, {id}, '2026-10', 55000, 0, 5500, 60500, '2026-10-31T15:00:00Z');",
            b = bill_id(id)
        );
    }
    conn.batch_execute(&sql).await.unwrap();

    // When a pass runs inside the system quiet hours (21:00-08:00 by default)
    let quiet = run_pass(&common, kst("2026-11-24T06:00:00"), Trigger::Schedule)
        .await
        .unwrap();
    // Then nothing is selected and the four due bills are held
    assert_eq!(
        quiet,
        PassSummary {
            quiet_hours: true,
            held: 4,
            ..PassSummary::default()
        }
    );

    // When the operator moves quiet hours to 02:00-05:00, and the process dies at nine
    // between committing its outbox rows and publishing them
    conn.batch_execute(
        "update quiet_hours set start_time = '02:00', end_time = '05:00' where id = 1",
    )
    .await
    .unwrap();
    let crashed = run_pass_interrupted(&common, kst("2026-11-24T09:00:00"), Trigger::Schedule)
        .await
        .unwrap();
    let restarted = run_pass(&common, kst("2026-11-24T09:00:00"), Trigger::Schedule)
        .await
        .unwrap();
    let again = run_pass(&common, kst("2026-11-24T09:00:00"), Trigger::Schedule)
        .await
        .unwrap();
    // Then members 1 and 4 are selected once and published by the pass after the crash, 5
    // and 6 wait for their windows, and a second pass at the same instant publishes nothing
    assert_eq!(crashed, pass(2, 2, 0));
    assert_eq!(restarted, pass(0, 2, 2));
    assert_eq!(again, pass(0, 2, 0));
    let at_ten = run_pass(&common, kst("2026-11-24T10:00:00"), Trigger::Schedule)
        .await
        .unwrap();
    assert_eq!(
        at_ten,
        pass(1, 1, 1),
        "the window crossing midnight closed at 09:30"
    );

    // When the operator reserves members 8 and 9 for noon, and the next passes run
    let reserved = reservation::reserve(
        &mut conn,
        kst("2026-11-24T12:00:00"),
        Scope {
            billing_month: None,
            member_ids: Some(vec![8, 9]),
        },
        Some("customer asked".into()),
    )
    .await
    .unwrap();
    let before_noon = run_pass(&common, kst("2026-11-24T11:59:00"), Trigger::Schedule)
        .await
        .unwrap();
    let fired = run_pass(&common, kst("2026-11-24T12:30:00"), Trigger::Reservation)
        .await
        .unwrap();
    let by_operator = billing_ops::dispatch::dispatch(&common, Some(kst("2026-11-24T14:30:00")))
        .await
        .unwrap();
    // Then it fires once, at the first pass after noon: member 8 goes with member 6 (whose
    // window closed at noon), member 9 waits for the end of its window
    assert_eq!(before_noon, pass(0, 1, 0));
    assert_eq!(
        fired,
        PassSummary {
            reservations_fired: 1,
            ..pass(2, 1, 2)
        }
    );
    assert_eq!(by_operator, pass(1, 0, 1), "member 9 after 14:00");
    let all = reservation::list(&mut conn, true).await.unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].id, reserved.id);
    assert_eq!(all[0].fired_at, Some(kst("2026-11-24T12:30:00")));
    assert!(
        reservation::list(&mut conn, false)
            .await
            .unwrap()
            .is_empty()
    );

    // And day 25 is caught up on the 30th, with day 31 going out on the 30th too
    let on_the_30th = run_pass(&common, kst("2026-11-30T10:00:00"), Trigger::Schedule)
        .await
        .unwrap();
    let later = run_pass(&common, kst("2026-12-01T10:00:00"), Trigger::Schedule)
        .await
        .unwrap();
    assert_eq!(on_the_30th, pass(2, 0, 2));
    assert_eq!(later, pass(0, 0, 0));

    // And every pass is on record with its trigger
    let triggers: Vec<TriggerRow> =
        diesel::sql_query("select trigger from dispatch_pass order by id")
            .load(&mut conn)
            .await
            .unwrap();
    let triggers: Vec<&str> = triggers.iter().map(|t| t.trigger.as_str()).collect();
    assert_eq!(
        triggers,
        [
            "schedule",
            "schedule",
            "schedule",
            "schedule",
            "schedule",
            "schedule",
            "reservation",
            "operator",
            "schedule",
            "schedule"
        ]
    );

    // And the topic holds exactly one request per bill
    let topic = env.topic(&EMAIL_REQUESTS.spec);
    assert_eq!(env.record_count(&topic).await, 8);
    let read = env.read(&topic, 8, Duration::from_secs(10)).await;
    assert_eq!(read.len(), 8);
    let decoder = Decoder::<EmailRequest>::new(env.registry.clone());
    let mut bills = HashSet::new();
    for r in &read {
        let req: EmailRequest = decoder.decode(r.payload.as_deref()).await.unwrap();
        assert_eq!(req.delivery_id, format!("email-{}", req.bill_id));
        assert_eq!(r.key.as_deref(), Some(req.member_id.to_string().as_bytes()));
        assert_eq!((req.attempt, req.billing_month.as_str()), (0, "2026-10"));
        assert!(
            bills.insert(req.bill_id),
            "bill {} requested twice",
            req.bill_id
        );
    }
    assert_eq!(
        bills,
        members.iter().map(|(id, _, _)| bill_id(*id)).collect()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn neither_the_selection_nor_a_preview_rescans_the_outbox() {
    // Given an outbox whose statistics say it is empty (analyzed while empty) and a month of
    // bills, the kind of statistics that made the planner rescan `dispatch` once per bill
    let env = TestEnv::new().await;
    let mut common = env.common.clone();
    common.database_url = env.database().await;
    let mut conn = billing_db::connect(&common.database_url).await.unwrap();
    members_with_bills(&mut conn, 20_000, &[202_610]).await;
    conn.batch_execute("analyze member; analyze bill; analyze dispatch;")
        .await
        .unwrap();

    // When the selection and a preview are planned as a pass and a preview plan them
    let plan = billing_dispatch::explain_selection(&common, kst("2026-11-30T10:00:00"))
        .await
        .unwrap();

    // Then each reads `dispatch` once (hashed or merged), never inside a nested loop
    let reads = plan
        .lines()
        .filter(|l| l.contains(" on dispatch ") && !l.contains("Insert on"))
        .count();
    assert_eq!(reads, 2, "both plans read dispatch:\n{plan}");
    assert!(!plan.contains("Nested Loop"), "a nested loop:\n{plan}");
}

/// Members `1..=members` (delivery days 1 to 28, no window), each with a bill of every month
/// in `months` (`yyyymm`).
async fn members_with_bills(conn: &mut AsyncPgConnection, members: i64, months: &[i64]) {
    let months: Vec<String> = months.iter().map(i64::to_string).collect();
    conn.batch_execute(&format!(
        "insert into member
           select i, 'm' || i, 'm' || i || '@example.kr', '+8210' || lpad(i::text, 8, '0'),
                  1 + i % 28, null, null, 'plan-5g-slim', now()
           from generate_series(1, {members}) i;
         insert into bill (id, member_id, billing_month, total_amount, discount_amount,
                           vat_amount, final_amount, settled_at)
           select m * 10000000000 + i, i, to_char(to_date(m::text, 'YYYYMM'), 'YYYY-MM'),
                  55000, 0, 5500, 60500, '2026-10-31T15:00:00Z'
           from generate_series(1, {members}) i, unnest(array[{}]::bigint[]) m;",
        months.join(", ")
    ))
    .await
    .unwrap();
}

#[derive(QueryableByName)]
struct OutboxState {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    open: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    outbox: i64,
}

/// Passes still open, and rows in the outbox.
async fn outbox_state(conn: &mut AsyncPgConnection) -> (i64, i64) {
    let state: Vec<OutboxState> = diesel::sql_query(
        "select (select count(*) from dispatch_pass where completed_at is null) as open,
                (select count(*) from dispatch) as outbox",
    )
    .load(conn)
    .await
    .unwrap();
    (state[0].open, state[0].outbox)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_that_dies_between_chunks_loses_and_repeats_nothing() {
    // Given September's and October's bills of 40 members, all due by the end of November
    let env = TestEnv::new().await;
    let mut common = env.common.clone();
    common.database_url = env.database().await;
    let mut conn = billing_db::connect(&common.database_url).await.unwrap();
    members_with_bills(&mut conn, 40, &[202_609, 202_610]).await;
    let now = kst("2026-11-30T10:00:00");

    // When a pass in chunks of 7 members (12 chunks over the two months) dies once three
    // chunks are published, and the next pass runs in production's chunks
    let drill = Drill {
        chunk_members: 7,
        crash_after_chunks: Some(3),
    };
    let crashed = run_pass_drill(&common, now, Trigger::Schedule, drill)
        .await
        .unwrap();
    let (open, outbox) = outbox_state(&mut conn).await;
    let restarted = run_pass(&common, now, Trigger::Schedule).await.unwrap();

    // Then the crashed pass published three chunks (21 bills) and left an open pass whose
    // committed rows, and the bills it never reached, went out with the next pass
    assert_eq!(crashed.published, 21);
    assert!(
        crashed.selected > 21,
        "the fourth chunk was committed: {crashed:?}"
    );
    assert_eq!(open, 1);
    assert!(outbox >= 28, "outbox after the crash: {outbox}");
    assert_eq!(restarted.published, 80 - 21);
    // (chunks selected ahead of the crash were committed too, and not selected again)
    assert_eq!(outbox + restarted.selected as i64, 80);
    assert_eq!(outbox_state(&mut conn).await, (0, 80));
    // And the topic holds one request per bill, each with its month
    let topic = env.topic(&EMAIL_REQUESTS.spec);
    assert_eq!(env.record_count(&topic).await, 80);
    let read = env.read(&topic, 80, Duration::from_secs(10)).await;
    let decoder = Decoder::<EmailRequest>::new(env.registry.clone());
    let mut bills = HashSet::new();
    for r in &read {
        let req: EmailRequest = decoder.decode(r.payload.as_deref()).await.unwrap();
        let month = if req.bill_id < 2_026_100_000_000_000 {
            "2026-09"
        } else {
            "2026-10"
        };
        assert_eq!(req.billing_month, month);
        assert!(
            bills.insert(req.bill_id),
            "bill {} requested twice",
            req.bill_id
        );
    }
    assert_eq!(bills.len(), 80);
}
