//! The pages and the form handlers. Reads call `billing_ops` directly; every change goes
//! through [`act`], which checks the CSRF token and the role and audits the outcome.

use std::{future::Future, net::SocketAddr};

use axum::{
    Form,
    extract::{ConnectInfo, Path, Query, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Redirect, Response},
};
use billing_ops::{OpsError, audit, dispatch, dlq, overview, quiet_hours, templates};
use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};
use maud::{DOCTYPE, Markup, html};

use crate::{App, Session, auth, mask};

/// A submitted form's fields, in order (repeated names kept: `ids=1&ids=2`).
pub type Fields = Vec<(String, String)>;

fn field<'a>(f: &'a Fields, name: &str) -> Option<&'a str> {
    f.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.trim())
        .filter(|v| !v.is_empty())
}

/// A page that could not be shown, with its status.
#[derive(Debug)]
pub struct Failure(pub StatusCode, pub String);

impl From<OpsError> for Failure {
    fn from(e: OpsError) -> Self {
        let status = match e {
            OpsError::NotFound(_) => StatusCode::NOT_FOUND,
            OpsError::Invalid(_) => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Failure(status, e.to_string())
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let body = layout("Refused", None, html! { p.error { (self.1) } });
        (self.0, body).into_response()
    }
}

/// What the page says about the last action.
pub enum Notice {
    Done(String),
    Failed(String),
}

fn notice(n: Option<&Notice>) -> Markup {
    html! {
        @match n {
            Some(Notice::Done(m)) => p.notice role="status" { (m) },
            Some(Notice::Failed(m)) => p.error role="alert" { (m) },
            None => {},
        }
    }
}

const NAV: [(&str, &str); 8] = [
    ("/", "Overview"),
    ("/dispatch", "Dispatch"),
    ("/reservations", "Reservations"),
    ("/quiet-hours", "Quiet hours"),
    ("/templates", "Templates"),
    ("/dead-letters", "Dead letters"),
    ("/members", "Members"),
    ("/audit", "Audit"),
];

fn layout(title: &str, s: Option<&Session>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { (title) " · billing console" }
                link rel="stylesheet" href="/static/console.css";
            }
            body {
                @if let Some(s) = s {
                    nav {
                        @for (href, label) in NAV { a href=(href) { (label) } }
                        span.who { (s.operator) " (" (s.role.as_str()) ")" }
                        form method="post" action="/logout" {
                            (csrf(s))
                            button type="submit" { "Log out" }
                        }
                    }
                }
                main { h1 { (title) } (body) }
            }
        }
    }
}

fn csrf(s: &Session) -> Markup {
    html! { input type="hidden" name="csrf" value=(s.csrf); }
}

/// A button form for a change; shown disabled to viewers (the server refuses them anyway).
fn action_form(s: &Session, action: &str, label: &str, inner: Markup) -> Markup {
    html! {
        form method="post" action=(action) {
            (csrf(s))
            (inner)
            button type="submit" { (label) }
        }
    }
}

fn won(amount: i64) -> String {
    let digits = amount.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if amount < 0 { format!("-{out}") } else { out }
}

fn local(app: &App, t: DateTime<Utc>) -> String {
    t.with_timezone(&app.common.billing_tz)
        .format("%Y-%m-%d %H:%M:%S")
        .to_string()
}

/// Runs an operator action for `s`: refused (and audited) without the form's CSRF token or
/// the operator role; otherwise run and audited with its result.
async fn act<T, Fut>(
    app: &App,
    s: &Session,
    f: &Fields,
    action: &str,
    detail: String,
    run: Fut,
) -> Result<Result<T, OpsError>, Failure>
where
    Fut: Future<Output = Result<T, OpsError>>,
{
    if let Err(r) = auth::authorize(s, field(f, "csrf")) {
        let why = format!("refused: {}", r.message());
        record(app, &s.operator, action, &detail, &why).await;
        return Err(Failure(StatusCode::FORBIDDEN, r.message().to_string()));
    }
    let out = run.await;
    let result = match &out {
        Ok(_) => "ok".to_string(),
        Err(e) => e.to_string(),
    };
    record(app, &s.operator, action, &detail, &result).await;
    Ok(out)
}

