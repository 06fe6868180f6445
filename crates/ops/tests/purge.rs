//! `billing stack down --purge` on a real PostgreSQL database of its own.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use billing_testkit::count;
use diesel_async::SimpleAsyncConnection;

fn as_postgres(args: &[&str]) {
    let status = std::process::Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .args(args)
        .status()
        .unwrap();
    assert!(status.success(), "{args:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_empties_the_database_whoever_owns_the_schema() {
    // Given a database of the stack's role, migrated into `public` (owned by
    // pg_database_owner on PostgreSQL 15), with a schema of the role's own beside it
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL: run through scripts/test");
    let (server, _) = base.rsplit_once('/').unwrap();
    let user = base
        .split("://")
        .nth(1)
        .and_then(|rest| rest.split([':', '@']).next())
        .unwrap()
        .to_string();
    let name = format!("purge_{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    as_postgres(&["createdb", "-O", &user, &name]);
    let url = format!("{server}/{name}");
    billing_db::migrate(&url).await.unwrap();
    let mut conn = billing_db::connect(&url).await.unwrap();
    conn.batch_execute("create schema extra; create table extra.t (x int)")
        .await
        .unwrap();
    drop(conn);
    let tables = "select count(*)::bigint as n from pg_tables where schemaname not in ('pg_catalog', 'information_schema')";
    assert!(count(&url, tables).await > 5);

    // When the stack is purged
    billing_ops::stack::purge_database(&url).await.unwrap();

    // Then no table is left, and an empty `public` is there to migrate into again
    assert_eq!(count(&url, tables).await, 0);
    billing_db::migrate(&url).await.unwrap();
    as_postgres(&["dropdb", "--force", &name]);
}
