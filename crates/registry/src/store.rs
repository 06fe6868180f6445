//! The registry's durable state in PostgreSQL (its own schema), so schema ids survive
//! restarts. Writes take a transaction-scoped advisory lock, so several registry processes
//! on one database still hand out one id per schema and one version number per subject.

use diesel::{
    QueryableByName,
    sql_types::{Bool, Int4, Text},
};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};

use billing_db::PgPool;

/// A storage failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] diesel::result::Error),
    #[error("no database connection: {0}")]
    Pool(String),
    #[error("{0}")]
    Incompatible(String),
}

/// One version of a subject.
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName)]
pub struct VersionRow {
    #[diesel(sql_type = Text)]
    pub subject: String,
    #[diesel(sql_type = Int4)]
    pub version: i32,
    #[diesel(sql_type = Int4)]
    pub schema_id: i32,
    #[diesel(sql_type = Text)]
    pub schema_text: String,
}

#[derive(Debug, QueryableByName)]
struct IdRow {
    #[diesel(sql_type = Int4)]
    id: i32,
}

#[derive(Debug, QueryableByName)]
struct TextRow {
    #[diesel(sql_type = Text)]
    value: String,
}

#[derive(Debug, QueryableByName)]
struct SubjectVersion {
    #[diesel(sql_type = Text)]
    subject: String,
    #[diesel(sql_type = Int4)]
    version: i32,
}

#[derive(Debug, QueryableByName)]
struct IntRow {
    #[diesel(sql_type = Int4)]
    value: i32,
}

/// The outcome of a registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    pub id: i32,
    pub version: i32,
    /// False when the subject already had this schema.
    pub created: bool,
}

/// The registry's tables, in schema `db_schema`.
#[derive(Clone)]
pub struct Store {
    pool: PgPool,
    db_schema: String,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("db_schema", &self.db_schema)
            .finish_non_exhaustive()
    }
}

/// Where a version is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionRef {
    Latest,
    Number(i32),
}

