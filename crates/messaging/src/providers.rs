//! Real providers behind the channels, chosen by configuration, and the one place a channel
//! binary builds its gateway ([`mail_gateway`], [`sms_gateway`]):
//!
//! - email: `EMAIL_GATEWAY=simulated` (default) or `smtp` with `EMAIL_SMTP_URL` in lettre's
//!   URL form (`smtp://user:pass@host:587?tls=required`, `smtps://...`, `smtp://host:25`) and
//!   `EMAIL_FROM`;
//! - SMS: `SMS_GATEWAY=simulated` (default) or `http` with `SMS_HTTP_URL` and
//!   `SMS_HTTP_TOKEN`.
//!
//! Every gateway is wrapped in [`Guarded`] (rate limit, circuit breaker; on by default for the
//! real providers). A new provider is one [`MailGateway`] or [`SmsGateway`] implementation and
//! a variant here.

use std::time::Duration;

use billing_db::PgPool;
use lettre::{
    AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor,
    message::{Mailbox, MultiPart},
};

use crate::{
    Mail, MailGateway, SendError, SimulatedGateway, SimulationArgs, Sms, SmsGateway,
    UnknownOutcome,
    guard::{GuardArgs, Guarded},
};

/// Which email provider.
#[derive(Debug, Clone, clap::Args)]
pub struct EmailProviderArgs {
    /// `simulated` (no real sending) or `smtp`.
    #[arg(long = "email-gateway", env = "EMAIL_GATEWAY", default_value = "simulated", value_parser = ["simulated", "smtp"])]
    pub gateway: String,
    /// The SMTP server, lettre's URL form: smtp://user:pass@host:587?tls=required.
    #[arg(long = "email-smtp-url", env = "EMAIL_SMTP_URL")]
    pub smtp_url: Option<String>,
    /// The sender of every bill.
    #[arg(
        long = "email-from",
        env = "EMAIL_FROM",
        default_value = "Billing <billing@localhost>"
    )]
    pub from: String,
    /// SMTP connections open at once (each carries one message at a time); sends beyond them
    /// wait for one.
    #[arg(long = "email-smtp-connections", env = "EMAIL_SMTP_CONNECTIONS", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub smtp_connections: u32,
}

/// Which SMS provider.
#[derive(Debug, Clone, clap::Args)]
pub struct SmsProviderArgs {
    /// `simulated` (no real sending) or `http`.
    #[arg(long = "sms-gateway", env = "SMS_GATEWAY", default_value = "simulated", value_parser = ["simulated", "http"])]
    pub gateway: String,
    /// The provider's JSON endpoint (a POST per message).
    #[arg(long = "sms-http-url", env = "SMS_HTTP_URL")]
    pub http_url: Option<String>,
    /// Its bearer token.
    #[arg(
        long = "sms-http-token",
        env = "SMS_HTTP_TOKEN",
        hide_env_values = true
    )]
    pub http_token: Option<String>,
}

/// The configured email provider.
#[derive(Debug, Clone)]
pub enum MailProvider {
    Simulated(SimulatedGateway),
    Smtp(SmtpGateway),
}

impl MailGateway for MailProvider {
    async fn send(&self, mail: &Mail) -> Result<(), SendError> {
        match self {
            MailProvider::Simulated(g) => MailGateway::send(g, mail).await,
            MailProvider::Smtp(g) => g.send(mail).await,
        }
    }

    fn unknown_outcome(&self) -> UnknownOutcome {
        match self {
            MailProvider::Simulated(g) => MailGateway::unknown_outcome(g),
            MailProvider::Smtp(g) => g.unknown_outcome(),
        }
    }
}

/// The configured SMS provider.
#[derive(Debug, Clone)]
pub enum SmsProvider {
    Simulated(SimulatedGateway),
    Http(HttpSmsGateway),
}

impl SmsGateway for SmsProvider {
    async fn send(&self, sms: &Sms) -> Result<(), SendError> {
        match self {
            SmsProvider::Simulated(g) => SmsGateway::send(g, sms).await,
            SmsProvider::Http(g) => g.send(sms).await,
        }
    }

    fn unknown_outcome(&self) -> UnknownOutcome {
        match self {
            SmsProvider::Simulated(g) => SmsGateway::unknown_outcome(g),
            SmsProvider::Http(g) => g.unknown_outcome(),
        }
    }
}

