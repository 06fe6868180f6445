//! Validation at the edge: every record read from a topic is checked here before any rule,
//! table or producer sees it. A record that fails becomes a dead letter with the [`Reject`]
//! as its reason; nothing downstream has to defend itself against it again.
//!
//! The limits follow from the identities (`bill_id = yyyymm * 10^10 + member_id`,
//! `item_id = bill_id * 100 + position`), from PostgreSQL (text cannot hold NUL), and from
//! the broker (a bill must fit in one record). docs/billing-rules.md lists each of them.

use std::collections::HashSet;

use billing_schema::{Bill, BillItemKind, Member, Product, UsageRecord};

use crate::{month::BillingMonth, rules};

/// Largest member id: ten decimal digits, so that bill ids of different members never meet.
pub const MAX_MEMBER_ID: i64 = 9_999_999_999;
/// Items on one bill at most: item ids give each bill a hundred positions.
pub const MAX_ITEMS: usize = 100;
/// Add-ons one member may hold at once.
pub const MAX_ADDONS: usize = 20;
/// Allowances one plan may carry.
pub const MAX_ALLOWANCES: usize = 32;
/// Longest text field, bytes (names, addresses, ids, descriptions).
pub const MAX_TEXT: usize = 512;
/// Longest item snapshot, bytes of JSON.
pub const MAX_SNAPSHOT: usize = 4096;
/// Longest contract, months.
pub const MAX_CONTRACT_MONTHS: i32 = 120;
/// Earliest join date: 1900-01-01, in days since 1970-01-01.
pub const MIN_JOINED_ON: i32 = -25_567;
/// The latest join date, in days since 1970-01-01: 9999-12-31, the last day with a four-digit
/// year (what `date` columns and every downstream system can hold).
pub const MAX_JOINED_ON: i32 = 2_932_896;
/// Largest monthly fee, unit price or discount cap of a product, won.
pub const MAX_PRICE: i64 = 100_000_000;
/// Minutes in a day: do-not-disturb bounds lie in `0..MINUTES_PER_DAY`.
pub const MINUTES_PER_DAY: i32 = 1440;

