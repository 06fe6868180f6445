//! The REST subset of Confluent's Schema Registry API that schema_registry_converter,
//! Confluent's own clients and operators use. Request bodies are read whatever their
//! content type (clients send `application/vnd.schemaregistry.v1+json`).

use std::{collections::HashMap, sync::Arc};

use apache_avro::Schema;
use axum::{
    Router,
    body::Bytes,
    extract::{Path, Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{
    compat::{self, Level},
    store::{Store, StoreError, VersionRef},
};

const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

/// Shared state of the handlers.
#[derive(Debug)]
pub struct App {
    pub store: Store,
}

/// The router over `app`.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(|| async { reply(StatusCode::OK, json!({})) }))
        .route(
            "/schemas/types",
            get(|| async { reply(StatusCode::OK, json!(["AVRO"])) }),
        )
        .route("/subjects", get(subjects))
        .route(
            "/subjects/{subject}",
            axum::routing::post(lookup).delete(delete_subject),
        )
        .route("/subjects/{subject}/versions", get(versions).post(register))
        .route("/subjects/{subject}/versions/{version}", get(version))
        .route(
            "/subjects/{subject}/versions/{version}/schema",
            get(version_schema),
        )
        .route("/schemas/ids/{id}", get(schema_by_id))
        .route("/schemas/ids/{id}/schema", get(raw_schema_by_id))
        .route("/schemas/ids/{id}/versions", get(uses_of))
        .route(
            "/compatibility/subjects/{subject}/versions",
            axum::routing::post(compatible_all),
        )
        .route(
            "/compatibility/subjects/{subject}/versions/{version}",
            axum::routing::post(compatible_with),
        )
        .route("/config", get(global_config).put(set_global_config))
        .route(
            "/config/{subject}",
            get(subject_config)
                .put(set_subject_config)
                .delete(delete_subject_config),
        )
        .with_state(app)
}

fn reply(status: StatusCode, body: Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        body.to_string(),
    )
        .into_response()
}

fn error(status: StatusCode, code: u32, message: impl Into<String>) -> Response {
    reply(
        status,
        json!({ "error_code": code, "message": message.into() }),
    )
}

fn store_error(e: StoreError) -> Response {
    match e {
        StoreError::Incompatible(m) => error(StatusCode::CONFLICT, 409, m),
        other => {
            tracing::error!(error = %other, "registry store failed");
            error(StatusCode::INTERNAL_SERVER_ERROR, 50001, other.to_string())
        }
    }
}

fn subject_not_found(subject: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        40401,
        format!("Subject '{subject}' not found."),
    )
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SchemaBody {
    schema: String,
    schema_type: Option<String>,
    #[serde(default)]
    references: Vec<Value>,
}

/// Parses a request body into an Avro schema and its canonical form.
#[allow(clippy::result_large_err)]
fn parse_body(body: &Bytes) -> Result<(SchemaBody, Schema, String), Response> {
    let parsed: SchemaBody = serde_json::from_slice(body).map_err(|e| {
        error(
            StatusCode::UNPROCESSABLE_ENTITY,
            42201,
            format!("Invalid request body: {e}"),
        )
    })?;
    if parsed
        .schema_type
        .as_deref()
        .is_some_and(|t| !t.eq_ignore_ascii_case("AVRO"))
    {
        return Err(error(
            StatusCode::UNPROCESSABLE_ENTITY,
            42201,
            "Only AVRO schemas are supported here",
        ));
    }
    if !parsed.references.is_empty() {
        return Err(error(
            StatusCode::UNPROCESSABLE_ENTITY,
            42201,
            "Schema references are not supported here",
        ));
    }
    let schema = Schema::parse_str(&parsed.schema).map_err(|e| {
        error(
            StatusCode::UNPROCESSABLE_ENTITY,
            42201,
            format!("Invalid schema: {e}"),
        )
    })?;
    let canonical = schema.canonical_form();
    Ok((parsed, schema, canonical))
}

#[allow(clippy::result_large_err)]
fn parse_version(v: &str) -> Result<VersionRef, Response> {
    match v {
        "latest" | "-1" => Ok(VersionRef::Latest),
        n => n
            .parse::<i32>()
            .ok()
            .filter(|n| *n > 0)
            .map(VersionRef::Number)
            .ok_or_else(|| {
                error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    42202,
                    format!("Invalid version {n:?}"),
                )
            }),
    }
}

async fn level_for(store: &Store, subject: &str) -> Result<Level, StoreError> {
    let text = match store.config(Some(subject)).await? {
        Some(t) => Some(t),
        None => store.config(None).await?,
    };
    Ok(text.and_then(|t| t.parse().ok()).unwrap_or(Level::DEFAULT))
}

async fn subjects(State(app): State<Arc<App>>) -> Response {
    match app.store.subjects().await {
        Ok(s) => reply(StatusCode::OK, json!(s)),
        Err(e) => store_error(e),
    }
}