async fn record(app: &App, who: &str, action: &str, detail: &str, result: &str) {
    if let Err(e) = audit::record(&app.common, who, action, detail, result).await {
        tracing::error!(error = %e, action, "cannot write the audit trail");
    }
}

// ---- login ---------------------------------------------------------------------------

fn login_form(error: Option<&str>) -> Markup {
    layout(
        "Log in",
        None,
        html! {
            @if let Some(e) = error { p.error role="alert" { (e) } }
            form method="post" action="/login" {
                label { "Name " input name="name" autocomplete="username" required; }
                label { "Password " input name="password" type="password" autocomplete="current-password" required; }
                button type="submit" { "Log in" }
            }
        },
    )
}

pub async fn login_page() -> Markup {
    login_form(None)
}

pub async fn login(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Form(f): Form<Fields>,
) -> Response {
    let name = field(&f, "name").unwrap_or_default().to_string();
    let password = f
        .iter()
        .find(|(k, _)| k == "password")
        .map(|(_, v)| v.as_str())
        .unwrap_or_default();
    let ip = Some(peer.ip());
    if app.limiter.blocked(&name, ip) {
        record(
            &app,
            &name,
            "login",
            &peer.ip().to_string(),
            "refused: too many failed logins",
        )
        .await;
        let page = login_form(Some("Too many failed logins; wait a few minutes."));
        return (StatusCode::TOO_MANY_REQUESTS, page).into_response();
    }
    match billing_ops::operators::check(&app.common, &name, password).await {
        Ok(Some(role)) => match auth::open(&app.common, &name, role).await {
            Ok(token) => {
                app.limiter.succeeded(&name);
                record(&app, &name, "login", &peer.ip().to_string(), "ok").await;
                let cookie = auth::cookie(Some(&token), app.secure_cookie);
                ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response()
            }
            Err(e) => Failure::from(e).into_response(),
        },
        Ok(None) => {
            app.limiter.failed(&name, ip);
            record(
                &app,
                &name,
                "login",
                &peer.ip().to_string(),
                "refused: wrong name or password",
            )
            .await;
            let page = login_form(Some("Wrong name or password."));
            (StatusCode::UNAUTHORIZED, page).into_response()
        }
        Err(e) => Failure::from(e).into_response(),
    }
}

pub async fn logout(
    State(app): State<App>,
    headers: HeaderMap,
    s: Session,
    Form(f): Form<Fields>,
) -> Response {
    if !field(&f, "csrf").is_some_and(|c| auth::same(c, &s.csrf)) {
        return Failure(StatusCode::FORBIDDEN, auth::Refusal::Csrf.message().into())
            .into_response();
    }
    if let Some(token) = auth::token(&headers)
        && let Err(e) = auth::close(&app.common, &token).await
    {
        return Failure::from(e).into_response();
    }
    let cookie = auth::cookie(None, app.secure_cookie);
    ([(header::SET_COOKIE, cookie)], Redirect::to("/login")).into_response()
}

// ---- overview ------------------------------------------------------------------------

