//! PostgreSQL access: the diesel schema of `migrations/`, the embedded migrations, and
//! connections.
//!
//! # Layout
//! - [`schema`]: diesel's `table!` declarations, one per table of shared/CONTRACT.md and the
//!   platform's own (dispatch outbox, templates, reservations, quiet hours, sink offsets).
//! - [`migrate`], [`connect`], [`pool`]: start-up helpers every binary shares.

pub mod schema;

use diesel::ConnectionError;
use diesel_async::{
    AsyncConnection, AsyncMigrationHarness, AsyncPgConnection,
    pooled_connection::{AsyncDieselConnectionManager, deadpool::Pool},
};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

/// The migrations in `migrations/`, compiled in so every binary can bring a database up to
/// date without the diesel CLI.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("../../migrations");

/// A pool of async connections.
pub type PgPool = Pool<AsyncPgConnection>;

/// Database set-up failed.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot connect to PostgreSQL: {0}")]
    Connect(#[from] ConnectionError),
    #[error("migration failed: {0}")]
    Migrate(String),
    #[error("cannot build connection pool: {0}")]
    Pool(String),
    #[error("query failed: {0}")]
    Query(#[from] diesel::result::Error),
}

/// One connection.
pub async fn connect(url: &str) -> Result<AsyncPgConnection, DbError> {
    Ok(AsyncPgConnection::establish(url).await?)
}

/// Applies the pending migrations; returns the versions applied now. Needs the multi-thread
/// tokio runtime (diesel's harness blocks in place).
pub async fn migrate(url: &str) -> Result<Vec<String>, DbError> {
    let conn = connect(url).await?;
    let mut harness = AsyncMigrationHarness::new(conn);
    let applied = harness
        .run_pending_migrations(MIGRATIONS)
        .map_err(|e| DbError::Migrate(e.to_string()))?;
    Ok(applied.iter().map(ToString::to_string).collect())
}

/// A pool of at most `size` connections.
pub fn pool(url: &str, size: usize) -> Result<PgPool, DbError> {
    let manager = AsyncDieselConnectionManager::<AsyncPgConnection>::new(url);
    Pool::builder(manager)
        .max_size(size)
        .build()
        .map_err(|e| DbError::Pool(e.to_string()))
}

/// `url` with the session's `search_path` set to `schema`, so a test can run against its own
/// schema in a shared database.
pub fn with_search_path(url: &str, schema: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}options=-csearch_path%3D{schema}")
}