impl Store {
    /// Opens the store and creates its tables if missing. `db_schema` must be a plain
    /// identifier (checked).
    pub async fn open(pool: PgPool, db_schema: &str) -> Result<Self, StoreError> {
        if db_schema.is_empty()
            || !db_schema
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(StoreError::Pool(format!(
                "invalid schema name {db_schema:?}"
            )));
        }
        let store = Store {
            pool,
            db_schema: db_schema.to_string(),
        };
        let s = &store.db_schema;
        let ddl = format!(
            "create schema if not exists {s};
             create table if not exists {s}.schemas (
                 id serial primary key,
                 canonical text not null unique,
                 schema_text text not null,
                 created_at timestamptz not null default now());
             create table if not exists {s}.versions (
                 subject text not null,
                 version int not null,
                 schema_id int not null references {s}.schemas (id),
                 deleted boolean not null default false,
                 created_at timestamptz not null default now(),
                 primary key (subject, version));
             create table if not exists {s}.config (
                 subject text primary key,
                 compatibility text not null);"
        );
        let mut conn = store.conn().await?;
        // Two registries starting at once on an empty database race on `create ... if not
        // exists`; the advisory lock makes the DDL one at a time.
        conn.batch_execute(&format!(
            "begin; select pg_advisory_xact_lock(8081); {ddl} commit;"
        ))
        .await?;
        Ok(store)
    }

    async fn conn(
        &self,
    ) -> Result<diesel_async::pooled_connection::deadpool::Object<AsyncPgConnection>, StoreError>
    {
        self.pool
            .get()
            .await
            .map_err(|e| StoreError::Pool(e.to_string()))
    }

    /// Subjects with at least one live version.
    pub async fn subjects(&self) -> Result<Vec<String>, StoreError> {
        let s = &self.db_schema;
        let rows: Vec<TextRow> = diesel::sql_query(format!(
            "select distinct subject as value from {s}.versions where not deleted order by 1"
        ))
        .load(&mut self.conn().await?)
        .await?;
        Ok(rows.into_iter().map(|r| r.value).collect())
    }

    /// Live versions of a subject, ascending.
    pub async fn versions(&self, subject: &str) -> Result<Vec<i32>, StoreError> {
        let s = &self.db_schema;
        let rows: Vec<IntRow> = diesel::sql_query(format!(
            "select version as value from {s}.versions where subject = $1 and not deleted order by 1"
        ))
        .bind::<Text, _>(subject)
        .load(&mut self.conn().await?)
        .await?;
        Ok(rows.into_iter().map(|r| r.value).collect())
    }

    /// One version of a subject.
    pub async fn version(
        &self,
        subject: &str,
        v: VersionRef,
    ) -> Result<Option<VersionRow>, StoreError> {
        let s = &self.db_schema;
        let sql = format!(
            "select v.subject, v.version, v.schema_id, s.schema_text from {s}.versions v
             join {s}.schemas s on s.id = v.schema_id
             where v.subject = $1 and not v.deleted and ($2 < 0 or v.version = $2)
             order by v.version desc limit 1"
        );
        let n = match v {
            VersionRef::Latest => -1,
            VersionRef::Number(n) => n,
        };
        let mut rows: Vec<VersionRow> = diesel::sql_query(sql)
            .bind::<Text, _>(subject)
            .bind::<Int4, _>(n)
            .load(&mut self.conn().await?)
            .await?;
        Ok(rows.pop())
    }

    /// The schema text registered under `id` (deleted subjects included, as decoders of old
    /// records still need it).
    pub async fn schema_by_id(&self, id: i32) -> Result<Option<String>, StoreError> {
        let s = &self.db_schema;
        let mut rows: Vec<TextRow> = diesel::sql_query(format!(
            "select schema_text as value from {s}.schemas where id = $1"
        ))
        .bind::<Int4, _>(id)
        .load(&mut self.conn().await?)
        .await?;
        Ok(rows.pop().map(|r| r.value))
    }

    /// Every (subject, version) that uses schema `id`.
    pub async fn uses_of(&self, id: i32) -> Result<Vec<(String, i32)>, StoreError> {
        let s = &self.db_schema;
        let rows: Vec<SubjectVersion> = diesel::sql_query(format!(
            "select subject, version from {s}.versions where schema_id = $1 and not deleted order by 1, 2"
        ))
        .bind::<Int4, _>(id)
        .load(&mut self.conn().await?)
        .await?;
        Ok(rows.into_iter().map(|r| (r.subject, r.version)).collect())
    }

    /// The version of `subject` whose schema has this canonical form.
    pub async fn lookup(
        &self,
        subject: &str,
        canonical: &str,
    ) -> Result<Option<VersionRow>, StoreError> {
        let s = &self.db_schema;
        let mut rows: Vec<VersionRow> = diesel::sql_query(format!(
            "select v.subject, v.version, v.schema_id, s.schema_text from {s}.versions v
             join {s}.schemas s on s.id = v.schema_id
             where v.subject = $1 and s.canonical = $2 and not v.deleted
             order by v.version limit 1"
        ))
        .bind::<Text, _>(subject)
        .bind::<Text, _>(canonical)
        .load(&mut self.conn().await?)
        .await?;
        Ok(rows.pop())
    }

    /// The compatibility level set for `subject` (or globally, for `None`), if any.
    pub async fn config(&self, subject: Option<&str>) -> Result<Option<String>, StoreError> {
        let s = &self.db_schema;
        let mut rows: Vec<TextRow> = diesel::sql_query(format!(
            "select compatibility as value from {s}.config where subject = $1"
        ))
        .bind::<Text, _>(subject.unwrap_or(""))
        .load(&mut self.conn().await?)
        .await?;
        Ok(rows.pop().map(|r| r.value))
    }

    /// Sets the compatibility level of `subject` (or the global one).
    pub async fn set_config(&self, subject: Option<&str>, level: &str) -> Result<(), StoreError> {
        let s = &self.db_schema;
        diesel::sql_query(format!(
            "insert into {s}.config (subject, compatibility) values ($1, $2)
             on conflict (subject) do update set compatibility = excluded.compatibility"
        ))
        .bind::<Text, _>(subject.unwrap_or(""))
        .bind::<Text, _>(level)
        .execute(&mut self.conn().await?)
        .await?;
        Ok(())
    }

    /// Removes a subject's own level (it falls back to the global one).
    pub async fn delete_config(&self, subject: &str) -> Result<bool, StoreError> {
        let s = &self.db_schema;
        let n = diesel::sql_query(format!("delete from {s}.config where subject = $1"))
            .bind::<Text, _>(subject)
            .execute(&mut self.conn().await?)
            .await?;
        Ok(n > 0)
    }

    /// Registers a schema under `subject`. An identical schema returns its existing version;
    /// otherwise `check` sees the subject's live schemas (oldest first) and may refuse.
    pub async fn register<F>(
        &self,
        subject: &str,
        schema_text: &str,
        canonical: &str,
        check: F,
    ) -> Result<Registered, StoreError>
    where
        F: FnOnce(&[String]) -> Result<(), String> + Send,
    {
        let s = self.db_schema.clone();
        let (subject, schema_text, canonical) = (
            subject.to_string(),
            schema_text.to_string(),
            canonical.to_string(),
        );
        let mut conn = self.conn().await?;
        let conn: &mut AsyncPgConnection = &mut conn;
        let result = conn
            .transaction::<_, StoreError, _>(async move |conn: &mut AsyncPgConnection| {
                {
                    diesel::sql_query("select pg_advisory_xact_lock(8082)").execute(conn).await?;
                    let existing: Vec<VersionRow> = diesel::sql_query(format!(
                        "select v.subject, v.version, v.schema_id, s.schema_text from {s}.versions v
                         join {s}.schemas s on s.id = v.schema_id
                         where v.subject = $1 and not v.deleted order by v.version"
                    ))
                    .bind::<Text, _>(&subject)
                    .load(conn)
                    .await?;
                    let mut same: Vec<IdRow> =
                        diesel::sql_query(format!("select id from {s}.schemas where canonical = $1"))
                            .bind::<Text, _>(&canonical)
                            .load(conn)
                            .await?;
                    if let Some(row) = same.as_slice().first()
                        && let Some(v) = existing.iter().find(|v| v.schema_id == row.id)
                    {
                        return Ok(Registered { id: row.id, version: v.version, created: false });
                    }
                    let texts: Vec<String> = existing.iter().map(|v| v.schema_text.clone()).collect();
                    check(&texts).map_err(StoreError::Incompatible)?;
                    let id = match same.pop() {
                        Some(row) => row.id,
                        None => {
                            let mut rows: Vec<IdRow> = diesel::sql_query(format!(
                                "insert into {s}.schemas (canonical, schema_text) values ($1, $2) returning id"
                            ))
                            .bind::<Text, _>(&canonical)
                            .bind::<Text, _>(&schema_text)
                            .load(conn)
                            .await?;
                            rows.pop().map(|r| r.id).ok_or(diesel::result::Error::NotFound)?
                        }
                    };
                    let mut next: Vec<IntRow> = diesel::sql_query(format!(
                        "select coalesce(max(version), 0) + 1 as value from {s}.versions where subject = $1"
                    ))
                    .bind::<Text, _>(&subject)
                    .load(conn)
                    .await?;
                    let version = next.pop().map_or(1, |r| r.value);
                    diesel::sql_query(format!(
                        "insert into {s}.versions (subject, version, schema_id) values ($1, $2, $3)"
                    ))
                    .bind::<Text, _>(&subject)
                    .bind::<Int4, _>(version)
                    .bind::<Int4, _>(id)
                    .execute(conn)
                    .await?;
                    Ok(Registered { id, version, created: true })
                }
            })
            .await?;
        Ok(result)
    }

    /// Deletes a subject: soft (hidden, ids still resolve) or permanent (after a soft delete).
    /// Returns the versions deleted.
    pub async fn delete_subject(
        &self,
        subject: &str,
        permanent: bool,
    ) -> Result<Vec<i32>, StoreError> {
        let s = &self.db_schema;
        let sql = if permanent {
            format!(
                "delete from {s}.versions where subject = $1 and deleted returning version as value"
            )
        } else {
            format!(
                "update {s}.versions set deleted = true where subject = $1 and not deleted returning version as value"
            )
        };
        let rows: Vec<IntRow> = diesel::sql_query(sql)
            .bind::<Text, _>(subject)
            .load(&mut self.conn().await?)
            .await?;
        Ok(rows.into_iter().map(|r| r.value).collect())
    }

    /// Whether any deleted version of the subject is still kept.
    pub async fn has_deleted(&self, subject: &str) -> Result<bool, StoreError> {
        #[derive(QueryableByName)]
        struct B {
            #[diesel(sql_type = Bool)]
            value: bool,
        }
        let s = &self.db_schema;
        let mut rows: Vec<B> = diesel::sql_query(format!(
            "select exists (select 1 from {s}.versions where subject = $1 and deleted) as value"
        ))
        .bind::<Text, _>(subject)
        .load(&mut self.conn().await?)
        .await?;
        Ok(rows.pop().is_some_and(|b| b.value))
    }
}
