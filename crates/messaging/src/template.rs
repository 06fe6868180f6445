//! Templates: operator-managed text with `{{placeholder}}`s, versioned in PostgreSQL. A
//! version is checked when it is activated (every placeholder known, every required one
//! present), so a send never meets a broken template. Templates are plain text: the bill's
//! HTML layout is [`render_email`]'s, built with maud, which escapes every value, member data
//! and template text alike.

use maud::{DOCTYPE, Markup, html};

/// What a template renders: the bill and its member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BillView {
    pub bill_id: i64,
    pub member_name: String,
    pub billing_month: String,
    pub total_amount: i64,
    pub discount_amount: i64,
    pub vat_amount: i64,
    pub final_amount: i64,
    /// (kind, description, amount) per item, for the email's table.
    pub items: Vec<(String, String, i64)>,
}

/// A channel's placeholders: every one a template may use, and those it must use.
#[derive(Debug, Clone, Copy)]
pub struct Placeholders {
    pub known: &'static [&'static str],
    pub required: &'static [&'static str],
}

/// Placeholders of email templates (subject and body).
pub const EMAIL: Placeholders = Placeholders {
    known: &[
        "member_name",
        "billing_month",
        "final_amount",
        "total_amount",
        "discount_amount",
        "vat_amount",
        "bill_id",
    ],
    required: &["member_name", "billing_month", "final_amount"],
};

/// Placeholders of SMS templates.
pub const SMS: Placeholders = Placeholders {
    known: &["member_name", "billing_month", "final_amount", "bill_id"],
    required: &["billing_month", "final_amount"],
};

/// The placeholders of a channel (`email`, `sms`).
pub fn placeholders_of(channel: &str) -> Option<Placeholders> {
    match channel {
        "email" => Some(EMAIL),
        "sms" => Some(SMS),
        _ => None,
    }
}

/// A template cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("unclosed placeholder at byte {0}")]
    Unclosed(usize),
    #[error("unknown placeholder {{{{{0}}}}}")]
    Unknown(String),
    #[error("missing required placeholder {{{{{0}}}}}")]
    Missing(String),
    #[error("unknown channel {0:?}")]
    Channel(String),
    #[error("an email template needs a subject")]
    NoSubject,
}

/// The placeholder names in `text`, in order.
pub fn placeholders(text: &str) -> Result<Vec<String>, TemplateError> {
    let mut out = Vec::new();
    let mut rest = text;
    let mut base = 0;
    while let Some(open) = rest.find("{{") {
        let after = &rest[open + 2..];
        let close = after
            .find("}}")
            .ok_or(TemplateError::Unclosed(base + open))?;
        out.push(after[..close].trim().to_string());
        let consumed = open + 2 + close + 2;
        base += consumed;
        rest = &rest[consumed..];
    }
    Ok(out)
}

/// Checks a template version for `channel` before it may be activated.
pub fn validate(channel: &str, subject: Option<&str>, body: &str) -> Result<(), TemplateError> {
    let p = placeholders_of(channel).ok_or_else(|| TemplateError::Channel(channel.into()))?;
    if channel == "email" && subject.is_none_or(|s| s.trim().is_empty()) {
        return Err(TemplateError::NoSubject);
    }
    let mut used = placeholders(body)?;
    if let Some(s) = subject {
        used.extend(placeholders(s)?);
    }
    if let Some(u) = used.iter().find(|u| !p.known.contains(&u.as_str())) {
        return Err(TemplateError::Unknown(u.clone()));
    }
    if let Some(r) = p.required.iter().find(|r| !used.iter().any(|u| u == *r)) {
        return Err(TemplateError::Missing((*r).to_string()));
    }
    Ok(())
}

/// Won with thousands separators: `1,234,560원`.
pub fn won(amount: i64) -> String {
    let digits = amount.unsigned_abs().to_string();
    let mut out = String::with_capacity(digits.len() + 4);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    format!("{}{out}원", if amount < 0 { "-" } else { "" })
}

/// `text` with its placeholders replaced by the bill's values (plain text, not escaped: the
/// caller escapes for its medium). Unknown names are left as they are (validation refuses
/// them before a template is active).
pub fn fill(text: &str, bill: &BillView) -> String {
    let mut out = String::with_capacity(text.len() + 32);
    let mut rest = text;
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        let after = &rest[open + 2..];
        let Some(close) = after.find("}}") else {
            out.push_str(&rest[open..]);
            return out;
        };
        let name = after[..close].trim();
        match name {
            "member_name" => out.push_str(&bill.member_name),
            "billing_month" => out.push_str(&bill.billing_month),
            "final_amount" => out.push_str(&won(bill.final_amount)),
            "total_amount" => out.push_str(&won(bill.total_amount)),
            "discount_amount" => out.push_str(&won(bill.discount_amount)),
            "vat_amount" => out.push_str(&won(bill.vat_amount)),
            "bill_id" => out.push_str(&bill.bill_id.to_string()),
            _ => out.push_str(&rest[open..open + 2 + close + 2]),
        }
        rest = &after[close + 2..];
    }
    out.push_str(rest);
    out
}

