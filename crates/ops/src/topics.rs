//! The catalogue's topics and value schemas, created and registered as one step.

use billing_runtime::{CommonArgs, admin};
use billing_schema::{Registry, catalogue::ALL};

use crate::OpsError;

/// Creates every catalogue topic (idempotent) and registers every value schema under
/// `<topic>-value` (idempotent; an incompatible change is refused by the registry).
/// Returns (topic, schema id) pairs.
pub async fn ensure(common: &CommonArgs) -> Result<Vec<(String, u32)>, OpsError> {
    let catalogue = common.catalogue();
    admin::ensure_topics(&common.kafka(), &catalogue).await?;
    let registry = Registry::new(&common.schema_registry_url)?;
    let mut ids = Vec::new();
    for spec in &ALL {
        let id = registry
            .register(&catalogue.value_subject(spec), spec.schema_json)
            .await?;
        ids.push((catalogue.name(spec), id));
    }
    Ok(ids)
}

/// Everything a deployment needs before processors start (`billing migrate`, the compose
/// migration step): database migrations, catalogue topics, registered schemas.
pub async fn migrate(common: &CommonArgs) -> Result<Vec<(String, u32)>, OpsError> {
    billing_db::migrate(&common.database_url).await?;
    ensure(common).await
}
