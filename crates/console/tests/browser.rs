//! The console in a real browser: headless Chromium (Debian's `chromium`, driven through
//! `chromedriver` by fantoccini) against the console served on a real PostgreSQL, broker and
//! registry, on a month seeded and settled. An operator logs in, holds dispatch with the quiet
//! hours and sees it hold, dispatches and sees the email requests published to Kafka, creates
//! a template (a bad one refused on the form), previews and activates it, replays a dead
//! letter to its topic, looks a member up; a viewer is refused a change.
//!
//! With `BILLING_SCREENSHOTS=DIR` set, each page is saved there as a PNG (docs/console/).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{net::TcpListener, process::Stdio, time::Duration};

use billing_domain::BillingMonth;
use billing_ops::{
    operators::{self, Role},
    seed::{SeedOptions, seed},
    settle::settle,
};
use billing_runtime::Clock;
use billing_schema::{
    Encoder, UsageRecord,
    catalogue::{EMAIL_REQUESTS, USAGE_RECORDS},
};
use billing_testkit::{TestEnv, kst};
use diesel_async::SimpleAsyncConnection;
use fantoccini::{Client, ClientBuilder, Locator};

const PASSWORD: &str = "correct horse battery";
const MEMBERS: u64 = 40;

/// chromedriver on a free port, killed with this value.
struct Driver(#[allow(dead_code)] tokio::process::Child, u16);

async fn driver() -> Driver {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = tokio::process::Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect(
            "chromedriver not found: scripts/test installs Debian's chromium and chromium-driver",
        );
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Driver(child, port)
}

async fn browser(d: &Driver, profile: &std::path::Path) -> Client {
    let caps = serde_json::json!({
        "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--disable-quic", "--no-first-run",
                     "--window-size=1280,900", format!("--user-data-dir={}", profile.display())]
        }
    });
    let serde_json::Value::Object(caps) = caps else {
        unreachable!()
    };
    ClientBuilder::rustls()
        .unwrap()
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", d.1))
        .await
        .expect("start headless chromium")
}

struct Page<'a> {
    b: &'a Client,
    base: String,
}