/// Transient failures in a row that open a real provider's breaker by default.
const REAL_BREAKER: u32 = 5;

/// The email gateway the arguments name, guarded.
pub fn mail_gateway(
    provider: &EmailProviderArgs,
    simulation: &SimulationArgs,
    guard: &GuardArgs,
    pool: PgPool,
) -> Result<Guarded<MailProvider>, String> {
    let (gateway, breaker) = match provider.gateway.as_str() {
        "smtp" => {
            let url = provider
                .smtp_url
                .as_deref()
                .ok_or("EMAIL_GATEWAY=smtp needs EMAIL_SMTP_URL")?;
            (
                MailProvider::Smtp(SmtpGateway::new(
                    url,
                    &provider.from,
                    provider.smtp_connections,
                )?),
                REAL_BREAKER,
            )
        }
        _ => (
            MailProvider::Simulated(SimulatedGateway::new("email", simulation, Some(pool))?),
            0,
        ),
    };
    Ok(Guarded::new(gateway, "email", guard, breaker))
}

/// The SMS gateway the arguments name, guarded.
pub fn sms_gateway(
    provider: &SmsProviderArgs,
    simulation: &SimulationArgs,
    guard: &GuardArgs,
    pool: PgPool,
) -> Result<Guarded<SmsProvider>, String> {
    let (gateway, breaker) = match provider.gateway.as_str() {
        "http" => {
            let url = provider
                .http_url
                .as_deref()
                .ok_or("SMS_GATEWAY=http needs SMS_HTTP_URL")?;
            let token = provider.http_token.clone().unwrap_or_default();
            (
                SmsProvider::Http(HttpSmsGateway::new(url, token)?),
                REAL_BREAKER,
            )
        }
        _ => (
            SmsProvider::Simulated(SimulatedGateway::new("sms", simulation, Some(pool))?),
            0,
        ),
    };
    Ok(Guarded::new(gateway, "sms", guard, breaker))
}

// ---- SMTP ------------------------------------------------------------------------------

/// Email over SMTP with lettre: pooled connections, STARTTLS or TLS as the URL says, auth.
/// Each bill is a multipart/alternative message (a plain-text part and the rendered HTML) with
/// a `Message-ID` derived from the delivery's idempotency key. SMTP has no idempotency keys,
/// so a delivery whose sender died mid-send is held for an operator
/// ([`UnknownOutcome::Hold`]).
#[derive(Clone)]
pub struct SmtpGateway {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    /// One permit per connection: lettre's pool opens a new connection whenever none is idle,
    /// so thousands of sends in flight would open thousands of sockets (seen: the process ran
    /// out of file descriptors at 20,000 in flight).
    connections: std::sync::Arc<tokio::sync::Semaphore>,
    from: Mailbox,
    domain: String,
}

impl std::fmt::Debug for SmtpGateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold a password: never print the transport.
        f.debug_struct("SmtpGateway")
            .field("from", &self.from)
            .finish_non_exhaustive()
    }
}

impl SmtpGateway {
    /// A gateway to the server at `url` (lettre's URL form), sending as `from` over at most
    /// `connections` connections.
    pub fn new(url: &str, from: &str, connections: u32) -> Result<Self, String> {
        let pool = lettre::transport::smtp::PoolConfig::new().max_size(connections);
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
            .map_err(|e| format!("EMAIL_SMTP_URL: {e}"))?
            .timeout(Some(Duration::from_secs(30)))
            .pool_config(pool)
            .build();
        let from: Mailbox = from
            .parse()
            .map_err(|e| format!("EMAIL_FROM {from:?}: {e}"))?;
        let domain = from.email.domain().to_string();
        let permits = usize::try_from(connections).unwrap_or(1);
        Ok(SmtpGateway {
            transport,
            connections: std::sync::Arc::new(tokio::sync::Semaphore::new(permits)),
            from,
            domain,
        })
    }

    fn message(&self, mail: &Mail) -> Result<Message, SendError> {
        let to: Mailbox = mail
            .to
            .parse()
            .map_err(|e| SendError::Permanent(format!("not an email address: {e}")))?;
        Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(header_safe(&mail.subject))
            .message_id(Some(format!("<{}@{}>", mail.idempotency_key, self.domain)))
            .multipart(MultiPart::alternative_plain_html(
                plain_text(&mail.html),
                mail.html.clone(),
            ))
            .map_err(|e| SendError::Permanent(format!("cannot build the message: {e}")))
    }
}