/// The email: its subject (plain text) and HTML body. Paragraphs of the template are separated
/// by blank lines; the items table and totals are the renderer's layout.
pub fn render_email(subject: &str, body: &str, bill: &BillView) -> (String, String) {
    let subject = fill(subject, bill);
    let text = fill(body, bill);
    let markup: Markup = html! {
        (DOCTYPE)
        html lang="ko" {
            head {
                meta charset="utf-8";
                title { (subject) }
            }
            body style="font-family: sans-serif; max-width: 40em" {
                @for para in text.split("\n\n").filter(|p| !p.trim().is_empty()) {
                    p { (para.trim()) }
                }
                table style="width: 100%; border-collapse: collapse" {
                    thead { tr { th align="left" { "항목" } th align="right" { "금액" } } }
                    tbody {
                        @for (kind, description, amount) in &bill.items {
                            tr {
                                td { (description) }
                                td align="right" {
                                    @if kind == "discount" { "-" (won(*amount)) } @else { (won(*amount)) }
                                }
                            }
                        }
                    }
                    tfoot {
                        tr { td { "합계" } td align="right" { (won(bill.total_amount)) } }
                        tr { td { "할인" } td align="right" { "-" (won(bill.discount_amount)) } }
                        tr { td { "부가가치세" } td align="right" { (won(bill.vat_amount)) } }
                        tr { th align="left" { "청구 금액" } th align="right" { (won(bill.final_amount)) } }
                    }
                }
                p style="color: #666; font-size: small" { "청구서 번호 " (bill.bill_id) }
            }
        }
    };
    (subject, markup.into_string())
}

/// The SMS text.
pub fn render_sms(body: &str, bill: &BillView) -> String {
    fill(body, bill)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn bill(name: &str) -> BillView {
        BillView {
            bill_id: 2_026_110_000_000_001,
            member_name: name.into(),
            billing_month: "2026-11".into(),
            total_amount: 55_000,
            discount_amount: 5_000,
            vat_amount: 5_000,
            final_amount: 55_000,
            items: vec![
                ("charge".into(), "5G 요금제".into(), 55_000),
                ("discount".into(), "결합 할인 <b>".into(), 5_000),
            ],
        }
    }

    #[test]
    fn placeholders_are_checked_at_activation() {
        let ok = "{{member_name}}님 {{billing_month}} {{ final_amount }}";
        assert!(validate("email", Some("{{billing_month}} 청구서"), ok).is_ok());
        assert_eq!(
            validate("email", Some("s"), "{{member_name}} {{billing_month}}"),
            Err(TemplateError::Missing("final_amount".into()))
        );
        assert_eq!(
            validate("email", Some("s"), &format!("{ok} {{{{balance}}}}")),
            Err(TemplateError::Unknown("balance".into()))
        );
        assert_eq!(
            validate("email", Some("s"), "{{member_name"),
            Err(TemplateError::Unclosed(0))
        );
        assert_eq!(validate("email", None, ok), Err(TemplateError::NoSubject));
        assert!(validate("sms", None, "{{billing_month}} {{final_amount}}").is_ok());
        assert!(validate("fax", None, ok).is_err());
    }

    #[test]
    fn member_data_is_escaped_and_amounts_are_won() {
        let (subject, html) = render_email(
            "{{billing_month}} 청구서",
            "{{member_name}}님\n\n청구 금액 {{final_amount}}",
            &bill("<script>alert(1)</script>"),
        );
        assert_eq!(subject, "2026-11 청구서");
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;님"));
        assert!(html.contains("결합 할인 &lt;b&gt;"));
        assert!(html.contains("-5,000원"));
        assert!(html.contains("청구 금액 55,000원"));
        assert_eq!(won(1_234_560), "1,234,560원");
        assert_eq!(won(0), "0원");
        assert_eq!(won(-999), "-999원");
        assert_eq!(
            render_sms("{{billing_month}} {{final_amount}}", &bill("x")),
            "2026-11 55,000원"
        );
    }
}
