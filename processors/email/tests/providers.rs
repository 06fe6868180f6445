//! The real providers over the real broker, registry and PostgreSQL: email through a real
//! SMTP server (aiosmtpd from PyPI, which scripts/test installs; `BILLING_PYTHON` names its
//! interpreter), SMS through an HTTP provider served by the test; a provider outage of a few
//! seconds behind the circuit breaker costs no attempt and sends no SMS fallback; the rate
//! limit holds as the provider measures it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    collections::HashMap,
    net::TcpListener,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{Json, extract::State, http::HeaderMap, http::StatusCode, routing::post};
use billing_messaging::{
    Mail, MailGateway, SendError, Sms, SmsGateway,
    guard::{GuardArgs, Guarded},
    providers::{HttpSmsGateway, SmtpGateway},
};
use common::*;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn python() -> String {
    std::env::var("BILLING_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// aiosmtpd writing every message it accepts into a Maildir.
struct SmtpServer {
    _child: tokio::process::Child,
    port: u16,
    dir: PathBuf,
}

async fn smtp_server() -> SmtpServer {
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("billing-smtp-{port}-{}", std::process::id()));
    let child = tokio::process::Command::new(python())
        .args([
            "-m",
            "aiosmtpd",
            "-n",
            "-l",
            &format!("127.0.0.1:{port}"),
            "-c",
            "aiosmtpd.handlers.Mailbox",
        ])
        .arg(&dir)
        .kill_on_drop(true)
        .spawn()
        .expect(
            "python with aiosmtpd (scripts/test installs it; BILLING_PYTHON names the interpreter)",
        );
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    SmtpServer {
        _child: child,
        port,
        dir,
    }
}

/// The messages in a Maildir, parsed by Python's `email` package: to, subject, message id,
/// and the decoded text and HTML parts.
fn maildir(dir: &Path) -> Vec<serde_json::Value> {
    let script = r#"
import email, email.policy, json, mailbox, sys
out = []
for m in mailbox.Maildir(sys.argv[1], create=False):
    msg = email.message_from_bytes(m.as_bytes(), policy=email.policy.default)
    body = {p.get_content_type(): p.get_content() for p in msg.walk() if not p.is_multipart()}
    out.append({"to": str(msg["To"]), "subject": str(msg["Subject"]), "message_id": str(msg["Message-ID"]),
                "bcc": msg["Bcc"], "text": body.get("text/plain"), "html": body.get("text/html")})
print(json.dumps(out))
"#;
    let out = std::process::Command::new(python())
        .arg("-c")
        .arg(script)
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// An SMS gateway that records and accepts everything (the SMS side of the SMTP test).
#[derive(Debug, Clone, Default)]
struct Accepting(Arc<Mutex<Vec<String>>>);

impl SmsGateway for Accepting {
    async fn send(&self, sms: &Sms) -> Result<(), SendError> {
        self.0.lock().unwrap().push(sms.to.clone());
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bills_go_out_through_a_real_smtp_server() {
    // Given bills, one for a member whose name carries markup and a header break
    let (env, common) = setup().await;
    let hostile = "<b>Kim</b>\r\nBcc: evil@example.com";
    bills(&common, &[1, 2, 3], &[(2, hostile)], &[]).await;
    let server = smtp_server().await;
    let url = format!("smtp://127.0.0.1:{}", server.port);
    let smtp = SmtpGateway::new(&url, "Billing <bills@telco.example>", 4).unwrap();

    // When the email channel sends them through the SMTP gateway
    request(&common, &env, &[bill_id(1), bill_id(2), bill_id(3)]).await;
    let sms = Accepting::default();
    let (s, tasks) = start(&common, smtp, sms.clone(), &config(3, 300)).await;
    let db = common.database_url.clone();
    let sent =
        "select count(*)::bigint as n from delivery where channel = 'email' and status = 'sent'";
    wait_for(&db, sent, 3, Duration::from_secs(60)).await;
    stop(s, tasks).await;

    // Then the server holds one message per bill, addressed, titled and escaped
    let mut messages = maildir(&server.dir);
    messages.sort_by_key(|m| m["to"].as_str().unwrap().to_string());
    assert_eq!(messages.len(), 3);
    for (m, id) in messages.iter().zip([1, 2, 3]) {
        assert_eq!(m["to"], email(id));
        assert!(m["subject"].as_str().unwrap().contains("2026-11"), "{m}");
        assert_eq!(
            m["message_id"],
            format!("<email-{}@telco.example>", bill_id(id))
        );
        assert!(m["bcc"].is_null());
        assert!(m["text"].as_str().unwrap().contains("55,000"), "{m}");
        assert!(m["html"].as_str().unwrap().contains("55,000"), "{m}");
    }
    let m2 = &messages[1];
    let subject = m2["subject"].as_str().unwrap();
    assert!(
        !subject.contains('\n') && !subject.contains('\r'),
        "{subject:?}"
    );
    let html = m2["html"].as_str().unwrap();
    assert!(
        html.contains("&lt;b&gt;Kim&lt;/b&gt;") && !html.contains("<b>Kim"),
        "{html}"
    );
    assert!(sms.0.lock().unwrap().is_empty(), "no SMS fallback");
}

/// What the test's SMS provider saw, and how it answers.
#[derive(Debug, Default)]
struct Provider {
    /// (when, authorization, idempotency key, to) of every accepted message.
    accepted: Vec<(Instant, String, String, String)>,
    /// Requests answered 503 (the outage).
    refused: u64,
    /// An outage of this long, starting at the first request (whenever the test's machine
    /// gets there).
    outage: Option<Duration>,
    down_until: Option<Instant>,
    /// Numbers the provider refuses for good (400).
    invalid: Vec<String>,
}

type Shared = Arc<Mutex<Provider>>;

async fn provider_accepts(
    State(p): State<Shared>,
    headers: HeaderMap,
    Json(body): Json<serde_json::Value>,
) -> StatusCode {
    let mut p = p.lock().unwrap();
    if let Some(outage) = p.outage.take() {
        p.down_until = Some(Instant::now() + outage);
    }
    if p.down_until.is_some_and(|t| Instant::now() < t) {
        p.refused += 1;
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let to = body["to"].as_str().unwrap_or_default().to_string();
    if p.invalid.contains(&to) {
        return StatusCode::BAD_REQUEST;
    }
    let header = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let entry = (
        Instant::now(),
        header("authorization"),
        header("idempotency-key"),
        to,
    );
    p.accepted.push(entry);
    StatusCode::ACCEPTED
}

async fn sms_provider(state: Shared) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/messages", listener.local_addr().unwrap());
    let app = axum::Router::new()
        .route("/messages", post(provider_accepts))
        .with_state(state);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

/// An email provider that fails every send transiently for 2 s from its first send.
#[derive(Debug, Clone)]
struct Outage {
    until: Arc<Mutex<Option<Instant>>>,
    sent: Arc<Mutex<Vec<String>>>,
    refused: Arc<Mutex<u64>>,
}

impl MailGateway for Outage {
    async fn send(&self, mail: &Mail) -> Result<(), SendError> {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let until = *self
            .until
            .lock()
            .unwrap()
            .get_or_insert_with(|| Instant::now() + Duration::from_secs(2));
        if Instant::now() < until {
            *self.refused.lock().unwrap() += 1;
            return Err(SendError::Transient("421 service not available".into()));
        }
        self.sent.lock().unwrap().push(mail.to.clone());
        Ok(())
    }
}

/// Bills whose email addresses are undeliverable (`.invalid`): they go straight to SMS.
async fn bills_for_sms(common: &billing_runtime::CommonArgs, members: &[i64]) {
    let emails: Vec<(i64, String)> = members
        .iter()
        .map(|&m| (m, format!("m{m}@bounce.invalid")))
        .collect();
    let emails: Vec<(i64, &str)> = emails.iter().map(|(m, e)| (*m, e.as_str())).collect();
    bills(common, members, &[], &emails).await;
}

/// The simulated email provider, quick and without random failures (it refuses `.invalid`).
fn undeliverable_email() -> billing_messaging::SimulatedGateway {
    let args = billing_messaging::SimulationArgs {
        latency_ms: 1,
        failure_rate: 0.0,
        seed: 1,
        mailbox: "memory".into(),
    };
    billing_messaging::SimulatedGateway::new("email", &args, None).unwrap()
}

/// Sends may wait on the breaker up to 10 s (a loaded CI machine is slow to probe), under a
/// claim lease of 30 s.
fn guard(rate: f64) -> GuardArgs {
    GuardArgs {
        rate,
        breaker_failures: Some(3),
        open_ms: 300,
        max_hold_ms: 10_000,
    }
}

fn patient() -> billing_messaging::ChannelConfig {
    let mut c = config(3, 200);
    c.claim_lease = Duration::from_secs(30);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sms_go_out_through_an_http_provider_and_an_outage_costs_no_attempt() {
    // Given bills whose email is undeliverable, and an SMS provider down for the first 2 s
    let (env, common) = setup().await;
    let members: Vec<i64> = (1..=20).collect();
    bills_for_sms(&common, &members).await;
    let state = Shared::default();
    state.lock().unwrap().outage = Some(Duration::from_secs(2));
    state.lock().unwrap().invalid.push(phone(7));
    let url = sms_provider(state.clone()).await;
    let http = HttpSmsGateway::new(&url, "s3cret".into()).unwrap();
    let sms = Guarded::new(http, "sms", &guard(0.0), 0);
    let mail = undeliverable_email();

    // When the bills are requested: email gives up at once, SMS meets the outage
    let ids: Vec<i64> = members.iter().map(|&m| bill_id(m)).collect();
    request(&common, &env, &ids).await;
    let (s, tasks) = start(&common, mail, sms, &patient()).await;
    let db = common.database_url.clone();
    let done = "select count(*)::bigint as n from delivery where channel = 'sms' and status in ('sent', 'dead')";
    wait_for(&db, done, 20, Duration::from_secs(60)).await;
    stop(s, tasks).await;

    // Then every SMS went out on its first attempt (the outage held them), one per bill, with
    // the token and the bill's key; the number the provider refuses is dead at once
    {
        let p = state.lock().unwrap();
        assert!(p.refused > 0, "the outage was met");
        let keys: std::collections::BTreeSet<&str> =
            p.accepted.iter().map(|a| a.2.as_str()).collect();
        assert_eq!(p.accepted.len(), 19);
        assert_eq!(keys.len(), 19);
        assert!(p.accepted.iter().all(|a| a.1 == "Bearer s3cret"));
        for &m in &members {
            let key = format!("sms-{}", bill_id(m));
            assert_eq!(keys.contains(key.as_str()), m != 7, "{key}");
        }
    }
    let rows = deliveries(&db).await;
    let sms_rows: HashMap<i64, &DeliveryRow> = rows
        .iter()
        .filter(|r| r.channel == "sms")
        .map(|r| (r.bill_id, r))
        .collect();
    for &m in &members {
        let r = sms_rows[&bill_id(m)];
        assert_eq!(r.attempts, 1, "{r:?}");
        assert_eq!(r.status, if m == 7 { "dead" } else { "sent" }, "{r:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_email_outage_of_a_few_seconds_costs_no_attempt_and_no_sms_fallback() {
    let (env, common) = setup().await;
    let members: Vec<i64> = (1..=30).collect();
    bills(&common, &members, &[], &[]).await;
    let outage = Outage {
        until: Arc::default(),
        sent: Arc::default(),
        refused: Arc::default(),
    };
    let mail = Guarded::new(outage.clone(), "email", &guard(0.0), 0);
    let sms = Accepting::default();
    let ids: Vec<i64> = members.iter().map(|&m| bill_id(m)).collect();
    request(&common, &env, &ids).await;
    let (s, tasks) = start(&common, mail, sms.clone(), &patient()).await;
    let db = common.database_url.clone();
    let sent =
        "select count(*)::bigint as n from delivery where channel = 'email' and status = 'sent'";
    wait_for(&db, sent, 30, Duration::from_secs(60)).await;
    stop(s, tasks).await;

    assert!(*outage.refused.lock().unwrap() >= 3, "the outage was met");
    assert_eq!(outage.sent.lock().unwrap().len(), 30);
    assert!(sms.0.lock().unwrap().is_empty(), "no SMS fallback");
    let rows = deliveries(&db).await;
    assert!(
        rows.iter().all(|r| r.channel == "email" && r.attempts == 1),
        "{rows:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_holds_as_the_provider_measures_it() {
    // Given 60 bills for SMS and a limit of 20 messages a second
    let (env, common) = setup().await;
    let members: Vec<i64> = (1..=60).collect();
    bills_for_sms(&common, &members).await;
    let state = Shared::default();
    let url = sms_provider(state.clone()).await;
    let sms = Guarded::new(
        HttpSmsGateway::new(&url, "t".into()).unwrap(),
        "sms",
        &guard(20.0),
        0,
    );
    let mail = undeliverable_email();
    let ids: Vec<i64> = members.iter().map(|&m| bill_id(m)).collect();
    request(&common, &env, &ids).await;
    let (s, tasks) = start(&common, mail, sms, &patient()).await;
    let db = common.database_url.clone();
    let sent =
        "select count(*)::bigint as n from delivery where channel = 'sms' and status = 'sent'";
    wait_for(&db, sent, 60, Duration::from_secs(60)).await;
    stop(s, tasks).await;

    // Then the provider saw 20 a second (within 10 %)
    let p = state.lock().unwrap();
    let times: Vec<Instant> = p.accepted.iter().map(|a| a.0).collect();
    let span = (*times.iter().max().unwrap() - *times.iter().min().unwrap()).as_secs_f64();
    let rate = (times.len() - 1) as f64 / span;
    println!(
        "provider measured {rate:.2} messages/s over {span:.2} s for {} messages",
        times.len()
    );
    assert!((18.0..=22.0).contains(&rate), "{rate}");
}
