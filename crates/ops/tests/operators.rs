//! `billing operator add` and the console's password check, over the real PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use billing_ops::{
    OpsError,
    operators::{Role, add, check},
};
use billing_testkit::{TestEnv, count};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_keep_only_a_hash_and_answer_only_their_password() {
    // Given an operator and a viewer
    let env = TestEnv::new().await;
    let mut common = env.common.clone();
    common.database_url = env.database().await;
    add(&common, "kim", Role::Operator, "correct horse battery")
        .await
        .unwrap();
    add(&common, "lee.v", Role::Viewer, "another long secret")
        .await
        .unwrap();

    // Then only the argon2id hash is stored
    let url = &common.database_url;
    assert_eq!(
        count(url, "select count(*)::bigint as n from operator where password_hash like '$argon2id$%' and password_hash not like '%horse%'").await,
        2
    );

    // And each password opens its own account with its role, and nothing else does
    assert_eq!(
        check(&common, "kim", "correct horse battery")
            .await
            .unwrap(),
        Some(Role::Operator)
    );
    assert_eq!(
        check(&common, "lee.v", "another long secret")
            .await
            .unwrap(),
        Some(Role::Viewer)
    );
    assert_eq!(
        check(&common, "kim", "another long secret").await.unwrap(),
        None
    );
    assert_eq!(check(&common, "kim", "").await.unwrap(), None);
    assert_eq!(
        check(&common, "park", "correct horse battery")
            .await
            .unwrap(),
        None
    );

    // And a taken name, a bad name and a short password are refused
    for (name, password) in [
        ("kim", "yet another long one"),
        ("Kim'; drop table operator; --", "yet another long one"),
        ("", "yet another long one"),
        ("choi", "short"),
    ] {
        match add(&common, name, Role::Viewer, password).await {
            Err(OpsError::Invalid(_)) => {}
            other => panic!("{name:?} accepted: {other:?}"),
        }
    }
    assert_eq!(
        count(url, "select count(*)::bigint as n from operator").await,
        2
    );

    // And a disabled account no longer opens
    let mut conn = billing_db::connect(url).await.unwrap();
    diesel_async::SimpleAsyncConnection::batch_execute(
        &mut conn,
        "update operator set disabled_at = now() where name = 'kim'",
    )
    .await
    .unwrap();
    assert_eq!(
        check(&common, "kim", "correct horse battery")
            .await
            .unwrap(),
        None
    );
}
