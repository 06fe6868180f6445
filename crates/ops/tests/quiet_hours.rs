//! `billing quiet-hours show|set`, and dispatch holding inside the window it sets, over the
//! real PostgreSQL and broker.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use billing_ops::{OpsError, dispatch::dispatch, quiet_hours};
use billing_testkit::{TestEnv, kst};
use diesel_async::SimpleAsyncConnection;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_hours_set_by_the_operator_hold_dispatch_inside_them() {
    // Given the default quiet hours and one bill due on the 1st
    let env = TestEnv::new().await;
    let mut common = env.common.clone();
    common.database_url = env.database().await;
    let mut conn = billing_db::connect(&common.database_url).await.unwrap();
    conn.batch_execute(
        "insert into member values (7, 'm7', 'm7@example.kr', '+821000000007', 1, null, null, 'plan-5g-slim', now());
         insert into bill (id, member_id, billing_month, total_amount, discount_amount, vat_amount, final_amount, settled_at)
         values (2026110000000007, 7, '2026-11', 1000, 0, 100, 1100, now());",
    )
    .await
    .unwrap();
    assert_eq!(
        quiet_hours::show(&common).await.unwrap().to_string(),
        "21:00-08:00 Asia/Seoul"
    );

    // When the operator moves them to 10:00-11:00
    let set = quiet_hours::set(&common, "10:00", "11:00").await.unwrap();

    // Then they read back, and a pass at 10:30 publishes nothing while one at 11:30 does
    assert_eq!(set.to_string(), "10:00-11:00 Asia/Seoul");
    assert_eq!(quiet_hours::show(&common).await.unwrap(), set);
    let inside = dispatch(&common, Some(kst("2026-12-15T10:30:00")))
        .await
        .unwrap();
    assert!(inside.quiet_hours);
    assert_eq!(inside.published, 0);
    let after = dispatch(&common, Some(kst("2026-12-15T11:30:00")))
        .await
        .unwrap();
    assert!(!after.quiet_hours);
    assert_eq!(after.published, 1);

    // And malformed or empty windows are refused, leaving the window as it was
    for (start, end) in [
        ("25:00", "08:00"),
        ("9:00", "10:00"),
        ("10:00", "10:00"),
        ("", "x"),
    ] {
        match quiet_hours::set(&common, start, end).await {
            Err(OpsError::Invalid(_)) => {}
            other => panic!("{start}-{end} accepted: {other:?}"),
        }
    }
    assert_eq!(quiet_hours::show(&common).await.unwrap(), set);
}