async fn versions(State(app): State<Arc<App>>, Path(subject): Path<String>) -> Response {
    match app.store.versions(&subject).await {
        Ok(v) if v.is_empty() => subject_not_found(&subject),
        Ok(v) => reply(StatusCode::OK, json!(v)),
        Err(e) => store_error(e),
    }
}

async fn register(
    State(app): State<Arc<App>>,
    Path(subject): Path<String>,
    body: Bytes,
) -> Response {
    let (parsed, schema, canonical) = match parse_body(&body) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let level = match level_for(&app.store, &subject).await {
        Ok(l) => l,
        Err(e) => return store_error(e),
    };
    let subject_name = subject.clone();
    let check = move |existing: &[String]| -> Result<(), String> {
        let old: Vec<Schema> = existing
            .iter()
            .filter_map(|t| Schema::parse_str(t).ok())
            .collect();
        compat::check(level, &schema, &old).map_err(|problems| {
            format!(
                "Schema being registered is incompatible with an earlier schema for subject \"{subject_name}\" ({level}): {}",
                problems.join("; ")
            )
        })
    };
    match app
        .store
        .register(&subject, &parsed.schema, &canonical, check)
        .await
    {
        Ok(r) => {
            if r.created {
                tracing::info!(subject = %subject, id = r.id, version = r.version, "schema registered");
            }
            reply(StatusCode::OK, json!({ "id": r.id }))
        }
        Err(e) => store_error(e),
    }
}

async fn lookup(State(app): State<Arc<App>>, Path(subject): Path<String>, body: Bytes) -> Response {
    let (_, _, canonical) = match parse_body(&body) {
        Ok(p) => p,
        Err(r) => return r,
    };
    match app.store.lookup(&subject, &canonical).await {
        Ok(Some(v)) => reply(
            StatusCode::OK,
            json!({ "subject": v.subject, "version": v.version, "id": v.schema_id, "schema": v.schema_text }),
        ),
        Ok(None) => match app.store.versions(&subject).await {
            Ok(vs) if vs.is_empty() => subject_not_found(&subject),
            Ok(_) => error(StatusCode::NOT_FOUND, 40403, "Schema not found"),
            Err(e) => store_error(e),
        },
        Err(e) => store_error(e),
    }
}

async fn version(
    State(app): State<Arc<App>>,
    Path((subject, version)): Path<(String, String)>,
) -> Response {
    let v = match parse_version(&version) {
        Ok(v) => v,
        Err(r) => return r,
    };
    match app.store.version(&subject, v).await {
        Ok(Some(v)) => reply(
            StatusCode::OK,
            json!({ "subject": v.subject, "version": v.version, "id": v.schema_id, "schema": v.schema_text }),
        ),
        Ok(None) => match app.store.versions(&subject).await {
            Ok(vs) if vs.is_empty() => subject_not_found(&subject),
            Ok(_) => error(
                StatusCode::NOT_FOUND,
                40402,
                format!("Version {version} not found."),
            ),
            Err(e) => store_error(e),
        },
        Err(e) => store_error(e),
    }
}

async fn version_schema(
    State(app): State<Arc<App>>,
    Path((subject, version)): Path<(String, String)>,
) -> Response {
    let v = match parse_version(&version) {
        Ok(v) => v,
        Err(r) => return r,
    };
    match app.store.version(&subject, v).await {
        Ok(Some(v)) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, CONTENT_TYPE)],
            v.schema_text,
        )
            .into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            40402,
            format!("Version {version} not found."),
        ),
        Err(e) => store_error(e),
    }
}

async fn schema_by_id(
    State(app): State<Arc<App>>,
    Path(id): Path<i32>,
    Query(_q): Query<HashMap<String, String>>,
) -> Response {
    match app.store.schema_by_id(id).await {
        Ok(Some(text)) => reply(StatusCode::OK, json!({ "schema": text })),
        Ok(None) => error(StatusCode::NOT_FOUND, 40403, "Schema not found"),
        Err(e) => store_error(e),
    }
}

