//! The task mode over the real broker: partitions moving between two instances of one run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use billing_runtime::{
    snapshot,
    tasks::{TaskConfig, TaskError, run_tasks},
};
use billing_schema::catalogue::MEMBERS;
use billing_testkit::TestEnv;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::watch;

/// Which instance started which partition's task, in order.
type Starts = Arc<Mutex<Vec<(&'static str, i32)>>>;

/// A task that records its start, then finishes once `gate` opens.
fn gated(
    name: &'static str,
    starts: Starts,
    gate: watch::Receiver<bool>,
) -> impl Fn(i32) -> std::pin::Pin<Box<dyn Future<Output = Result<i32, String>> + Send>> {
    move |p| {
        let (starts, mut gate) = (starts.clone(), gate.clone());
        Box::pin(async move {
            starts.lock().unwrap().push((name, p));
            gate.wait_for(|open| *open)
                .await
                .map_err(|e| e.to_string())?;
            Ok(p)
        })
    }
}

async fn until(what: &str, mut ok: impl FnMut() -> bool) {
    for _ in 0..300 {
        if ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn partitions_of_an_instance_that_dies_are_settled_by_the_one_left() {
    // Given a run over a 4-partition topic with one record in each partition
    let env = TestEnv::with_partitions(4).await;
    let topic = env.topic(&MEMBERS.spec);
    let producer: FutureProducer = env.kafka().producer_config().create().unwrap();
    for p in 0..4 {
        let record = FutureRecord::to(&topic).partition(p).key("k").payload("v");
        producer
            .send(record, Duration::from_secs(10))
            .await
            .unwrap();
    }
    let group = env.group("settle-run");
    let ends = snapshot::capture(&env.kafka(), &group, std::slice::from_ref(&topic)).unwrap();
    let config = TaskConfig {
        group_id: group.clone(),
        topic: topic.clone(),
        ends,
        parallelism: 4,
    };
    let starts: Starts = Arc::default();
    let (open_a, gate_a) = watch::channel(false);
    let (_never_b, gate_b) = watch::channel(false);

    // When instance A starts every partition, B joins and takes some of them, then B dies
    // before finishing any, and A's tasks are then allowed to finish
    let kafka = env.kafka();
    let a = tokio::spawn({
        let (config, task) = (config.clone(), gated("a", starts.clone(), gate_a));
        async move { run_tasks(&kafka, config, task, std::future::pending()).await }
    });
    until("A to start all four partitions", || {
        starts.lock().unwrap().len() == 4
    })
    .await;
    let (kill_b, killed_b) = tokio::sync::oneshot::channel::<()>();
    let kafka = env.kafka();
    let b = tokio::spawn({
        let (config, task) = (config.clone(), gated("b", starts.clone(), gate_b));
        async move {
            let killed = async {
                let _ = killed_b.await;
            };
            run_tasks(&kafka, config, task, killed).await
        }
    });
    until("B to take a partition", || {
        starts.lock().unwrap().iter().any(|(i, _)| *i == "b")
    })
    .await;
    let taken_by_b: BTreeSet<i32> = starts
        .lock()
        .unwrap()
        .iter()
        .filter(|(i, _)| *i == "b")
        .map(|(_, p)| *p)
        .collect();
    kill_b.send(()).unwrap();
    assert!(matches!(b.await.unwrap(), Err(TaskError::Interrupted)));
    until("A to take B's partitions back", || {
        let s = starts.lock().unwrap();
        taken_by_b
            .iter()
            .all(|p| s.iter().filter(|(i, q)| *i == "a" && q == p).count() == 2)
    })
    .await;
    open_a.send(true).unwrap();
    let outputs = tokio::time::timeout(Duration::from_secs(60), a)
        .await
        .expect("A finishes the run")
        .unwrap()
        .unwrap();

    // Then A finished every partition, B's ones after starting them again, and the group
    // holds each partition done at its end
    let finished: BTreeSet<i32> = outputs.iter().map(|(p, _)| *p).collect();
    assert_eq!(finished, (0..4).collect::<BTreeSet<_>>());
    assert_eq!(
        outputs.len(),
        4,
        "each partition finished once: {outputs:?}"
    );
    let committed = env.committed(&group, &topic).await;
    assert_eq!(committed.len(), 4, "committed: {committed:?}");
    assert!(
        committed.values().all(|o| *o == 1),
        "committed: {committed:?}"
    );
}
