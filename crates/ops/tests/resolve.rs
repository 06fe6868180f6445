//! `billing delivery resolve` on deliveries held `unknown`, over the real PostgreSQL,
//! registry and broker.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use billing_ops::{
    OpsError,
    delivery::{Resolution, resolve},
};
use billing_schema::{Decoder, EmailRequest, Encoder, catalogue::EMAIL_REQUESTS};
use billing_testkit::{TestEnv, count};
use diesel_async::SimpleAsyncConnection;

const BILL: i64 = 2_026_110_000_000_007;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_delivery_is_resent_from_its_attempt_or_marked_sent() {
    // Given bill 7's email delivery held `unknown` at its second attempt, with the letter
    // that held it carrying that attempt's request, and bill 8's email delivery held too
    let env = TestEnv::new().await;
    let mut common = env.common.clone();
    common.database_url = env.database().await;
    let url = common.database_url.clone();
    let mut conn = billing_db::connect(&url).await.unwrap();
    let topic = env.topic(&EMAIL_REQUESTS.spec);
    let encoder = Encoder::<EmailRequest>::register(
        &env.registry,
        &env.catalogue().value_subject(&EMAIL_REQUESTS.spec),
    )
    .await
    .unwrap();
    let request = EmailRequest {
        delivery_id: format!("email-{BILL}"),
        bill_id: BILL,
        member_id: 7,
        billing_month: "2026-11".into(),
        attempt: 1,
        requested_at: 0,
        not_before: None,
        last_error: Some("gateway unavailable".into()),
    };
    let payload: String = encoder
        .encode(&request)
        .unwrap()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    conn.batch_execute(&format!(
        "insert into member select g, 'm' || g, 'm' || g || '@example.kr', '+821000000000', 1, null, null,
                'plan-5g-slim', now() from generate_series(7, 8) g;
         insert into bill (id, member_id, billing_month, total_amount, discount_amount, vat_amount, final_amount, settled_at)
         select 2026110000000000 + g, g, '2026-11', 1000, 0, 100, 1100, now() from generate_series(7, 8) g;
         insert into delivery (bill_id, channel, status, attempts, updated_at)
         select 2026110000000000 + g, 'email', 'unknown', 2, now() from generate_series(7, 8) g;
         insert into dead_letter (source_topic, source_partition, source_offset, stage, reason, key, payload)
         values ('{topic}', 0, 41, 'email',
                 'bill {BILL} on email: the process sending attempt 2 died before the provider''s answer was recorded; held for an operator (the message may have gone out)',
                 '\\x37', '\\x{payload}');"
    ))
    .await
    .unwrap();

    // When the operator finds bill 7's message absent at the provider and resends it
    let resent = resolve(&common, BILL, "email", Resolution::Resend)
        .await
        .unwrap();

    // Then the delivery is claimable by that attempt again, and its request is on the topic
    assert_eq!(resent.attempts, 1);
    assert!(resent.letter.is_some());
    let reopened = format!(
        "select count(*)::bigint as n from delivery where bill_id = {BILL}
         and status = 'failed' and attempts = 1 and claim_owner is null"
    );
    assert_eq!(count(&url, &reopened).await, 1);
    let records = env.read(&topic, 1, Duration::from_secs(30)).await;
    let decoder = Decoder::<EmailRequest>::new(env.registry.clone());
    let replayed = decoder.decode(records[0].payload.as_deref()).await.unwrap();
    assert_eq!(replayed, request);
    assert_eq!(
        count(
            &url,
            "select count(*)::bigint as n from dead_letter where replayed_at is not null"
        )
        .await,
        1
    );

    // And resolving it again finds nothing held
    match resolve(&common, BILL, "email", Resolution::Sent).await {
        Err(OpsError::NotFound(why)) => assert!(why.contains("unknown"), "{why}"),
        other => panic!("resolved twice: {other:?}"),
    }

    // When bill 8's message is in the provider's log
    let sent = resolve(&common, BILL + 1, "email", Resolution::Sent)
        .await
        .unwrap();

    // Then its delivery is sent
    assert_eq!(sent.attempts, 2);
    let done = format!(
        "select count(*)::bigint as n from delivery where bill_id = {} and status = 'sent' and sent_at is not null",
        BILL + 1
    );
    assert_eq!(count(&url, &done).await, 1);

    // And a bill already sent on another channel cannot be marked sent on this one
    conn.batch_execute(&format!(
        "insert into delivery (bill_id, channel, status, attempts, updated_at) values ({}, 'sms', 'unknown', 1, now())",
        BILL + 1
    ))
    .await
    .unwrap();
    match resolve(&common, BILL + 1, "sms", Resolution::Sent).await {
        Err(OpsError::Invalid(why)) => assert!(why.contains("already sent"), "{why}"),
        other => panic!("sent twice: {other:?}"),
    }
}