pub async fn overview(State(app): State<App>, s: Session) -> Result<Markup, Failure> {
    let months = overview::months(&app.common).await?;
    let members = overview::member_count(&app.common).await?;
    let groups = overview::groups(&app.common).await;
    let body = html! {
        // Refreshes itself without script (the policy allows none).
        meta http-equiv="refresh" content="10";
        p { (won(members)) " members on file. As of " (local(&app, app.common.clock.now())) " (" (app.common.billing_tz.name()) "), refreshed every 10 s." }
        table {
            thead { tr { th { "Month" } th { "Bills" } th { "Final amounts (won)" } th { "Dispatched" }
                         th { "Sent by email" } th { "Sent by SMS" } th { "Failed, retrying" } th { "Dead" } th { "Pending" } } }
            tbody {
                @for m in &months {
                    tr {
                        td { (m.billing_month) } td.n { (won(m.bills)) } td.n { (won(m.final_amount)) }
                        td.n { (won(m.dispatched)) } td.n { (won(m.sent_email)) } td.n { (won(m.sent_sms)) }
                        td.n { (won(m.failed)) } td.n { (won(m.dead)) } td.n { (won(m.pending)) }
                    }
                }
            }
        }
        @if months.is_empty() { p { "No bills yet: settle a month (billing settle --month YYYY-MM)." } }
        h2 { "Processors" }
        @match &groups {
            Ok(groups) => table #groups {
                thead { tr { th { "Group" } th { "State" } th { "Instances" } th { "Lag (records)" } th { "Topics" } } }
                tbody { @for g in groups {
                    tr class=(if g.members > 0 { "up" } else { "down" }) {
                        td { (g.group) } td { (g.state) } td.n { (g.members) } td.n { (won(g.lag)) } td { (g.topics.join(", ")) }
                    }
                } }
            },
            Err(e) => p.error { "The broker cannot be asked: " (e.to_string()) },
        }
    };
    Ok(layout("Overview", Some(&s), body))
}

// ---- dispatch ------------------------------------------------------------------------

async fn dispatch_view(app: &App, s: &Session, n: Option<Notice>) -> Result<Markup, Failure> {
    let p = dispatch::preview(&app.common, None).await?;
    let passes = dispatch::passes(&app.common, 20).await?;
    let body = html! {
        (notice(n.as_ref()))
        section.preview {
            h2 { "If dispatched now" }
            dl {
                dt { "Due, not yet dispatched" } dd #due { (p.due) }
                dt { "Held by the system quiet hours" } dd #held-quiet { (if p.quiet_hours { p.due } else { 0 }) }
                dt { "Held by members' do-not-disturb windows" } dd #held-window { (if p.quiet_hours { 0 } else { p.held_by_window }) }
                dt { "Would be dispatched" } dd #would { (p.would_dispatch()) }
            }
            (action_form(s, "/dispatch", "Dispatch now", html! {}))
        }
        h2 { "Passes" }
        table {
            thead { tr { th { "Pass" } th { "Run at" } th { "Trigger" } th { "Selected" } th { "Held" } th { "Published" } } }
            tbody {
                @for p in &passes {
                    tr { td { (p.id) } td { (local(app, p.run_at)) } td { (p.trigger) } td.n { (p.selected) } td.n { (p.held) }
                         td { @if p.completed_at.is_some() { "all" } @else { "in progress" } } }
                }
            }
        }
    };
    Ok(layout("Dispatch", Some(s), body))
}

pub async fn dispatch_page(State(app): State<App>, s: Session) -> Result<Markup, Failure> {
    dispatch_view(&app, &s, None).await
}

pub async fn dispatch_now(
    State(app): State<App>,
    s: Session,
    Form(f): Form<Fields>,
) -> Result<Markup, Failure> {
    let run = dispatch::dispatch(&app.common, None);
    let n = match act(&app, &s, &f, "dispatch", "now".into(), run).await? {
        Ok(p) => Notice::Done(format!(
            "Dispatch pass done: {} bills selected, {} held, {} email requests published{}.",
            p.selected,
            p.held,
            p.published,
            if p.quiet_hours {
                " (inside the system quiet hours: every due bill held)"
            } else {
                ""
            }
        )),
        Err(e) => Notice::Failed(e.to_string()),
    };
    dispatch_view(&app, &s, Some(n)).await
}

// ---- reservations --------------------------------------------------------------------

