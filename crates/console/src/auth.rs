//! Who is asking: sessions, CSRF tokens, roles and the login rate limit.
//!
//! - A session is a random 256-bit token in an `HttpOnly`, `SameSite=Strict` cookie (and
//!   `Secure` behind TLS); PostgreSQL keeps only its SHA-256, the operator, the role, a CSRF
//!   token and an expiry (8 hours). Logging out deletes the row.
//! - Every state-changing request is a form POST that must carry the session's CSRF token, and
//!   only the `operator` role may make one ([`authorize`]); both refusals are audited.
//! - Failed logins are counted per account name and per client address over 5 minutes; past
//!   the limit a login is refused before the password is even checked.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use axum::http::HeaderMap;
use billing_ops::{OpsError, operators::Role};
use billing_runtime::CommonArgs;
use chrono::{DateTime, Utc};
use diesel::{
    OptionalExtension, QueryableByName,
    sql_types::{Text, Timestamptz},
};
use diesel_async::RunQueryDsl;
use sha2::{Digest, Sha256};

/// The session cookie's name.
pub const COOKIE: &str = "billing_session";
/// How long a session lasts.
pub const SESSION_HOURS: i64 = 8;

/// A logged-in operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub operator: String,
    pub role: Role,
    /// Every form of this session carries it; a POST without it is refused.
    pub csrf: String,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn random_token() -> String {
    hex(&rand::random::<[u8; 32]>())
}

fn digest(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

/// Equal in time independent of where they differ.
pub fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

#[derive(QueryableByName)]
struct Row {
    #[diesel(sql_type = Text)]
    operator: String,
    #[diesel(sql_type = Text)]
    role: String,
    #[diesel(sql_type = Text)]
    csrf: String,
}

/// Opens a session for `operator`; returns the cookie's token.
pub async fn open(common: &CommonArgs, operator: &str, role: Role) -> Result<String, OpsError> {
    let mut conn = billing_db::connect(&common.database_url).await?;
    let token = random_token();
    let expires: DateTime<Utc> = Utc::now() + chrono::Duration::hours(SESSION_HOURS);
    diesel::sql_query("delete from console_session where expires_at < now()")
        .execute(&mut conn)
        .await?;
    diesel::sql_query(
        "insert into console_session (token_sha256, operator, role, csrf, expires_at)
         values ($1, $2, $3, $4, $5)",
    )
    .bind::<Text, _>(digest(&token))
    .bind::<Text, _>(operator)
    .bind::<Text, _>(role.as_str())
    .bind::<Text, _>(random_token())
    .bind::<Timestamptz, _>(expires)
    .execute(&mut conn)
    .await?;
    Ok(token)
}

/// The live session a token opens, if any.
pub async fn find(common: &CommonArgs, token: &str) -> Result<Option<Session>, OpsError> {
    let mut conn = billing_db::connect(&common.database_url).await?;
    let row: Option<Row> = diesel::sql_query(
        "select s.operator, s.role, s.csrf from console_session s join operator o on o.name = s.operator
         where s.token_sha256 = $1 and s.expires_at > now() and o.disabled_at is null",
    )
    .bind::<Text, _>(digest(token))
    .get_result(&mut conn)
    .await
    .optional()?;
    row.map(|r| {
        Ok(Session {
            operator: r.operator,
            role: r.role.parse()?,
            csrf: r.csrf,
        })
    })
    .transpose()
}

/// Ends the session a token opens.
pub async fn close(common: &CommonArgs, token: &str) -> Result<(), OpsError> {
    let mut conn = billing_db::connect(&common.database_url).await?;
    diesel::sql_query("delete from console_session where token_sha256 = $1")
        .bind::<Text, _>(digest(token))
        .execute(&mut conn)
        .await?;
    Ok(())
}

/// The session token in a request's cookies (64 hex digits), if any.
pub fn token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
        .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The `Set-Cookie` value for a session (`None`: the cookie removed).
pub fn cookie(token: Option<&str>, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    match token {
        Some(t) => format!(
            "{COOKIE}={t}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{secure}",
            SESSION_HOURS * 3600
        ),
        None => format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0{secure}"),
    }
}

/// Why a state-changing request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The form did not carry this session's CSRF token.
    Csrf,
    /// A viewer asked for a change.
    Role,
}

