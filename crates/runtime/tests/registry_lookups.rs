//! How often a processor's decoder asks the real registry about a writer schema.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use billing_schema::{Decoder, Encoder, UsageRecord, catalogue::USAGE_RECORDS};
use billing_testkit::TestEnv;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_records_under_an_unseen_schema_asks_the_registry_once() {
    // Given a record framed with a registered schema, and a processor's decoder that has not
    // seen its id (a process just started, with many records in flight)
    let env = TestEnv::with_partitions(1).await;
    let subject = env.catalogue().value_subject(&USAGE_RECORDS.spec);
    let encoder = Encoder::<UsageRecord>::register(&env.registry, &subject)
        .await
        .unwrap();
    let record = UsageRecord {
        usage_id: "u1".into(),
        member_id: 1,
        product_id: "usage-data".into(),
        quantity: 3,
        billing_month: "2026-11".into(),
        occurred_at: 1_700_000_000_000,
    };
    let payload = encoder.encode(&record).unwrap();
    let decoder = Arc::new(Decoder::<UsageRecord>::for_subjects(
        env.registry.clone(),
        vec![subject],
    ));

    // When 200 of them are decoded at once
    let decoded = futures::future::join_all((0..200).map(|_| {
        let (decoder, payload) = (decoder.clone(), payload.clone());
        async move { decoder.decode(Some(&payload)).await }
    }))
    .await;

    // Then every one decodes, and the registry was asked about the id once
    assert!(decoded.iter().all(|d| d.as_ref().ok() == Some(&record)));
    assert_eq!(decoder.admissions(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_records_while_the_registry_is_down_waits_for_one_failed_look_up() {
    // Given a decoder whose registry accepts connections, says nothing for half a second and
    // hangs up (so every record below is waiting before the first answer comes)
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                drop(socket);
            });
        }
    });
    let registry = billing_schema::Registry::new(&url).unwrap();
    let decoder = Arc::new(Decoder::<UsageRecord>::for_subjects(
        registry,
        vec!["usage-records-value".into()],
    ));
    let payload = vec![0, 0, 0, 0, 7, 2, 0];

    // When 50 records framed with one id are decoded at once
    let decodes: Vec<_> = (0..50)
        .map(|_| {
            let (decoder, payload) = (decoder.clone(), payload.clone());
            tokio::spawn(async move { decoder.decode(Some(&payload)).await })
        })
        .collect();
    let mut decoded = Vec::new();
    for d in decodes {
        decoded.push(d.await.unwrap());
    }

    // Then each is told the registry is unavailable (to be retried, not dead-lettered), after
    // one look-up; and a later record asks again
    assert!(
        decoded
            .iter()
            .all(|d| matches!(d, Err(billing_schema::CodecError::RegistryUnavailable(_))))
    );
    assert_eq!(decoder.admissions(), 1);
    let later = decoder.decode(Some(&payload)).await;
    assert!(matches!(
        later,
        Err(billing_schema::CodecError::RegistryUnavailable(_))
    ));
    assert_eq!(decoder.admissions(), 2);
}
