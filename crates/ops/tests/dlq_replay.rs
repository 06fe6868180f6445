//! `billing dlq replay` against forged letters, over the real PostgreSQL and broker.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use billing_ops::{OpsError, dlq};
use billing_schema::catalogue::{DEAD_LETTERS, SMS_REQUESTS};
use billing_testkit::{TestEnv, count};
use diesel_async::SimpleAsyncConnection;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_letter_naming_a_topic_outside_the_catalogue_is_not_replayed() {
    // Given letters naming an arbitrary topic, the dead-letter topic itself, and a real input
    let env = TestEnv::new().await;
    let mut common = env.common.clone();
    common.database_url = env.database().await;
    let mut conn = billing_db::connect(&common.database_url).await.unwrap();
    let sms = env.topic(&SMS_REQUESTS.spec);
    for (id, topic) in [
        (1, "someone-elses-topic".to_string()),
        (2, env.topic(&DEAD_LETTERS.spec)),
        (3, sms.clone()),
    ] {
        conn.batch_execute(&format!(
            "insert into dead_letter (id, source_topic, source_partition, source_offset, stage, reason, key, payload)
             values ({id}, '{topic}', 0, {id}, 'sms', 'test', '\\x31', '\\x00')"
        ))
        .await
        .unwrap();
    }

    // When the operator replays the forged ones
    for id in [1, 2] {
        let refused = dlq::replay(&common, &[id], 10).await;

        // Then the replay is refused with the reason, and the letter stays unreplayed
        match refused {
            Err(OpsError::Invalid(why)) => assert!(why.contains("not an input topic"), "{why}"),
            other => panic!("letter {id} was not refused: {other:?}"),
        }
    }
    assert_eq!(
        count(
            &common.database_url,
            "select count(*)::bigint as n from dead_letter where replayed_at is not null"
        )
        .await,
        0
    );

    // And a letter of a catalogue input topic is replayed
    assert_eq!(dlq::replay(&common, &[3], 10).await.unwrap(), vec![3]);
    assert_eq!(env.record_count(&sms).await, 1);
}