impl Refusal {
    pub fn message(self) -> &'static str {
        match self {
            Refusal::Csrf => {
                "this form is missing its security token (reload the page and try again)"
            }
            Refusal::Role => "viewers cannot change anything; ask an operator",
        }
    }
}

/// Whether `session` may make a change with a form carrying `csrf`.
pub fn authorize(session: &Session, csrf: Option<&str>) -> Result<(), Refusal> {
    if !csrf.is_some_and(|c| same(c, &session.csrf)) {
        return Err(Refusal::Csrf);
    }
    if session.role != Role::Operator {
        return Err(Refusal::Role);
    }
    Ok(())
}

/// Failed logins per account name and per client address, over a sliding window.
#[derive(Debug, Default)]
pub struct Limiter {
    failures: Mutex<HashMap<String, Vec<Instant>>>,
}

/// The window failed logins are counted over.
pub const WINDOW: Duration = Duration::from_secs(300);
/// Failed logins allowed per account name in [`WINDOW`].
pub const PER_NAME: usize = 5;
/// Failed logins allowed per client address in [`WINDOW`].
pub const PER_ADDRESS: usize = 20;

impl Limiter {
    fn keys(name: &str, ip: Option<IpAddr>) -> [(String, usize); 2] {
        [
            (format!("name:{name}"), PER_NAME),
            (
                format!(
                    "ip:{}",
                    ip.map_or_else(|| "?".to_string(), |i| i.to_string())
                ),
                PER_ADDRESS,
            ),
        ]
    }

    /// Whether a login for `name` from `ip` must be refused unchecked.
    pub fn blocked(&self, name: &str, ip: Option<IpAddr>) -> bool {
        let Ok(mut f) = self.failures.lock() else {
            return true;
        };
        Self::keys(name, ip).iter().any(|(k, limit)| {
            let list = f.entry(k.clone()).or_default();
            list.retain(|t| t.elapsed() < WINDOW);
            list.len() >= *limit
        })
    }

    /// Counts a failed login.
    pub fn failed(&self, name: &str, ip: Option<IpAddr>) {
        if let Ok(mut f) = self.failures.lock() {
            for (k, _) in Self::keys(name, ip) {
                f.entry(k).or_default().push(Instant::now());
            }
        }
    }

    /// Forgets the account's failures after a successful login.
    pub fn succeeded(&self, name: &str) {
        if let Ok(mut f) = self.failures.lock() {
            f.remove(&format!("name:{name}"));
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn session(role: Role) -> Session {
        Session {
            operator: "kim".into(),
            role,
            csrf: "abc".into(),
        }
    }

    #[test]
    fn a_change_needs_the_csrf_token_and_the_operator_role() {
        assert_eq!(authorize(&session(Role::Operator), Some("abc")), Ok(()));
        assert_eq!(
            authorize(&session(Role::Operator), Some("abd")),
            Err(Refusal::Csrf)
        );
        assert_eq!(
            authorize(&session(Role::Operator), None),
            Err(Refusal::Csrf)
        );
        assert_eq!(
            authorize(&session(Role::Viewer), Some("abc")),
            Err(Refusal::Role)
        );
    }

    #[test]
    fn the_limiter_blocks_a_name_after_five_failures_and_forgets_on_success() {
        let l = Limiter::default();
        let ip = Some(IpAddr::from([127, 0, 0, 1]));
        for _ in 0..PER_NAME {
            assert!(!l.blocked("kim", ip));
            l.failed("kim", ip);
        }
        assert!(l.blocked("kim", ip));
        assert!(!l.blocked("lee", Some(IpAddr::from([127, 0, 0, 2]))));
        l.succeeded("kim");
        assert!(!l.blocked("kim", ip));
    }

    #[test]
    fn only_a_well_formed_session_cookie_is_read() {
        let mut h = HeaderMap::new();
        let t = "a".repeat(64);
        h.insert(
            axum::http::header::COOKIE,
            format!("x=1; {COOKIE}={t}").parse().unwrap(),
        );
        assert_eq!(token(&h), Some(t));
        h.insert(
            axum::http::header::COOKIE,
            format!("{COOKIE}=../../etc").parse().unwrap(),
        );
        assert_eq!(token(&h), None);
    }
}
