//! The local registry over real PostgreSQL, driven by schema_registry_converter's client.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;

use billing_registry::{RegistryConfig, run};
use billing_schema::{CodecError, Registry};
use billing_testkit::TestEnv;
use diesel_async::SimpleAsyncConnection;

const V1: &str =
    r#"{"type":"record","name":"Plan","namespace":"t","fields":[{"name":"id","type":"long"}]}"#;
const V2_WITH_DEFAULT: &str = r#"{"type":"record","name":"Plan","namespace":"t","fields":[{"name":"id","type":"long"},{"name":"fee","type":"long","default":0}]}"#;
const V2_TYPE_CHANGED: &str =
    r#"{"type":"record","name":"Plan","namespace":"t","fields":[{"name":"id","type":"string"}]}"#;

async fn start(
    db_schema: &str,
) -> (
    SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let config = RegistryConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        database_url: std::env::var("DATABASE_URL")
            .expect("DATABASE_URL: run through scripts/test"),
        db_schema: db_schema.to_string(),
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let handle = tokio::spawn(async move {
        run(
            config,
            async {
                let _ = stop_rx.await;
            },
            Some(ready_tx),
        )
        .await
        .unwrap();
    });
    (ready_rx.await.unwrap(), stop_tx, handle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_incompatible_schemas_and_keeps_ids_across_a_restart() {
    // Given a registry on its own database schema
    let _env = TestEnv::new().await;
    let db_schema = format!("reg_{}", uuid_suffix());
    let (addr, stop, handle) = start(&db_schema).await;
    let client = Registry::new(&format!("http://{addr}")).unwrap();

    // When a subject gets v1, an incompatible change, then a compatible one
    let id1 = client.register("plans-value", V1).await.unwrap();
    let refused = client.register("plans-value", V2_TYPE_CHANGED).await;
    let id2 = client
        .register("plans-value", V2_WITH_DEFAULT)
        .await
        .unwrap();

    // Then the incompatible change is refused and the compatible one gets a new id
    assert!(
        matches!(refused, Err(CodecError::Rejected { .. })),
        "{refused:?}"
    );
    assert_ne!(id1, id2);
    assert_eq!(
        client.register("plans-value", V1).await.unwrap(),
        id1,
        "re-registering is idempotent"
    );
    let http = reqwest::Client::new();
    let versions: Vec<i32> = http
        .get(format!("http://{addr}/subjects/plans-value/versions"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(versions, vec![1, 2]);
    let check: serde_json::Value = http
        .post(format!(
            "http://{addr}/compatibility/subjects/plans-value/versions/latest"
        ))
        .header("content-type", "application/vnd.schemaregistry.v1+json")
        .body(serde_json::json!({ "schema": V2_TYPE_CHANGED }).to_string())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(check["is_compatible"], false);

    // And after a restart the same ids resolve to the same schemas
    stop.send(()).unwrap();
    handle.await.unwrap();
    let (addr, stop, handle) = start(&db_schema).await;
    let client = Registry::new(&format!("http://{addr}")).unwrap();
    assert_eq!(
        client.schema_by_id(id1).await.unwrap(),
        apache_avro::Schema::parse_str(V1).unwrap()
    );
    assert_eq!(
        client.schema_by_id(id2).await.unwrap(),
        apache_avro::Schema::parse_str(V2_WITH_DEFAULT).unwrap()
    );
    assert_eq!(
        client
            .register("plans-value", V2_WITH_DEFAULT)
            .await
            .unwrap(),
        id2
    );
    assert!(matches!(
        client.schema_by_id(999_999).await,
        Err(CodecError::UnknownSchema { .. })
    ));

    // Per-subject compatibility can be relaxed by an operator
    let put = http
        .put(format!("http://{addr}/config/plans-value"))
        .body(r#"{"compatibility":"NONE"}"#)
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success());
    assert!(
        client
            .register("plans-value", V2_TYPE_CHANGED)
            .await
            .is_ok()
    );

    stop.send(()).unwrap();
    handle.await.unwrap();
    let mut conn = billing_db::connect(&std::env::var("DATABASE_URL").unwrap())
        .await
        .unwrap();
    conn.batch_execute(&format!("drop schema {db_schema} cascade"))
        .await
        .unwrap();
}

fn uuid_suffix() -> String {
    format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}