async fn raw_schema_by_id(State(app): State<Arc<App>>, Path(id): Path<i32>) -> Response {
    match app.store.schema_by_id(id).await {
        Ok(Some(text)) => {
            (StatusCode::OK, [(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response()
        }
        Ok(None) => error(StatusCode::NOT_FOUND, 40403, "Schema not found"),
        Err(e) => store_error(e),
    }
}

async fn uses_of(State(app): State<Arc<App>>, Path(id): Path<i32>) -> Response {
    match app.store.uses_of(id).await {
        Ok(uses) if uses.is_empty() => error(StatusCode::NOT_FOUND, 40403, "Schema not found"),
        Ok(uses) => reply(
            StatusCode::OK,
            json!(
                uses.into_iter()
                    .map(|(s, v)| json!({ "subject": s, "version": v }))
                    .collect::<Vec<_>>()
            ),
        ),
        Err(e) => store_error(e),
    }
}

async fn compatibility(
    app: &App,
    subject: &str,
    against: Option<VersionRef>,
    body: &Bytes,
) -> Response {
    let (_, schema, _) = match parse_body(body) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let level = match level_for(&app.store, subject).await {
        Ok(l) => l,
        Err(e) => return store_error(e),
    };
    let existing: Vec<Schema> = match against {
        Some(v) => match app.store.version(subject, v).await {
            Ok(Some(row)) => Schema::parse_str(&row.schema_text)
                .ok()
                .into_iter()
                .collect(),
            Ok(None) => return error(StatusCode::NOT_FOUND, 40402, "Version not found."),
            Err(e) => return store_error(e),
        },
        None => {
            let mut all = Vec::new();
            let versions = match app.store.versions(subject).await {
                Ok(v) => v,
                Err(e) => return store_error(e),
            };
            for n in versions {
                match app.store.version(subject, VersionRef::Number(n)).await {
                    Ok(Some(row)) => all.extend(Schema::parse_str(&row.schema_text).ok()),
                    Ok(None) => {}
                    Err(e) => return store_error(e),
                }
            }
            all
        }
    };
    match compat::check(level, &schema, &existing) {
        Ok(()) => reply(StatusCode::OK, json!({ "is_compatible": true })),
        Err(messages) => reply(
            StatusCode::OK,
            json!({ "is_compatible": false, "messages": messages }),
        ),
    }
}

async fn compatible_all(
    State(app): State<Arc<App>>,
    Path(subject): Path<String>,
    body: Bytes,
) -> Response {
    compatibility(&app, &subject, None, &body).await
}

async fn compatible_with(
    State(app): State<Arc<App>>,
    Path((subject, version)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    match parse_version(&version) {
        Ok(v) => compatibility(&app, &subject, Some(v), &body).await,
        Err(r) => r,
    }
}

#[derive(Debug, Deserialize)]
struct ConfigBody {
    compatibility: String,
}

async fn show_config(app: &App, subject: Option<&str>) -> Response {
    match app.store.config(subject).await {
        Ok(Some(level)) => reply(StatusCode::OK, json!({ "compatibilityLevel": level })),
        Ok(None) if subject.is_none() => reply(
            StatusCode::OK,
            json!({ "compatibilityLevel": Level::DEFAULT.to_string() }),
        ),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            40408,
            "Subject does not have subject-level compatibility configured",
        ),
        Err(e) => store_error(e),
    }
}

async fn put_config(app: &App, subject: Option<&str>, body: &Bytes) -> Response {
    let parsed: ConfigBody = match serde_json::from_slice(body) {
        Ok(p) => p,
        Err(e) => {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                42203,
                format!("Invalid compatibility body: {e}"),
            );
        }
    };
    let level: Level = match parsed.compatibility.parse() {
        Ok(l) => l,
        Err(e) => return error(StatusCode::UNPROCESSABLE_ENTITY, 42203, e),
    };
    match app.store.set_config(subject, &level.to_string()).await {
        Ok(()) => reply(
            StatusCode::OK,
            json!({ "compatibility": level.to_string() }),
        ),
        Err(e) => store_error(e),
    }
}

async fn global_config(State(app): State<Arc<App>>) -> Response {
    show_config(&app, None).await
}

async fn set_global_config(State(app): State<Arc<App>>, body: Bytes) -> Response {
    put_config(&app, None, &body).await
}

async fn subject_config(State(app): State<Arc<App>>, Path(subject): Path<String>) -> Response {
    show_config(&app, Some(&subject)).await
}

async fn set_subject_config(
    State(app): State<Arc<App>>,
    Path(subject): Path<String>,
    body: Bytes,
) -> Response {
    put_config(&app, Some(&subject), &body).await
}

async fn delete_subject_config(
    State(app): State<Arc<App>>,
    Path(subject): Path<String>,
) -> Response {
    match app.store.delete_config(&subject).await {
        Ok(true) => reply(
            StatusCode::OK,
            json!({ "compatibilityLevel": Level::DEFAULT.to_string() }),
        ),
        Ok(false) => error(
            StatusCode::NOT_FOUND,
            40401,
            format!("Subject '{subject}' not found."),
        ),
        Err(e) => store_error(e),
    }
}

async fn delete_subject(
    State(app): State<Arc<App>>,
    Path(subject): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let permanent = q.get("permanent").is_some_and(|v| v == "true");
    if permanent {
        // Confluent requires a soft delete first; do both in order for operators' convenience.
        if let Err(e) = app.store.delete_subject(&subject, false).await {
            return store_error(e);
        }
        match app.store.has_deleted(&subject).await {
            Ok(false) => return subject_not_found(&subject),
            Ok(true) => {}
            Err(e) => return store_error(e),
        }
    }
    match app.store.delete_subject(&subject, permanent).await {
        Ok(v) if v.is_empty() => subject_not_found(&subject),
        Ok(v) => reply(StatusCode::OK, json!(v)),
        Err(e) => store_error(e),
    }
}
