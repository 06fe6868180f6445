//! A small, durable, Confluent-compatible schema registry for the local stack and the tests.
//!
//! No Confluent-compatible registry can be installed on the build machines, so this one
//! implements the REST subset that schema_registry_converter, Confluent's clients and
//! operators use, stores everything in PostgreSQL (ids survive restarts), and decides
//! compatibility with apache-avro's resolution check (BACKWARD by default). Deployments
//! use Redpanda's registry instead (compose/).
//!
//! # Layout
//! - [`compat`]: compatibility levels and the check.
//! - [`store`]: the tables and the transactional registration.
//! - [`http`]: the REST routes.
//! - [`run`]: serve until shutdown.

pub mod compat;
pub mod http;
pub mod store;

use std::{future::Future, net::SocketAddr, sync::Arc};

/// How the registry runs.
#[derive(Debug, Clone, clap::Args)]
pub struct RegistryConfig {
    /// Address to listen on.
    #[arg(long, env = "REGISTRY_LISTEN", default_value = "127.0.0.1:8081")]
    pub listen: SocketAddr,
    /// PostgreSQL connection string.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://billing:billing@127.0.0.1:5432/billing"
    )]
    pub database_url: String,
    /// PostgreSQL schema holding the registry's tables.
    #[arg(long, env = "REGISTRY_DB_SCHEMA", default_value = "schema_registry")]
    pub db_schema: String,
}

/// The registry failed to start or serve.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Db(#[from] billing_db::DbError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("server failed: {0}")]
    Serve(std::io::Error),
}

/// Serves the registry until `shutdown` completes. `ready` receives the bound address (useful
/// with port 0 in tests).
pub async fn run(
    config: RegistryConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
    ready: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> Result<(), RegistryError> {
    let pool = billing_db::pool(&config.database_url, 8)?;
    let store = store::Store::open(pool, &config.db_schema).await?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| RegistryError::Listen {
            addr: config.listen,
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|source| RegistryError::Listen {
            addr: config.listen,
            source,
        })?;
    tracing::info!(%addr, db_schema = %config.db_schema, "schema registry listening");
    if let Some(tx) = ready {
        let _ = tx.send(addr);
    }
    let app = Arc::new(http::App { store });
    axum::serve(listener, http::router(app))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(RegistryError::Serve)
}