async fn reservations_view(app: &App, s: &Session, n: Option<Notice>) -> Result<Markup, Failure> {
    let rs = dispatch::reservations(&app.common, true).await?;
    let body = html! {
        (notice(n.as_ref()))
        table {
            thead { tr { th { "Id" } th { "Fires at" } th { "Month" } th { "Members" } th { "Fired at" } th { "Note" } th {} } }
            tbody {
                @for r in &rs {
                    tr {
                        td { (r.id) } td { (local(app, r.fire_at)) } td { (r.billing_month.as_deref().unwrap_or("any")) }
                        td { @match &r.member_ids { Some(ids) => (ids.iter().map(i64::to_string).collect::<Vec<_>>().join(", ")), None => "all" } }
                        td { @match r.fired_at { Some(t) => (local(app, t)), None => "waiting" } }
                        td { (r.note.as_deref().unwrap_or("")) }
                        td { @if r.fired_at.is_none() { (action_form(s, &format!("/reservations/{}/cancel", r.id), "Cancel", html! {})) } }
                    }
                }
            }
        }
        h2 { "Reserve a dispatch" }
        (action_form(s, "/reservations", "Reserve", html! {
            label { "At (" (app.common.billing_tz.name()) ") " input name="fire_at" type="datetime-local" required; }
            label { "Month " input name="month" placeholder="YYYY-MM"; }
            label { "Members " input name="members" placeholder="ids, comma-separated"; }
            label { "Note " input name="note"; }
        }))
    };
    Ok(layout("Reservations", Some(s), body))
}

pub async fn reservations_page(State(app): State<App>, s: Session) -> Result<Markup, Failure> {
    reservations_view(&app, &s, None).await
}

