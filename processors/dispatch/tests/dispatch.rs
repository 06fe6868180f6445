//! Dispatch passes over real PostgreSQL, broker and registry, on an injected clock.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{collections::HashSet, time::Duration};

use billing_dispatch::{PassSummary, run_pass};
use billing_schema::{Decoder, EmailRequest, catalogue::EMAIL_REQUESTS};
use billing_testkit::TestEnv;
use chrono::{DateTime, Utc};
use diesel_async::SimpleAsyncConnection;

/// An instant given in Korea's local time (UTC+9).
fn kst(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(&format!("{s}+09:00"))
        .unwrap()
        .with_timezone(&Utc)
}

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
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatch_picks_the_right_bills_at_the_right_time_once() {
    // Given October's bills, delivered in November on each member's day
    let env = TestEnv::new().await;
    let mut common = env.common.clone();
    common.database_url = env.database().await;
    let mut conn = billing_db::connect(&common.database_url).await.unwrap();
    let members: [MemberSpec; 7] = [
        (1, 24, None),                     // due today
        (2, 25, None),                     // due tomorrow
        (3, 31, None),                     // day 31 in a 30-day month: the 30th
        (4, 10, None),                     // day passed without a dispatch: caught up
        (5, 24, Some(("22:00", "09:30"))), // window crossing midnight
        (6, 24, Some(("09:00", "12:00"))), // window within the day
        (7, 24, None),                     // its outbox row is left by a crash
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
    // The crash: the outbox row of member 7 was committed, the event never sent.
    conn.batch_execute(&format!(
        "insert into dispatch (bill_id, delivery_id, member_id, requested_at) values ({}, 'email-{}', 7, now())",
        bill_id(7),
        bill_id(7)
    ))
    .await
    .unwrap();

    // When passes run inside the system quiet hours (21:00-08:00 by default)
    let quiet = run_pass(&common, kst("2026-11-24T06:00:00")).await.unwrap();
    // Then nothing new is selected and the due bills are held; the crash's row goes out
    assert_eq!(
        quiet,
        PassSummary {
            quiet_hours: true,
            selected: 0,
            held: 4,
            published: 1
        }
    );

    // When the operator moves quiet hours to 02:00-05:00 and passes run through the day
    conn.batch_execute(
        "update quiet_hours set start_time = '02:00', end_time = '05:00' where id = 1",
    )
    .await
    .unwrap();
    let at_nine = run_pass(&common, kst("2026-11-24T09:00:00")).await.unwrap();
    let again = run_pass(&common, kst("2026-11-24T09:00:00")).await.unwrap();
    let at_ten = run_pass(&common, kst("2026-11-24T10:00:00")).await.unwrap();
    let after_noon = run_pass(&common, kst("2026-11-24T12:30:00")).await.unwrap();
    let on_the_30th = run_pass(&common, kst("2026-11-30T10:00:00")).await.unwrap();
    let later = run_pass(&common, kst("2026-12-01T10:00:00")).await.unwrap();

    // Then members 1 and 4 go at nine, 5 and 6 wait for their windows to close
    assert_eq!(at_nine, pass(2, 2, 2));
    assert_eq!(
        again,
        pass(0, 2, 0),
        "a second pass at the same instant publishes nothing"
    );
    assert_eq!(
        at_ten,
        pass(1, 1, 1),
        "the window crossing midnight closed at 09:30"
    );
    assert_eq!(after_noon, pass(1, 0, 1));
    // And day 25 is caught up on the 30th, with day 31 going out on the 30th too
    assert_eq!(on_the_30th, pass(2, 0, 2));
    assert_eq!(later, pass(0, 0, 0));

    // And the topic holds exactly one request per bill
    let read = env
        .read(&env.topic(&EMAIL_REQUESTS.spec), 8, Duration::from_secs(10))
        .await;
    assert_eq!(read.len(), 7);
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
    assert_eq!(bills, (1..=7).map(bill_id).collect());
}