/// A header value without line breaks or other control characters (no header injection from
/// member data).
pub fn header_safe(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_string()
}

/// The text of rendered HTML: tags dropped, block ends as line breaks, cells separated by
/// tabs, entities decoded.
pub fn plain_text(html: &str) -> String {
    let mut out = String::with_capacity(html.len());
    let mut in_tag = false;
    let mut tag = String::new();
    for c in html.chars() {
        match (in_tag, c) {
            (false, '<') => {
                in_tag = true;
                tag.clear();
            }
            (true, '>') => {
                in_tag = false;
                let closing = tag.starts_with('/');
                let name = tag
                    .trim_start_matches('/')
                    .split_whitespace()
                    .next()
                    .unwrap_or("");
                let block = matches!(
                    name,
                    "p" | "tr" | "h1" | "h2" | "h3" | "div" | "li" | "table"
                );
                if name.starts_with("br") || (closing && block) {
                    out.push('\n');
                } else if closing && matches!(name, "td" | "th") {
                    out.push('\t');
                }
            }
            (true, c) => tag.push(c),
            (false, c) => out.push(c),
        }
    }
    let out = out
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&amp;", "&");
    out.lines()
        .map(str::trim_end)
        .filter(|l| !l.trim().is_empty())
        .collect::<Vec<_>>()
        .join("\n")
}

impl MailGateway for SmtpGateway {
    /// 4xx and connection failures are transient, 5xx permanent.
    async fn send(&self, mail: &Mail) -> Result<(), SendError> {
        let message = self.message(mail)?;
        let _connection = self
            .connections
            .acquire()
            .await
            .map_err(|e| SendError::Transient(format!("smtp: {e}")))?;
        match self.transport.send(message).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_permanent() => Err(SendError::Permanent(format!("smtp: {e}"))),
            Err(e) => Err(SendError::Transient(format!("smtp: {e}"))),
        }
    }
}

// ---- HTTP SMS --------------------------------------------------------------------------

/// SMS through a JSON HTTP API: `POST url` with `{"to", "text"}`, `Authorization: Bearer
/// TOKEN` and the delivery's key in `Idempotency-Key`. 2xx is accepted; 429, 5xx and network
/// failures are transient; any other 4xx is permanent. The provider de-duplicates by key, so a
/// delivery whose sender died mid-send is sent again ([`UnknownOutcome::Resend`]).
#[derive(Clone)]
pub struct HttpSmsGateway {
    client: reqwest::Client,
    url: String,
    token: String,
}

impl std::fmt::Debug for HttpSmsGateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpSmsGateway")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl HttpSmsGateway {
    pub fn new(url: &str, token: String) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(64)
            .build()
            .map_err(|e| format!("http client: {e}"))?;
        Ok(HttpSmsGateway {
            client,
            url: url.to_string(),
            token,
        })
    }
}

impl SmsGateway for HttpSmsGateway {
    async fn send(&self, sms: &Sms) -> Result<(), SendError> {
        let body = serde_json::json!({ "to": sms.to, "text": sms.text });
        let response = self
            .client
            .post(&self.url)
            .bearer_auth(&self.token)
            .header("Idempotency-Key", &sms.idempotency_key)
            .json(&body)
            .send()
            .await
            .map_err(|e| SendError::Transient(format!("sms provider unreachable: {e}")))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let detail: String = response
            .text()
            .await
            .unwrap_or_default()
            .chars()
            .take(200)
            .collect();
        let why = format!("sms provider answered {status}: {detail}");
        if status.as_u16() == 429 || status.is_server_error() {
            Err(SendError::Transient(why))
        } else {
            Err(SendError::Permanent(why))
        }
    }

    fn unknown_outcome(&self) -> UnknownOutcome {
        UnknownOutcome::Resend
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_lose_line_breaks() {
        assert_eq!(
            header_safe("Kim\r\nBcc: x@y.z bill"),
            "Kim  Bcc: x@y.z bill"
        );
    }

    #[test]
    fn the_text_part_reads_like_the_html() {
        let html = "<p>Hello &lt;b&gt;Kim&lt;/b&gt;</p><table><tr><td>LTE</td><td>33,000원</td></tr></table>";
        assert_eq!(plain_text(html), "Hello <b>Kim</b>\nLTE\t33,000원");
    }
}