fn parse_reservation(app: &App, f: &Fields) -> Result<(DateTime<Utc>, dispatch::Scope), OpsError> {
    let at = field(f, "fire_at").unwrap_or_default();
    let naive = NaiveDateTime::parse_from_str(at, "%Y-%m-%dT%H:%M")
        .or_else(|_| NaiveDateTime::parse_from_str(at, "%Y-%m-%dT%H:%M:%S"))
        .map_err(|_| OpsError::Invalid(format!("{at:?} is not a date and time")))?;
    let fire_at = app
        .common
        .billing_tz
        .from_local_datetime(&naive)
        .earliest()
        .ok_or_else(|| {
            OpsError::Invalid(format!("{at} does not exist in {}", app.common.billing_tz))
        })?
        .with_timezone(&Utc);
    let members = field(f, "members")
        .map(|m| {
            m.split(',')
                .map(|id| {
                    id.trim()
                        .parse::<i64>()
                        .map_err(|_| OpsError::Invalid(format!("{id:?} is not a member id")))
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;
    let scope = dispatch::Scope {
        billing_month: field(f, "month").map(str::to_string),
        member_ids: members,
    };
    Ok((fire_at, scope))
}

pub async fn reservation_add(
    State(app): State<App>,
    s: Session,
    Form(f): Form<Fields>,
) -> Result<Response, Failure> {
    let detail = format!(
        "at {} month {} members {}",
        field(&f, "fire_at").unwrap_or("-"),
        field(&f, "month").unwrap_or("-"),
        field(&f, "members").unwrap_or("-")
    );
    let common = app.common.clone();
    let parsed = parse_reservation(&app, &f);
    let note = field(&f, "note").map(str::to_string);
    let run = async move {
        let (at, scope) = parsed?;
        dispatch::reserve(&common, at, scope, note).await
    };
    let n = match act(&app, &s, &f, "reservation add", detail, run).await? {
        Ok(r) => Notice::Done(format!(
            "Reservation {} fires at {}.",
            r.id,
            local(&app, r.fire_at)
        )),
        Err(e) => {
            return Ok(failed_form(
                reservations_view(&app, &s, Some(Notice::Failed(e.to_string()))).await?,
            ));
        }
    };
    Ok(reservations_view(&app, &s, Some(n)).await?.into_response())
}

/// A form re-shown with its validation error.
fn failed_form(page: Markup) -> Response {
    (StatusCode::UNPROCESSABLE_ENTITY, page).into_response()
}

pub async fn reservation_cancel(
    State(app): State<App>,
    s: Session,
    Path(id): Path<i64>,
    Form(f): Form<Fields>,
) -> Result<Markup, Failure> {
    let run = dispatch::cancel_reservation(&app.common, id);
    let n = match act(
        &app,
        &s,
        &f,
        "reservation cancel",
        format!("reservation {id}"),
        run,
    )
    .await?
    {
        Ok(()) => Notice::Done(format!("Reservation {id} cancelled.")),
        Err(e) => Notice::Failed(e.to_string()),
    };
    reservations_view(&app, &s, Some(n)).await
}

// ---- quiet hours ---------------------------------------------------------------------

async fn quiet_view(app: &App, s: &Session, n: Option<Notice>) -> Result<Markup, Failure> {
    let q = quiet_hours::show(&app.common).await?;
    let body = html! {
        (notice(n.as_ref()))
        p { "No message is sent and no bill dispatched from " strong #quiet-start { (q.start_time.format("%H:%M")) }
            " to " strong #quiet-end { (q.end_time.format("%H:%M")) } " (" (q.time_zone) "; a window may cross midnight). Changed "
            (local(app, q.updated_at)) "." }
        (action_form(s, "/quiet-hours", "Save", html! {
            label { "From " input name="start" value=(q.start_time.format("%H:%M")) pattern="[0-2][0-9]:[0-5][0-9]" required; }
            label { "to " input name="end" value=(q.end_time.format("%H:%M")) pattern="[0-2][0-9]:[0-5][0-9]" required; }
        }))
    };
    Ok(layout("Quiet hours", Some(s), body))
}

pub async fn quiet_page(State(app): State<App>, s: Session) -> Result<Markup, Failure> {
    quiet_view(&app, &s, None).await
}

pub async fn quiet_set(
    State(app): State<App>,
    s: Session,
    Form(f): Form<Fields>,
) -> Result<Response, Failure> {
    let (start, end) = (
        field(&f, "start").unwrap_or_default().to_string(),
        field(&f, "end").unwrap_or_default().to_string(),
    );
    let run = quiet_hours::set(&app.common, &start, &end);
    match act(
        &app,
        &s,
        &f,
        "quiet-hours set",
        format!("{start}-{end}"),
        run,
    )
    .await?
    {
        Ok(q) => Ok(quiet_view(
            &app,
            &s,
            Some(Notice::Done(format!("Quiet hours are now {q}."))),
        )
        .await?
        .into_response()),
        Err(e) => Ok(failed_form(
            quiet_view(&app, &s, Some(Notice::Failed(e.to_string()))).await?,
        )),
    }
}

// ---- templates -----------------------------------------------------------------------

async fn templates_view(app: &App, s: &Session, n: Option<Notice>) -> Result<Markup, Failure> {
    let ts = templates::list(&app.common).await?;
    let body = html! {
        (notice(n.as_ref()))
        table {
            thead { tr { th { "Id" } th { "Channel" } th { "Name" } th { "Version" } th { "Active" } th { "Created" } } }
            tbody {
                @for t in &ts {
                    tr { td { a href=(format!("/templates/{}", t.id)) { (t.id) } } td { (t.channel) } td { (t.name) }
                         td { (t.version) } td { @if t.active { "active" } } td { (local(app, t.created_at)) } }
                }
            }
        }
        h2 { "New version" }
        (action_form(s, "/templates", "Create", html! {
            label { "Channel " select name="channel" { option value="email" { "email" } option value="sms" { "sms" } } }
            label { "Name " input name="name" required; }
            label { "Subject (email) " input name="subject"; }
            label.wide { "Body " textarea name="body" rows="8" required {} }
        }))
    };
    Ok(layout("Templates", Some(s), body))
}

pub async fn templates_page(State(app): State<App>, s: Session) -> Result<Markup, Failure> {
    templates_view(&app, &s, None).await
}

pub async fn template_create(
    State(app): State<App>,
    s: Session,
    Form(f): Form<Fields>,
) -> Result<Response, Failure> {
    let (channel, name) = (
        field(&f, "channel").unwrap_or_default(),
        field(&f, "name").unwrap_or_default(),
    );
    let body = f
        .iter()
        .find(|(k, _)| k == "body")
        .map_or("", |(_, v)| v.as_str());
    let run = templates::create(&app.common, channel, name, field(&f, "subject"), body);
    match act(
        &app,
        &s,
        &f,
        "template create",
        format!("{channel} {name}"),
        run,
    )
    .await?
    {
        Ok(t) => Ok(Redirect::to(&format!("/templates/{}", t.id)).into_response()),
        Err(e) => Ok(failed_form(
            templates_view(&app, &s, Some(Notice::Failed(e.to_string()))).await?,
        )),
    }
}

async fn template_view(
    app: &App,
    s: &Session,
    id: i64,
    n: Option<Notice>,
) -> Result<Markup, Failure> {
    let t = templates::show(&app.common, id).await?;
    let preview = templates::preview(&app.common, id, None).await;
    let body = html! {
        (notice(n.as_ref()))
        p { (t.channel) " template " strong { (t.name) } " version " (t.version) ". "
            @if t.active { strong #active { "Active." } } @else { "Not active." } }
        @if !t.active { (action_form(s, &format!("/templates/{id}/activate"), "Activate", html! {})) }
        h2 { "Source" }
        @if let Some(subject) = &t.subject { p { "Subject: " code { (subject) } } }
        pre { (t.body) }
        h2 { "Preview with a real bill" }
        @match preview {
            Ok((subject, _)) => {
                @if let Some(subject) = subject { p { "Subject: " strong #preview-subject { (subject) } } }
                // The message itself, rendered in a sandboxed frame that may run nothing.
                iframe #preview sandbox="" src=(format!("/templates/{id}/preview")) title="rendered message" {}
            }
            Err(e) => p.error { (e.to_string()) },
        }
    };
    Ok(layout(&format!("Template {id}"), Some(s), body))
}

pub async fn template_page(
    State(app): State<App>,
    s: Session,
    Path(id): Path<i64>,
) -> Result<Markup, Failure> {
    template_view(&app, &s, id, None).await
}

/// The rendered message alone, for the preview frame: HTML for email (its inline styles
/// allowed, nothing else; sandboxed), text for SMS.
pub async fn template_preview(
    State(app): State<App>,
    _s: Session,
    Path(id): Path<i64>,
) -> Result<Response, Failure> {
    let t = templates::show(&app.common, id).await?;
    let (_, rendered) = templates::preview(&app.common, id, None).await?;
    let kind = if t.channel == "email" {
        "text/html; charset=utf-8"
    } else {
        "text/plain; charset=utf-8"
    };
    let csp = "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'self'; sandbox";
    Ok((
        [
            (header::CONTENT_TYPE, kind),
            (header::CONTENT_SECURITY_POLICY, csp),
            (header::X_FRAME_OPTIONS, "SAMEORIGIN"),
        ],
        rendered,
    )
        .into_response())
}

pub async fn template_activate(
    State(app): State<App>,
    s: Session,
    Path(id): Path<i64>,
    Form(f): Form<Fields>,
) -> Result<Response, Failure> {
    let run = templates::activate(&app.common, id);
    match act(
        &app,
        &s,
        &f,
        "template activate",
        format!("template {id}"),
        run,
    )
    .await?
    {
        Ok(_) => Ok(template_view(
            &app,
            &s,
            id,
            Some(Notice::Done(format!("Template {id} is active."))),
        )
        .await?
        .into_response()),
        Err(e) => Ok(failed_form(
            template_view(&app, &s, id, Some(Notice::Failed(e.to_string()))).await?,
        )),
    }
}

// ---- dead letters --------------------------------------------------------------------

#[derive(Debug, serde::Deserialize)]
pub struct LetterQuery {
    stage: Option<String>,
    all: Option<String>,
    /// `YYYY-MM-DDTHH:MM` in BILLING_TZ (a `datetime-local` field).
    since: Option<String>,
    until: Option<String>,
}

/// A `datetime-local` value read in the business time zone; empty or malformed is no bound.
fn local_instant(app: &App, v: Option<&str>) -> Option<DateTime<Utc>> {
    let naive = NaiveDateTime::parse_from_str(v?.trim(), "%Y-%m-%dT%H:%M").ok()?;
    let local = app
        .common
        .billing_tz
        .from_local_datetime(&naive)
        .earliest()?;
    Some(local.with_timezone(&Utc))
}

async fn letters_view(
    app: &App,
    s: &Session,
    q: &LetterQuery,
    n: Option<Notice>,
) -> Result<Markup, Failure> {
    let filter = dlq::Filter {
        stage: q.stage.clone().filter(|st| !st.is_empty()),
        include_replayed: q.all.is_some(),
        since: local_instant(app, q.since.as_deref()),
        until: local_instant(app, q.until.as_deref()),
        limit: 200,
    };
    let letters = dlq::list(&app.common, &filter).await?;
    let body = html! {
        (notice(n.as_ref()))
        form method="get" action="/dead-letters" {
            label { "Stage " input name="stage" value=(filter.stage.as_deref().unwrap_or("")); }
            label { "From (" (app.common.billing_tz.name()) ") " input name="since" type="datetime-local" value=(q.since.as_deref().unwrap_or("")); }
            label { "Before " input name="until" type="datetime-local" value=(q.until.as_deref().unwrap_or("")); }
            label { input type="checkbox" name="all" value="1" checked[filter.include_replayed]; " replayed too" }
            button type="submit" { "Filter" }
        }
        form method="post" action="/dead-letters/replay" {
            (csrf(s))
            table {
                thead { tr { th {} th { "Id" } th { "When" } th { "Stage" } th { "Source" } th { "Reason" } th { "Replayed" } } }
                tbody {
                    @for l in &letters {
                        tr {
                            td { @if l.replayed_at.is_none() && l.payload.is_some() { input type="checkbox" name="ids" value=(l.id) aria-label=(format!("select letter {}", l.id)); } }
                            td { a href=(format!("/dead-letters/{}", l.id)) { (l.id) } }
                            td { (local(app, l.created_at)) } td { (l.stage) }
                            td { (l.source_topic) "/" (l.source_partition) "@" (l.source_offset) }
                            td { (l.reason) }
                            td { @if let Some(t) = l.replayed_at { (local(app, t)) } }
                        }
                    }
                }
            }
            button type="submit" { "Replay selected" }
        }
    };
    Ok(layout("Dead letters", Some(s), body))
}

pub async fn letters_page(
    State(app): State<App>,
    s: Session,
    Query(q): Query<LetterQuery>,
) -> Result<Markup, Failure> {
    letters_view(&app, &s, &q, None).await
}

pub async fn letter_page(
    State(app): State<App>,
    s: Session,
    Path(id): Path<i64>,
) -> Result<Markup, Failure> {
    let letter = dlq::one(&app.common, id).await?;
    let mut payload = dlq::payload_json(&app.common, &letter).await;
    if let Ok(v) = payload.as_mut() {
        mask::json(v);
    }
    let body = html! {
        dl {
            dt { "Stage" } dd { (letter.stage) }
            dt { "Source" } dd { (letter.source_topic) "/" (letter.source_partition) "@" (letter.source_offset) }
            dt { "Reason" } dd #reason { (letter.reason) }
            dt { "Recorded" } dd { (local(&app, letter.created_at)) }
            dt { "Replayed" } dd { @match letter.replayed_at { Some(t) => (local(&app, t)), None => "no" } }
        }
        h2 { "Payload" }
        @match &payload {
            Ok(v) => pre #payload { (serde_json::to_string_pretty(v).unwrap_or_default()) },
            Err(e) => p.error { "Cannot be decoded: " (e) },
        }
        h2 { "Attempts" }
        pre { (serde_json::to_string_pretty(&letter.attempts).unwrap_or_default()) }
        @if letter.replayed_at.is_none() && letter.payload.is_some() {
            (action_form(&s, "/dead-letters/replay", "Replay", html! { input type="hidden" name="ids" value=(letter.id); }))
        }
    };
    Ok(layout(&format!("Dead letter {id}"), Some(&s), body))
}

pub async fn letters_replay(
    State(app): State<App>,
    s: Session,
    Form(f): Form<Fields>,
) -> Result<Markup, Failure> {
    let ids: Result<Vec<i64>, _> = f
        .iter()
        .filter(|(k, _)| k == "ids")
        .map(|(_, v)| v.parse::<i64>())
        .collect();
    let ids = ids.map_err(|_| Failure(StatusCode::BAD_REQUEST, "letter ids are numbers".into()))?;
    let detail = format!("letters {ids:?}");
    let n = if ids.is_empty() {
        Notice::Failed("Select the letters to replay.".into())
    } else {
        match act(
            &app,
            &s,
            &f,
            "dlq replay",
            detail,
            dlq::replay(&app.common, &ids, 1000),
        )
        .await?
        {
            Ok(done) => Notice::Done(format!("Replayed {} letter(s): {done:?}.", done.len())),
            Err(e) => Notice::Failed(e.to_string()),
        }
    };
    let q = LetterQuery {
        stage: None,
        all: None,
        since: None,
        until: None,
    };
    letters_view(&app, &s, &q, Some(n)).await
}

// ---- members -------------------------------------------------------------------------

#[derive(Debug, serde::Deserialize)]
pub struct MemberQuery {
    id: Option<String>,
}

pub async fn member_find(s: Session, Query(q): Query<MemberQuery>) -> Response {
    match q.id.as_deref().map(str::trim).map(str::parse::<i64>) {
        Some(Ok(id)) => Redirect::to(&format!("/members/{id}")).into_response(),
        other => {
            let error = other.map(|_| "A member id is a number.");
            layout(
                "Members",
                Some(&s),
                html! {
                    @if let Some(e) = error { p.error { (e) } }
                    form method="get" action="/members" {
                        label { "Member id " input name="id" inputmode="numeric" required; }
                        button type="submit" { "Look up" }
                    }
                },
            )
            .into_response()
        }
    }
}

pub async fn member_page(
    State(app): State<App>,
    s: Session,
    Path(id): Path<i64>,
) -> Result<Markup, Failure> {
    let h = overview::member(&app.common, id).await?;
    let m = &h.member;
    let body = html! {
        dl {
            dt { "Name" } dd #member-name { (m.name) }
            dt { "Email" } dd { (m.email) }
            dt { "Phone" } dd { (m.phone) }
            dt { "Plan" } dd { (m.plan_id) }
            dt { "Delivery day" } dd { (m.delivery_day) }
            dt { "Do not disturb" } dd { @match (m.dnd_start, m.dnd_end) {
                (Some(a), Some(b)) => (format!("{}-{}", a.format("%H:%M"), b.format("%H:%M"))),
                _ => "none" } }
        }
        @for b in &h.bills {
            section {
                h2 { "Bill " (b.id) " for " (b.billing_month) ": " (won(b.final_amount)) " won" }
                p { @match b.dispatched_at { Some(t) => { "Dispatched " (local(&app, t)) "." }, None => "Not dispatched yet." } }
                table {
                    thead { tr { th { "Kind" } th { "Item" } th { "Quantity" } th { "Amount (won)" } } }
                    tbody { @for i in h.items.iter().filter(|i| i.bill_id == b.id) {
                        tr { td { (i.kind) } td { (i.description) } td.n { (i.quantity) } td.n { (won(i.amount)) } }
                    } }
                }
                table.deliveries {
                    thead { tr { th { "Channel" } th { "Status" } th { "Attempts" } th { "Sent at" } th { "Last error" } } }
                    tbody { @for d in h.deliveries.iter().filter(|d| d.bill_id == b.id) {
                        tr { td { (d.channel) } td { (d.status) } td.n { (d.attempts) }
                             td { @if let Some(t) = d.sent_at { (local(&app, t)) } } td { (d.last_error.as_deref().unwrap_or("")) } }
                    } }
                }
            }
        }
    };
    Ok(layout(&format!("Member {id}"), Some(&s), body))
}

// ---- audit ---------------------------------------------------------------------------

pub async fn audit_page(State(app): State<App>, s: Session) -> Result<Markup, Failure> {
    let entries = audit::list(&app.common, 500).await?;
    let body = html! {
        table {
            thead { tr { th { "When" } th { "Who" } th { "Action" } th { "Detail" } th { "Result" } } }
            tbody { @for e in &entries {
                tr { td { (local(&app, e.at)) } td { (e.operator) } td { (e.action) } td { (e.detail) } td { (e.result) } }
            } }
        }
    };
    Ok(layout("Audit", Some(&s), body))
}

pub async fn stylesheet() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css")],
        include_str!("console.css"),
    )
}