impl Page<'_> {
    async fn open(&self, path: &str) {
        self.b.goto(&format!("{}{path}", self.base)).await.unwrap();
    }

    async fn text(&self, css: &str) -> String {
        self.b
            .find(Locator::Css(css))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    async fn fill(&self, css: &str, value: &str) {
        let e = self.b.find(Locator::Css(css)).await.unwrap();
        e.clear().await.unwrap();
        e.send_keys(value).await.unwrap();
    }

    async fn click(&self, css: &str) {
        self.b
            .find(Locator::Css(css))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
    }

    /// Clicks a form's button and waits for the page its answer loads.
    async fn submit(&self, css: &str) {
        let old = self.b.find(Locator::Css("html")).await.unwrap();
        self.click(css).await;
        for _ in 0..400 {
            if old.tag_name().await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        self.b
            .wait()
            .for_element(Locator::Css("main"))
            .await
            .unwrap();
    }

    async fn login(&self, name: &str) {
        self.open("/login").await;
        self.fill("input[name=name]", name).await;
        self.fill("input[name=password]", PASSWORD).await;
        self.submit("form[action='/login'] button").await;
    }

    async fn number(&self, css: &str) -> u64 {
        self.text(css).await.trim().parse().unwrap()
    }

    async fn set_quiet_hours(&self, start: &str, end: &str) {
        self.open("/quiet-hours").await;
        self.fill("input[name=start]", start).await;
        self.fill("input[name=end]", end).await;
        self.submit("form[action='/quiet-hours'] button").await;
    }

    /// Saves the page as `name.png` when BILLING_SCREENSHOTS names a directory.
    async fn shot(&self, name: &str) {
        if let Ok(dir) = std::env::var("BILLING_SCREENSHOTS") {
            let png = self.b.screenshot().await.unwrap();
            std::fs::write(std::path::Path::new(&dir).join(format!("{name}.png")), png).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_runs_the_month_from_the_browser_and_a_viewer_cannot_change_it() {
    // Given a settled month, the console on a clock at 13:00 on the last day of December (every
    // bill due), an operator and a viewer
    let env = TestEnv::new().await;
    let mut common = env.common.clone();
    common.database_url = env.database().await;
    common.clock = Clock::simulated(kst("2026-12-31T13:00:00"), 1.0);
    let month: BillingMonth = "2026-11".parse().unwrap();
    let options = SeedOptions {
        month,
        members: MEMBERS,
        seed: 3,
    };
    seed(&common, options, None).await.unwrap();
    settle(&common, month).await.unwrap();
    operators::add(&common, "olivia", Role::Operator, PASSWORD)
        .await
        .unwrap();
    operators::add(&common, "victor", Role::Viewer, PASSWORD)
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let c = common.clone();
    tokio::spawn(async move {
        billing_console::serve_on(listener, c, false, std::future::pending())
            .await
            .unwrap();
    });
    let d = driver().await;
    let profile = std::env::temp_dir().join(format!("console-browser-{}", std::process::id()));
    let b = browser(&d, &profile).await;
    let p = Page { b: &b, base };

    // The operator logs in and sees the month
    p.login("olivia").await;
    assert!(p.text("main").await.contains("2026-11"));
    p.shot("overview").await;

    // Quiet hours around 13:00: the preview and the pass hold every due bill
    p.set_quiet_hours("12:00", "14:00").await;
    assert!(p.text(".notice").await.contains("12:00-14:00"));
    p.shot("quiet-hours").await;
    p.open("/dispatch").await;
    let due = p.number("#due").await;
    assert!(due > 0);
    assert_eq!(p.number("#held-quiet").await, due);
    assert_eq!(p.number("#would").await, 0);
    p.submit("form[action='/dispatch'] button").await;
    assert!(p.text(".notice").await.contains("0 bills selected"));
    let requests = env.topic(&EMAIL_REQUESTS.spec);
    assert_eq!(env.record_count(&requests).await, 0);

    // Quiet hours back at night: dispatch now publishes the due bills' email requests
    p.set_quiet_hours("21:00", "08:00").await;
    p.open("/dispatch").await;
    let would = p.number("#would").await;
    assert!(would > 0);
    p.submit("form[action='/dispatch'] button").await;
    let done = p.text(".notice").await;
    assert!(done.contains(&format!("{would} bills selected")), "{done}");
    assert!(
        done.contains(&format!("{would} email requests published")),
        "{done}"
    );
    assert_eq!(env.record_count(&requests).await, would);
    p.shot("dispatch").await;

    // A template without the amount is refused at activation, on the page; a good one is
    // previewed with a real bill and activated
    p.open("/templates").await;
    p.fill("input[name=name]", "winter").await;
    p.fill(
        "input[name=subject]",
        "{{member_name}}, your {{billing_month}} bill",
    )
    .await;
    p.fill("textarea[name=body]", "Hello {{member_name}}").await;
    p.submit("form[action='/templates'] button").await;
    p.submit("form[action$='/activate'] button").await;
    assert!(p.text(".error").await.contains("final_amount"));
    p.open("/templates").await;
    p.fill("input[name=name]", "winter").await;
    p.fill(
        "input[name=subject]",
        "{{member_name}}, your {{billing_month}} bill",
    )
    .await;
    p.fill(
        "textarea[name=body]",
        "<p>Hello {{member_name}}: {{final_amount}} won for {{billing_month}}.</p>",
    )
    .await;
    p.submit("form[action='/templates'] button").await;
    assert!(p.text("#preview-subject").await.contains("2026-11"));
    b.find(Locator::Css("iframe#preview"))
        .await
        .unwrap()
        .enter_frame()
        .await
        .unwrap();
    assert!(p.text("body").await.contains("won for 2026-11"));
    b.enter_parent_frame().await.unwrap();
    p.submit("form[action$='/activate'] button").await;
    assert!(p.text(".notice").await.contains("is active"));
    p.shot("template").await;

    // A dead letter is replayed to its topic
    let usage = env.topic(&USAGE_RECORDS.spec);
    let before = env.record_count(&usage).await;
    let record = UsageRecord {
        usage_id: "u-replayed".into(),
        member_id: 1,
        product_id: "DATA".into(),
        quantity: 1,
        billing_month: "2026-11".into(),
        occurred_at: 0,
    };
    let subject = env.catalogue().value_subject(&USAGE_RECORDS.spec);
    let enc = Encoder::<UsageRecord>::register(&env.registry, &subject)
        .await
        .unwrap();
    let hex: String = enc
        .encode(&record)
        .unwrap()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut conn = billing_db::connect(&common.database_url).await.unwrap();
    conn.batch_execute(&format!(
        "insert into dead_letter (id, source_topic, source_partition, source_offset, stage, reason, key, payload)
         values (900, '{usage}', 0, 99, 'settlement', 'usage for an unknown product', '\\x31'::bytea, '\\x{hex}'::bytea)"
    ))
    .await
    .unwrap();
    p.open("/dead-letters/900").await;
    assert!(p.text("#payload").await.contains("u-replayed"));
    p.shot("dead-letter").await;
    p.open("/dead-letters").await;
    p.shot("dead-letters").await;
    p.click("input[name=ids][value='900']").await;
    p.submit("form[action='/dead-letters/replay'] button").await;
    assert!(p.text(".notice").await.contains("Replayed 1"));
    assert_eq!(env.record_count(&usage).await, before + 1);

    // Filtered by stage and time, the letter is there; before it was recorded, it is not
    p.open("/dead-letters?stage=settlement&all=1&since=2026-01-01T00:00")
        .await;
    assert!(
        p.text("main table")
            .await
            .contains("usage for an unknown product")
    );
    p.open("/dead-letters?stage=settlement&all=1&until=2026-01-01T00:00")
        .await;
    assert!(
        !p.text("main table")
            .await
            .contains("usage for an unknown product")
    );

    // A reservation is added, listed and cancelled
    p.open("/reservations").await;
    p.fill("input[name=fire_at]", "").await;
    b.execute(
        "document.querySelector('input[name=fire_at]').value = '2027-01-05T09:30';",
        vec![],
    )
    .await
    .unwrap();
    p.fill("input[name=month]", "2026-11").await;
    p.fill("input[name=members]", "1, 2").await;
    p.submit("form[action='/reservations'] button").await;
    let notice = p.text(".notice").await;
    assert!(notice.contains("fires at 2027-01-05 09:30:00"), "{notice}");
    p.shot("reservations").await;
    assert_eq!(
        billing_ops::dispatch::reservations(&common, false)
            .await
            .unwrap()
            .len(),
        1
    );
    p.submit("form[action$='/cancel'] button").await;
    assert!(p.text(".notice").await.contains("cancelled"));
    assert!(
        billing_ops::dispatch::reservations(&common, false)
            .await
            .unwrap()
            .is_empty()
    );

    // The member page answers "did member 1 get their bill?"
    p.open("/members").await;
    p.fill("input[name=id]", "1").await;
    p.submit("form[action='/members'] button").await;
    assert!(p.text("main").await.contains("2026-11"));
    p.shot("member").await;
    p.open("/audit").await;
    assert!(p.text("main").await.contains("dispatch"));
    p.shot("audit").await;

    // A viewer sees the pages and is refused a change
    p.submit("nav form button").await;
    p.login("victor").await;
    p.set_quiet_hours("00:00", "23:00").await;
    assert!(
        p.text(".error")
            .await
            .contains("viewers cannot change anything")
    );
    let q = billing_ops::quiet_hours::show(&common).await.unwrap();
    assert_eq!(q.to_string(), "21:00-08:00 Asia/Seoul");

    b.close().await.unwrap();
    drop(d);
    let _ = std::fs::remove_dir_all(profile);
}