/// Why a record is refused at the edge.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    #[error("record key {key:?} does not match the value's id {id}")]
    KeyMismatch { key: String, id: String },
    #[error("{field} {value} is out of range {range}")]
    OutOfRange {
        field: &'static str,
        value: i64,
        range: &'static str,
    },
    #[error("{field} contains a NUL character")]
    Nul { field: &'static str },
    #[error("{field} is {len} bytes, longer than {max}")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{field} is empty")]
    Empty { field: &'static str },
    #[error("{field} has {len} entries, more than {max}")]
    TooMany {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("add-on {0:?} is listed more than once")]
    DuplicateAddon(String),
    #[error("do-not-disturb window needs both ends or neither (start {start:?}, end {end:?})")]
    HalfWindow {
        start: Option<i32>,
        end: Option<i32>,
    },
    #[error("bill {what}: expected {expected}, found {found}")]
    Inconsistent {
        what: &'static str,
        expected: i64,
        found: i64,
    },
    #[error("{0}")]
    Invalid(String),
}

fn range(
    field: &'static str,
    value: i64,
    lo: i64,
    hi: i64,
    text: &'static str,
) -> Result<(), Reject> {
    if (lo..=hi).contains(&value) {
        Ok(())
    } else {
        Err(Reject::OutOfRange {
            field,
            value,
            range: text,
        })
    }
}

/// Text PostgreSQL can store and an operator can read: no NUL, bounded length.
pub fn text(field: &'static str, value: &str) -> Result<(), Reject> {
    if value.contains('\0') {
        return Err(Reject::Nul { field });
    }
    if value.len() > MAX_TEXT {
        return Err(Reject::TooLong {
            field,
            len: value.len(),
            max: MAX_TEXT,
        });
    }
    Ok(())
}

fn id_text(field: &'static str, value: &str) -> Result<(), Reject> {
    if value.is_empty() {
        return Err(Reject::Empty { field });
    }
    text(field, value)
}

/// The member id a record key names (keys are decimal member ids).
pub fn key_member_id(key: Option<&[u8]>) -> Option<i64> {
    std::str::from_utf8(key?).ok()?.parse().ok()
}

fn key_is(key: Option<&[u8]>, id: &str) -> Result<(), Reject> {
    if key == Some(id.as_bytes()) {
        Ok(())
    } else {
        Err(Reject::KeyMismatch {
            key: key.map_or_else(
                || "(none)".to_string(),
                |k| String::from_utf8_lossy(k).into_owned(),
            ),
            id: id.to_string(),
        })
    }
}

/// A member id that keeps bill ids unique.
pub fn member_id(id: i64) -> Result<(), Reject> {
    range("member_id", id, 1, MAX_MEMBER_ID, "1..=9999999999")
}

/// Checks a member record and its key.
pub fn member(m: &Member, key: Option<&[u8]>) -> Result<(), Reject> {
    member_id(m.member_id)?;
    key_is(key, &m.member_id.to_string())?;
    text("name", &m.name)?;
    text("email", &m.email)?;
    text("phone", &m.phone)?;
    id_text("plan_id", &m.plan_id)?;
    if let Some(d) = &m.device_id {
        id_text("device_id", d)?;
    }
    if m.addon_ids.len() > MAX_ADDONS {
        return Err(Reject::TooMany {
            field: "addon_ids",
            len: m.addon_ids.len(),
            max: MAX_ADDONS,
        });
    }
    let mut seen = HashSet::new();
    for a in &m.addon_ids {
        id_text("addon_ids", a)?;
        if !seen.insert(a.as_str()) {
            return Err(Reject::DuplicateAddon(a.clone()));
        }
    }
    range("delivery_day", i64::from(m.delivery_day), 1, 31, "1..=31")?;
    match (m.dnd_start_minute, m.dnd_end_minute) {
        (None, None) => {}
        (Some(s), Some(e)) => {
            range("dnd_start_minute", i64::from(s), 0, 1439, "0..=1439")?;
            range("dnd_end_minute", i64::from(e), 0, 1439, "0..=1439")?;
        }
        (start, end) => return Err(Reject::HalfWindow { start, end }),
    }
    range(
        "contract_months",
        i64::from(m.contract_months),
        0,
        i64::from(MAX_CONTRACT_MONTHS),
        "0..=120",
    )?;
    // A later date inside the range is accepted here: a member who joined after the month
    // is not billed for it (settlement skips and counts them), but is a valid member.
    range(
        "joined_on",
        i64::from(m.joined_on),
        i64::from(MIN_JOINED_ON),
        i64::from(MAX_JOINED_ON),
        "-25567..=2932896 (1900-01-01 to 9999-12-31)",
    )
}

/// Checks a catalogue entry and its key (the product id).
pub fn product(p: &Product, key: Option<&[u8]>) -> Result<(), Reject> {
    id_text("product_id", &p.product_id)?;
    key_is(key, &p.product_id)?;
    text("name", &p.name)?;
    if let Some(u) = &p.usage_unit {
        id_text("usage_unit", u)?;
    }
    range("monthly_fee", p.monthly_fee, 0, MAX_PRICE, "0..=100000000")?;
    range("unit_price", p.unit_price, 0, MAX_PRICE, "0..=100000000")?;
    range("per_units", p.per_units, 1, 1_000_000, "1..=1000000")?;
    range(
        "discount_rate_bp",
        i64::from(p.discount_rate_bp),
        0,
        10_000,
        "0..=10000",
    )?;
    range(
        "discount_cap",
        p.discount_cap,
        0,
        MAX_PRICE,
        "0..=100000000",
    )?;
    range(
        "instalment_months",
        i64::from(p.instalment_months),
        0,
        120,
        "0..=120",
    )?;
    if p.allowances.len() > MAX_ALLOWANCES {
        return Err(Reject::TooMany {
            field: "allowances",
            len: p.allowances.len(),
            max: MAX_ALLOWANCES,
        });
    }
    for a in &p.allowances {
        id_text("allowances.usage_product_id", &a.usage_product_id)?;
        range(
            "allowances.quantity",
            a.quantity,
            -1,
            i64::MAX,
            "-1 (unlimited) or >= 0",
        )?;
    }
    Ok(())
}

/// Checks a usage record's identity and key; the quantity is checked against the catalogue by
/// [`rules::validate_usage`].
pub fn usage(u: &UsageRecord, key: Option<&[u8]>) -> Result<(), Reject> {
    id_text("usage_id", &u.usage_id)?;
    member_id(u.member_id)?;
    key_is(key, &u.member_id.to_string())?;
    id_text("product_id", &u.product_id)?;
    text("billing_month", &u.billing_month)
}

/// Checks a bill read from the `bills` topic: its identity, its items and its arithmetic, so
/// that the sink stores only what settlement could have produced.
pub fn bill(b: &Bill, key: Option<&[u8]>) -> Result<(), Reject> {
    member_id(b.member_id)?;
    key_is(key, &b.member_id.to_string())?;
    let month: BillingMonth = b
        .billing_month
        .parse()
        .map_err(|e: crate::MonthError| Reject::Invalid(e.to_string()))?;
    let id = rules::bill_id(month, b.member_id);
    if b.bill_id != id {
        return Err(Reject::Inconsistent {
            what: "id",
            expected: id,
            found: b.bill_id,
        });
    }
    if b.items.len() > MAX_ITEMS {
        return Err(Reject::TooMany {
            field: "items",
            len: b.items.len(),
            max: MAX_ITEMS,
        });
    }
    let (mut charges, mut discounts) = (0i64, 0i64);
    let overflow = || Reject::Invalid("bill amounts overflow".to_string());
    for (seq, item) in b.items.iter().enumerate() {
        let expected = rules::item_id(id, seq);
        if item.item_id != expected {
            return Err(Reject::Inconsistent {
                what: "item id",
                expected,
                found: item.item_id,
            });
        }
        range("item amount", item.amount, 0, i64::MAX, ">= 0")?;
        id_text("item product_id", &item.product_id)?;
        text("item description", &item.description)?;
        if item.snapshot.contains('\0') || item.snapshot.len() > MAX_SNAPSHOT {
            return Err(Reject::Invalid(format!(
                "item {seq} snapshot has NUL or exceeds {MAX_SNAPSHOT} bytes"
            )));
        }
        if !serde_json::from_str::<serde_json::Value>(&item.snapshot).is_ok_and(|v| v.is_object()) {
            return Err(Reject::Invalid(format!(
                "item {seq} snapshot is not a JSON object"
            )));
        }
        let sum = match item.kind {
            BillItemKind::Charge => &mut charges,
            BillItemKind::Discount => &mut discounts,
        };
        *sum = sum.checked_add(item.amount).ok_or_else(overflow)?;
    }
    for (what, expected, found) in [
        ("total_amount", charges, b.total_amount),
        ("discount_amount", discounts, b.discount_amount),
    ] {
        if expected != found {
            return Err(Reject::Inconsistent {
                what,
                expected,
                found,
            });
        }
    }
    range("vat_amount", b.vat_amount, 0, i64::MAX, ">= 0")?;
    let final_amount = charges
        .checked_sub(discounts)
        .and_then(|v| v.checked_add(b.vat_amount))
        .ok_or_else(overflow)?;
    if final_amount != b.final_amount || final_amount < 0 {
        return Err(Reject::Inconsistent {
            what: "final_amount",
            expected: final_amount,
            found: b.final_amount,
        });
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::{generator::Generator, products};

    fn some_member() -> Member {
        let month: BillingMonth = "2026-11".parse().unwrap();
        Generator::new(1, month, chrono_tz::Asia::Seoul).member(42)
    }

    fn key(m: &Member) -> Vec<u8> {
        m.member_id.to_string().into_bytes()
    }

    #[test]
    fn generated_members_and_products_pass() {
        let m = some_member();
        assert_eq!(member(&m, Some(&key(&m))), Ok(()));
        for p in products::catalogue(0) {
            assert_eq!(
                product(&p, Some(p.product_id.as_bytes())),
                Ok(()),
                "{}",
                p.product_id
            );
        }
    }

    #[test]
    fn hostile_members_are_refused_with_a_reason() {
        type Case = (fn(&mut Member), &'static str);
        let cases: Vec<Case> = vec![
            (|m| m.name = "a\0b".into(), "name contains a NUL"),
            (
                |m| m.addon_ids = vec!["addon-music".into(); 5000],
                "addon_ids has 5000",
            ),
            (
                |m| m.addon_ids = vec!["addon-music".into(); 2],
                "listed more than once",
            ),
            (
                |m| {
                    m.dnd_start_minute = Some(-1);
                    m.dnd_end_minute = Some(600);
                },
                "dnd_start_minute -1",
            ),
            (
                |m| {
                    m.dnd_start_minute = Some(60);
                    m.dnd_end_minute = None;
                },
                "both ends",
            ),
            (|m| m.delivery_day = 0, "delivery_day 0"),
            (|m| m.joined_on = i32::MIN, "joined_on"),
            (|m| m.joined_on = i32::MAX, "joined_on 2147483647"),
            (|m| m.contract_months = -3, "contract_months -3"),
            (|m| m.plan_id = String::new(), "plan_id is empty"),
        ];
        for (mutate, expected) in cases {
            let mut m = some_member();
            mutate(&mut m);
            let err = member(&m, Some(&key(&m))).unwrap_err().to_string();
            assert!(
                err.contains(expected),
                "{err:?} should mention {expected:?}"
            );
        }
    }

    #[test]
    fn member_ids_must_fit_the_bill_id_and_match_the_key() {
        let mut m = some_member();
        for id in [0, -5, 10_000_000_000] {
            m.member_id = id;
            assert!(matches!(
                member(&m, Some(&key(&m))),
                Err(Reject::OutOfRange {
                    field: "member_id",
                    ..
                })
            ));
        }
        m.member_id = 7;
        assert!(matches!(
            member(&m, Some(b"8")),
            Err(Reject::KeyMismatch { .. })
        ));
        assert!(matches!(member(&m, None), Err(Reject::KeyMismatch { .. })));
        assert_eq!(member(&m, Some(b"7")), Ok(()));
    }

    #[test]
    fn negative_prices_are_refused() {
        let mut p = products::catalogue(0).into_iter().next().unwrap();
        p.monthly_fee = -1;
        let key = p.product_id.clone();
        assert!(matches!(
            product(&p, Some(key.as_bytes())),
            Err(Reject::OutOfRange {
                field: "monthly_fee",
                ..
            })
        ));
    }

    #[test]
    fn a_bill_must_add_up_and_carry_its_own_ids() {
        let month: BillingMonth = "2026-11".parse().unwrap();
        let catalogue = products::catalogue(0)
            .into_iter()
            .map(|p| (p.product_id.clone(), p))
            .collect();
        let m = some_member();
        let b = rules::compute_bill(month, &m, &catalogue, &Default::default(), 0).unwrap();
        assert_eq!(bill(&b, Some(&key(&m))), Ok(()));
        let mut forged = b.clone();
        forged.final_amount += 10;
        assert!(matches!(
            bill(&forged, Some(&key(&m))),
            Err(Reject::Inconsistent {
                what: "final_amount",
                ..
            })
        ));
        let mut forged = b.clone();
        forged.bill_id += 1;
        assert!(matches!(
            bill(&forged, Some(&key(&m))),
            Err(Reject::Inconsistent { what: "id", .. })
        ));
        let mut forged = b.clone();
        forged.items[0].item_id = rules::item_id(b.bill_id + 1, 0);
        assert!(matches!(
            bill(&forged, Some(&key(&m))),
            Err(Reject::Inconsistent {
                what: "item id",
                ..
            })
        ));
        let mut forged = b;
        forged.items[0].description = "x\0".into();
        assert!(matches!(
            bill(&forged, Some(&key(&m))),
            Err(Reject::Nul { .. })
        ));
    }
}
