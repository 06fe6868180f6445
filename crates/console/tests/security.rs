//! The console's security rules over HTTP, against a real PostgreSQL and registry: no session
//! is sent to the login page, bad passwords are refused and then rate-limited, the session
//! cookie is HttpOnly and SameSite=Strict, every change needs the CSRF token and the operator
//! role (and both refusals are audited), markup in member data is inert, personal data is
//! masked on the dead-letter page, and the security headers are set.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use billing_ops::operators::{self, Role};
use billing_runtime::CommonArgs;
use billing_schema::{Encoder, Member, catalogue::MEMBERS};
use billing_testkit::{TestEnv, count};
use diesel_async::SimpleAsyncConnection;
use reqwest::{StatusCode, redirect::Policy};

const PASSWORD: &str = "correct horse battery";

struct Console {
    base: String,
    client: reqwest::Client,
    common: CommonArgs,
}

async fn start(env: &TestEnv) -> Console {
    let mut common = env.common.clone();
    common.database_url = env.database().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let c = common.clone();
    tokio::spawn(async move {
        billing_console::serve_on(listener, c, false, std::future::pending())
            .await
            .unwrap();
    });
    // The schema is migrated by the console at start: wait for it to answer.
    let client = reqwest::Client::builder()
        .redirect(Policy::none())
        .build()
        .unwrap();
    for _ in 0..100 {
        if client.get(format!("{base}/health")).send().await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    operators::add(&common, "olivia", Role::Operator, PASSWORD)
        .await
        .unwrap();
    operators::add(&common, "victor", Role::Viewer, PASSWORD)
        .await
        .unwrap();
    Console {
        base,
        client,
        common,
    }
}

impl Console {
    async fn login(&self, name: &str, password: &str) -> reqwest::Response {
        self.client
            .post(format!("{}/login", self.base))
            .form(&[("name", name), ("password", password)])
            .send()
            .await
            .unwrap()
    }

    /// Logs in and returns (cookie header, csrf token read from a page's form).
    async fn session(&self, name: &str) -> (String, String) {
        let r = self.login(name, PASSWORD).await;
        assert_eq!(r.status(), StatusCode::SEE_OTHER);
        let set = r.headers()["set-cookie"].to_str().unwrap().to_string();
        let cookie = set.split(';').next().unwrap().to_string();
        let page = self
            .get(&cookie, "/quiet-hours")
            .await
            .text()
            .await
            .unwrap();
        let at = page.find("name=\"csrf\" value=\"").unwrap() + 19;
        let csrf = page[at..at + 64].to_string();
        (cookie, csrf)
    }

    async fn get(&self, cookie: &str, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.base))
            .header("cookie", cookie)
            .send()
            .await
            .unwrap()
    }

    async fn post(&self, cookie: &str, path: &str, form: &[(&str, &str)]) -> reqwest::Response {
        self.client
            .post(format!("{}{path}", self.base))
            .header("cookie", cookie)
            .form(form)
            .send()
            .await
            .unwrap()
    }

    async fn quiet_hours(&self) -> String {
        billing_ops::quiet_hours::show(&self.common)
            .await
            .unwrap()
            .to_string()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_session_every_page_sends_to_login_and_changes_nothing() {
    let env = TestEnv::new().await;
    let c = start(&env).await;
    for path in ["/", "/dispatch", "/dead-letters", "/members/1", "/audit"] {
        let r = c.get("", path).await;
        assert_eq!(r.status(), StatusCode::SEE_OTHER, "{path}");
        assert_eq!(r.headers()["location"], "/login", "{path}");
    }
    let forged = format!("billing_session={}", "0".repeat(64));
    let r = c
        .post(
            &forged,
            "/quiet-hours",
            &[("start", "00:00"), ("end", "23:59")],
        )
        .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(c.quiet_hours().await, "21:00-08:00 Asia/Seoul");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_password_is_refused_and_repeated_failures_are_rate_limited() {
    let env = TestEnv::new().await;
    let c = start(&env).await;
    for _ in 0..5 {
        let r = c.login("olivia", "wrong password!").await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert!(r.headers().get("set-cookie").is_none());
    }
    // The sixth attempt is refused before the password is checked, even the right one.
    let r = c.login("olivia", PASSWORD).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(r.headers().get("set-cookie").is_none());
    // Another account from the same address is not locked out.
    assert_eq!(
        c.login("victor", PASSWORD).await.status(),
        StatusCode::SEE_OTHER
    );
    let audited =
        "select count(*)::bigint as n from audit where action = 'login' and result like 'refused%'";
    assert_eq!(count(&c.common.database_url, audited).await, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_cookie_is_http_only_and_same_site_and_pages_carry_strict_headers() {
    let env = TestEnv::new().await;
    let c = start(&env).await;
    let r = c.login("olivia", PASSWORD).await;
    let set = r.headers()["set-cookie"].to_str().unwrap();
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    let cookie = set.split(';').next().unwrap();
    let page = c.get(cookie, "/").await;
    assert_eq!(page.status(), StatusCode::OK);
    let csp = page.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"));
    assert_eq!(page.headers()["x-frame-options"], "DENY");
    assert_eq!(page.headers()["x-content-type-options"], "nosniff");
    // Logged out, the same cookie opens nothing.
    let (cookie, csrf) = c.session("olivia").await;
    c.post(&cookie, "/logout", &[("csrf", csrf.as_str())]).await;
    assert_eq!(c.get(&cookie, "/").await.status(), StatusCode::SEE_OTHER);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_needs_the_csrf_token_and_the_operator_role() {
    let env = TestEnv::new().await;
    let c = start(&env).await;
    let (op, op_csrf) = c.session("olivia").await;
    let (viewer, viewer_csrf) = c.session("victor").await;

    // Given no token, or another session's token: refused, nothing changed
    let r = c
        .post(&op, "/quiet-hours", &[("start", "22:00"), ("end", "07:00")])
        .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = c
        .post(
            &op,
            "/quiet-hours",
            &[
                ("csrf", viewer_csrf.as_str()),
                ("start", "22:00"),
                ("end", "07:00"),
            ],
        )
        .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // A viewer with its own token: refused
    let r = c
        .post(
            &viewer,
            "/quiet-hours",
            &[
                ("csrf", viewer_csrf.as_str()),
                ("start", "22:00"),
                ("end", "07:00"),
            ],
        )
        .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(
        r.text()
            .await
            .unwrap()
            .contains("viewers cannot change anything")
    );
    assert_eq!(c.quiet_hours().await, "21:00-08:00 Asia/Seoul");

    // An operator with the token: done; an invalid window is shown on the form
    let r = c
        .post(
            &op,
            "/quiet-hours",
            &[
                ("csrf", op_csrf.as_str()),
                ("start", "22:00"),
                ("end", "07:00"),
            ],
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(c.quiet_hours().await, "22:00-07:00 Asia/Seoul");
    let r = c
        .post(
            &op,
            "/quiet-hours",
            &[
                ("csrf", op_csrf.as_str()),
                ("start", "25:00"),
                ("end", "07:00"),
            ],
        )
        .await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert!(r.text().await.unwrap().contains("class=\"error\""));

    // Every attempt is in the audit trail with its outcome
    let url = &c.common.database_url;
    let n = |sql: &'static str| count(url, sql);
    assert_eq!(n("select count(*)::bigint as n from audit where action = 'quiet-hours set' and result like 'refused%'").await, 3);
    assert_eq!(n("select count(*)::bigint as n from audit where action = 'quiet-hours set' and operator = 'olivia' and result = 'ok'").await, 1);
    let audit = c.get(&op, "/audit").await.text().await.unwrap();
    assert!(audit.contains("quiet-hours set") && audit.contains("victor"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn markup_in_member_data_is_inert_and_contacts_are_masked_off_the_member_page() {
    let env = TestEnv::new().await;
    let c = start(&env).await;
    let (cookie, _) = c.session("victor").await;
    let name = "<script>alert('x')</script><img src=x onerror=alert(1)>";
    let mut conn = billing_db::connect(&c.common.database_url).await.unwrap();
    conn.batch_execute(&format!(
        "insert into member (id, name, email, phone, delivery_day, plan_id, updated_at)
         values (42, $${name}$$, 'yuna.kim@example.com', '010-1234-5678', 3, 'P1', now())"
    ))
    .await
    .unwrap();

    // The member page shows the contacts, and the name as text
    let page = c.get(&cookie, "/members/42").await.text().await.unwrap();
    assert!(!page.contains("<script>alert") && !page.contains("<img src=x"));
    assert!(page.contains("&lt;script&gt;alert('x')&lt;/script&gt;"));
    assert!(page.contains("yuna.kim@example.com") && page.contains("010-1234-5678"));

    // A dead letter holding the member's record shows it decoded, contacts masked
    let member = Member {
        member_id: 42,
        name: name.to_string(),
        email: "yuna.kim@example.com".into(),
        phone: "010-1234-5678".into(),
        delivery_day: 3,
        dnd_start_minute: None,
        dnd_end_minute: None,
        plan_id: "P1".into(),
        addon_ids: vec![],
        device_id: None,
        contract_months: 0,
        joined_on: 19_000,
        family_bundle: false,
        updated_at: 0,
    };
    let subject = env.catalogue().value_subject(&MEMBERS.spec);
    let enc = Encoder::<Member>::register(&env.registry, &subject)
        .await
        .unwrap();
    let payload: String = enc
        .encode(&member)
        .unwrap()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    conn.batch_execute(&format!(
        "insert into dead_letter (id, source_topic, source_partition, source_offset, stage, reason, payload)
         values (7, 'members', 0, 1, 'bill-sink', 'member refused: test', '\\x{payload}'::bytea)"
    ))
    .await
    .unwrap();
    let page = c
        .get(&cookie, "/dead-letters/7")
        .await
        .text()
        .await
        .unwrap();
    assert!(page.contains("y*******@example.com"), "{page}");
    assert!(page.contains("***-****-5678"));
    assert!(!page.contains("yuna.kim@") && !page.contains("1234-5678"));
    assert!(!page.contains("<script>alert"));
}
