//! The operator console: `billing console --listen ADDR`, or the `console` binary.
//!
//! Server-rendered pages (axum + maud: every value is HTML-escaped by construction, no script
//! at all) over the same `billing_ops` functions as the CLI: the months' overview, dispatch
//! with its preview and history, reservations, quiet hours, templates with previews, dead
//! letters with their decoded payloads and replay, a member's whole history, and the audit
//! trail. Safe to expose (see [`auth`]): operator accounts with argon2 hashes, sessions in
//! `HttpOnly` `SameSite=Strict` cookies, a CSRF token on every form, the `viewer` role
//! refused every change, rate-limited logins, every action audited, e-mail addresses and
//! phone numbers masked everywhere but the member page, and strict security headers (a
//! Content-Security-Policy that allows no script, no framing).

pub mod auth;
pub mod mask;
mod pages;

use std::{future::Future, net::SocketAddr, sync::Arc};

use axum::{
    Router,
    extract::{FromRequestParts, Request},
    http::{HeaderValue, StatusCode, header, request::Parts},
    middleware::Next,
    response::{IntoResponse, Redirect, Response},
    routing::{get, post},
};
use billing_runtime::CommonArgs;
use tracing::info;

pub use auth::Session;

/// The console's own settings.
#[derive(Debug, Clone, clap::Args)]
pub struct ConsoleArgs {
    /// Address to listen on (put it behind TLS to expose it beyond this host).
    #[arg(long, env = "CONSOLE_LISTEN", default_value = "127.0.0.1:8090")]
    pub listen: SocketAddr,
    /// Mark the session cookie `Secure` (set when served over HTTPS).
    #[arg(long, env = "CONSOLE_SECURE_COOKIE")]
    pub secure_cookie: bool,
}

/// The console could not start.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("cannot listen on {0}: {1}")]
    Listen(SocketAddr, std::io::Error),
    #[error(transparent)]
    Ops(#[from] billing_ops::OpsError),
    #[error(transparent)]
    Db(#[from] billing_db::DbError),
}

/// What every request handler shares.
#[derive(Debug)]
pub struct Console {
    pub common: CommonArgs,
    pub secure_cookie: bool,
    pub limiter: auth::Limiter,
}

type App = Arc<Console>;

impl FromRequestParts<App> for Session {
    type Rejection = Response;

    /// The request's live session; a request without one is sent to the login page.
    async fn from_request_parts(parts: &mut Parts, app: &App) -> Result<Self, Self::Rejection> {
        let Some(token) = auth::token(&parts.headers) else {
            return Err(Redirect::to("/login").into_response());
        };
        match auth::find(&app.common, &token).await {
            Ok(Some(s)) => Ok(s),
            Ok(None) => Err(Redirect::to("/login").into_response()),
            Err(e) => Err(pages::Failure::from(e).into_response()),
        }
    }
}

/// Security headers on every response: no script, no framing, no sniffing, no referrer. A
/// handler that sets its own policy keeps it (the sandboxed template preview).
async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let h = response.headers_mut();
    for (name, value) in [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; style-src 'self'; img-src 'self'; frame-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        h.entry(name).or_insert(HeaderValue::from_static(value));
    }
    response
}

async fn health() -> StatusCode {
    StatusCode::OK
}

/// Every route of the console.
pub fn router(app: Arc<Console>) -> Router {
    Router::new()
        .route("/login", get(pages::login_page).post(pages::login))
        .route("/logout", post(pages::logout))
        .route("/", get(pages::overview))
        .route(
            "/dispatch",
            get(pages::dispatch_page).post(pages::dispatch_now),
        )
        .route(
            "/reservations",
            get(pages::reservations_page).post(pages::reservation_add),
        )
        .route("/reservations/{id}/cancel", post(pages::reservation_cancel))
        .route(
            "/quiet-hours",
            get(pages::quiet_page).post(pages::quiet_set),
        )
        .route(
            "/templates",
            get(pages::templates_page).post(pages::template_create),
        )
        .route("/templates/{id}", get(pages::template_page))
        .route("/templates/{id}/preview", get(pages::template_preview))
        .route("/templates/{id}/activate", post(pages::template_activate))
        .route("/dead-letters", get(pages::letters_page))
        .route("/dead-letters/{id}", get(pages::letter_page))
        .route("/dead-letters/replay", post(pages::letters_replay))
        .route("/members", get(pages::member_find))
        .route("/members/{id}", get(pages::member_page))
        .route("/audit", get(pages::audit_page))
        .route("/static/console.css", get(pages::stylesheet))
        .route("/health", get(health))
        .layer(axum::middleware::from_fn(security_headers))
        .with_state(app)
}

/// Serves the console on `listener` until `shutdown`.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    common: CommonArgs,
    secure_cookie: bool,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ConsoleError> {
    billing_db::migrate(&common.database_url).await?;
    let addr = listener.local_addr().ok();
    let app = Arc::new(Console {
        common,
        secure_cookie,
        limiter: auth::Limiter::default(),
    });
    info!(?addr, "console listening");
    let service = router(app).into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, service)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| ConsoleError::Listen(addr.unwrap_or(([0, 0, 0, 0], 0).into()), e))
}

/// Binds `args.listen` and serves the console until `shutdown`.
pub async fn serve(
    common: CommonArgs,
    args: ConsoleArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ConsoleError> {
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| ConsoleError::Listen(args.listen, e))?;
    serve_on(listener, common, args.secure_cookie, shutdown).await
}
