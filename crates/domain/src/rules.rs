//! The billing rules: a member, the catalogue and the month's usage in, one bill out.
//! Pure and integer-only: every amount is `i64` won, products of prices and quantities are
//! taken in `i128`, and every division truncates. See docs/billing-rules.md for the rules in
//! prose with worked examples.

use std::collections::{BTreeMap, HashMap};

use billing_schema::{Bill, BillItem, BillItemKind, Member, Product, ProductKind, UsageRecord};
use serde_json::json;

use crate::{month::BillingMonth, products};

/// VAT rate, percent.
pub const VAT_PERCENT: i64 = 10;
/// The final amount is truncated to a multiple of this (won); the remainder is a discount line.
pub const ROUNDING_UNIT: i64 = 10;
/// Years of membership before the long-tenure discount applies.
pub const TENURE_YEARS: i32 = 5;
/// Free roaming data with the roaming pass add-on, MB.
pub const ROAMING_PASS_MB: i64 = 3 * 1024;
/// Product id of the rounding line.
pub const ROUNDING_PRODUCT: &str = "rounding";

/// Largest plausible quantity of one usage record, per unit: anything above is a data error.
pub fn max_quantity(usage_unit: &str) -> i64 {
    match usage_unit {
        "MB" => 10 * 1024 * 1024, // 10 TB in one record
        "SEC" => 31 * 24 * 3600,  // a month of talk
        "MSG" => 100_000,
        "WON" => 1_000_000, // the legal micro-payment limit a month
        _ => 1_000_000_000,
    }
}

/// Why a usage record cannot be billed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UsageError {
    #[error("unknown product {0:?}")]
    UnknownProduct(String),
    #[error("product {0:?} is not metered")]
    NotMetered(String),
    #[error("quantity {quantity} of {product} is not positive")]
    NotPositive { product: String, quantity: i64 },
    #[error("quantity {quantity} of {product} exceeds the plausible maximum {max}")]
    Absurd {
        product: String,
        quantity: i64,
        max: i64,
    },
}

/// Checks one usage record against the catalogue before it is aggregated.
pub fn validate_usage(
    products: &HashMap<String, Product>,
    product_id: &str,
    quantity: i64,
) -> Result<(), UsageError> {
    let p = products
        .get(product_id)
        .ok_or_else(|| UsageError::UnknownProduct(product_id.to_string()))?;
    let Some(unit) = p.usage_unit.as_deref() else {
        return Err(UsageError::NotMetered(product_id.to_string()));
    };
    if quantity <= 0 {
        return Err(UsageError::NotPositive {
            product: product_id.to_string(),
            quantity,
        });
    }
    let max = max_quantity(unit);
    if quantity > max {
        return Err(UsageError::Absurd {
            product: product_id.to_string(),
            quantity,
            max,
        });
    }
    Ok(())
}

fn hash_of(value: impl std::hash::Hash) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    BuildHasherDefault::<DefaultHasher>::default().hash_one(value)
}

/// A usage record's identity for de-duplication, `(member id, hash of usage id)`, and the
/// hash of what it says (product, quantity, month, time). A month counts each identity once:
/// a repeat with the same content is skipped, one with other content is refused. Settlement
/// and reconcile both call this, so they count the same records. The 64-bit hash is scoped
/// to one member (a few records a month), so two different ids meet with odds below 10^-12
/// over a million members.
pub fn usage_identity(u: &UsageRecord) -> ((i64, u64), u64) {
    (
        (u.member_id, hash_of(&u.usage_id)),
        hash_of((&u.product_id, u.quantity, &u.billing_month, u.occurred_at)),
    )
}

/// Why a member cannot be billed at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BillError {
    #[error("member {member} refers to unknown product {product:?}")]
    UnknownProduct { member: i64, product: String },
    #[error("member {member}: amount overflow")]
    Overflow { member: i64 },
    #[error("member {member}: {product:?} is a {found:?}, not a {expected:?}")]
    WrongKind {
        member: i64,
        product: String,
        expected: ProductKind,
        found: ProductKind,
    },
    #[error("member {member}: {items} bill items, more than the {max} an item id can number")]
    TooManyItems {
        member: i64,
        items: usize,
        max: usize,
    },
}

/// The bill's identity: `yyyymm * 10^10 + member id`, the same on every run.
pub fn bill_id(month: BillingMonth, member_id: i64) -> i64 {
    month.number() * 10_000_000_000 + member_id
}

/// The id of a bill's `seq`-th item.
pub fn item_id(bill_id: i64, seq: usize) -> i64 {
    bill_id * 100 + i64::try_from(seq).unwrap_or(99)
}

/// `quantity * price / per` with truncation, in i128.
fn prorate(quantity: i64, price: i64, per: i64) -> Option<i64> {
    let v = i128::from(quantity).checked_mul(i128::from(price))? / i128::from(per.max(1));
    i64::try_from(v).ok()
}

/// `amount * bp / 10000`, truncated; `None` if it does not fit.
fn rate(amount: i64, bp: i32) -> Option<i64> {
    i64::try_from(i128::from(amount) * i128::from(bp) / 10_000).ok()
}

struct Line {
    kind: BillItemKind,
    product_id: String,
    description: String,
    quantity: i64,
    amount: i64,
    snapshot: serde_json::Value,
    taxable: bool,
}

fn product<'a>(
    products: &'a HashMap<String, Product>,
    member: i64,
    id: &str,
) -> Result<&'a Product, BillError> {
    products.get(id).ok_or_else(|| BillError::UnknownProduct {
        member,
        product: id.to_string(),
    })
}

/// A product the member holds, which must be of the kind its slot says (a plan as the plan,
/// an add-on as an add-on, a device as the device).
fn held<'a>(
    products: &'a HashMap<String, Product>,
    member: i64,
    id: &str,
    expected: ProductKind,
) -> Result<&'a Product, BillError> {
    let p = product(products, member, id)?;
    if p.kind == expected {
        Ok(p)
    } else {
        Err(BillError::WrongKind {
            member,
            product: id.to_string(),
            expected,
            found: p.kind,
        })
    }
}

/// The join date, if it is a date at all (days since 1970-01-01).
pub fn joined_on(member: &Member) -> Option<chrono::NaiveDate> {
    chrono::NaiveDate::default()
        .checked_add_signed(chrono::TimeDelta::try_days(i64::from(member.joined_on))?)
}

/// Whether the member had joined by the month's last day; a later joiner is not billed for it.
pub fn member_in_month(member: &Member, month: BillingMonth) -> bool {
    joined_on(member).is_some_and(|d| d < month.next().first_day())
}

fn flat_line(p: &Product, rule: &str) -> Line {
    Line {
        kind: BillItemKind::Charge,
        product_id: p.product_id.clone(),
        description: p.name.clone(),
        quantity: 1,
        amount: p.monthly_fee,
        snapshot: json!({
            "product_id": p.product_id, "name": p.name, "kind": p.kind,
            "monthly_fee": p.monthly_fee, "instalment_months": p.instalment_months, "rule": rule,
        }),
        taxable: true,
    }
}

/// Computes one member's bill for `month` from the catalogue and the month's usage totals
/// (product id -> summed quantity, already validated). `settled_at` stamps the bill.
pub fn compute_bill(
    month: BillingMonth,
    member: &Member,
    products: &HashMap<String, Product>,
    usage: &BTreeMap<String, i64>,
    settled_at: i64,
) -> Result<Bill, BillError> {
    let id = member.member_id;
    let overflow = || BillError::Overflow { member: id };
    let plan = held(products, id, &member.plan_id, ProductKind::Plan)?;
    let mut lines = vec![flat_line(plan, "plan monthly fee")];
    for addon in &member.addon_ids {
        lines.push(flat_line(
            held(products, id, addon, ProductKind::Addon)?,
            "add-on monthly fee",
        ));
    }
    if let Some(device) = &member.device_id {
        lines.push(flat_line(
            held(products, id, device, ProductKind::Device)?,
            "device instalment",
        ));
    }

    // Metered usage, in product id order so items are stable across runs.
    for (product_id, &quantity) in usage {
        let p = product(products, id, product_id)?;
        let mut free = plan
            .allowances
            .iter()
            .find(|a| &a.usage_product_id == product_id)
            .map_or(0, |a| a.quantity);
        if product_id == products::ROAMING_DATA
            && member.addon_ids.iter().any(|a| a == "addon-roaming-pass")
        {
            free = ROAMING_PASS_MB;
        }
        let billable = if free == products::UNLIMITED {
            0
        } else {
            quantity.checked_sub(free).ok_or_else(overflow)?.max(0)
        };
        let amount = prorate(billable, p.unit_price, p.per_units).ok_or_else(overflow)?;
        lines.push(Line {
            kind: BillItemKind::Charge,
            product_id: p.product_id.clone(),
            description: p.name.clone(),
            quantity,
            amount,
            snapshot: json!({
                "product_id": p.product_id, "name": p.name, "kind": p.kind,
                "usage_unit": p.usage_unit, "unit_price": p.unit_price, "per_units": p.per_units,
                "quantity": quantity, "free_allowance": free, "billable_quantity": billable,
                "rule": "billable = max(0, quantity - allowance); amount = floor(billable * unit_price / per_units)",
            }),
            taxable: p.kind != ProductKind::MicroPayment,
        });
    }

    // Discounts on the plan fee, in priority order, each truncated and capped, never more
    // than what is left of the fee.
    let mut discounts: Vec<&Product> = Vec::new();
    // Whole years of membership at the first day of the month.
    let years = joined_on(member)
        .and_then(|joined| month.first_day().years_since(joined))
        .unwrap_or(0);
    if member.contract_months > 0 {
        discounts.push(product(products, id, products::DISCOUNT_CONTRACT)?);
    }
    if member.family_bundle {
        discounts.push(product(products, id, products::DISCOUNT_FAMILY)?);
    }
    if years >= u32::try_from(TENURE_YEARS).unwrap_or(5) {
        discounts.push(product(products, id, products::DISCOUNT_TENURE)?);
    }
    discounts.sort_by_key(|d| (d.priority, d.product_id.clone()));
    let mut remaining_fee = plan.monthly_fee;
    for d in discounts {
        // The family discount applies to the fee after the contract discount; the others to
        // the full fee.
        let base = if d.product_id == products::DISCOUNT_FAMILY {
            remaining_fee
        } else {
            plan.monthly_fee
        };
        let mut amount = rate(base, d.discount_rate_bp).ok_or_else(overflow)?;
        if d.discount_cap > 0 {
            amount = amount.min(d.discount_cap);
        }
        amount = amount.min(remaining_fee).max(0);
        remaining_fee -= amount;
        lines.push(Line {
            kind: BillItemKind::Discount,
            product_id: d.product_id.clone(),
            description: d.name.clone(),
            quantity: 1,
            amount,
            snapshot: json!({
                "product_id": d.product_id, "name": d.name, "rate_bp": d.discount_rate_bp,
                "cap": d.discount_cap, "base": base, "priority": d.priority,
                "rule": "amount = min(floor(base * rate_bp / 10000), cap, remaining plan fee)",
            }),
            taxable: true,
        });
    }

    let sum = |kind: BillItemKind, taxable_only: bool| -> Option<i64> {
        lines
            .iter()
            .filter(|l| l.kind == kind && (!taxable_only || l.taxable))
            .try_fold(0i64, |acc, l| acc.checked_add(l.amount))
    };
    let total = sum(BillItemKind::Charge, false).ok_or_else(overflow)?;
    let taxable_charges = sum(BillItemKind::Charge, true).ok_or_else(overflow)?;
    let mut discount = sum(BillItemKind::Discount, false).ok_or_else(overflow)?;
    let taxable = taxable_charges
        .checked_sub(discount)
        .ok_or_else(overflow)?
        .max(0);
    let vat = taxable / VAT_PERCENT;
    let before_rounding = total
        .checked_sub(discount)
        .and_then(|v| v.checked_add(vat))
        .ok_or_else(overflow)?;
    let rounding = before_rounding.rem_euclid(ROUNDING_UNIT);
    if rounding > 0 {
        lines.push(Line {
            kind: BillItemKind::Discount,
            product_id: ROUNDING_PRODUCT.to_string(),
            description: "10원 미만 절사".to_string(),
            quantity: 1,
            amount: rounding,
            snapshot: json!({ "rule": "final amount truncated to 10 won", "before": before_rounding }),
            taxable: false,
        });
        discount = discount.checked_add(rounding).ok_or_else(overflow)?;
    }
    if lines.len() > crate::validate::MAX_ITEMS {
        return Err(BillError::TooManyItems {
            member: id,
            items: lines.len(),
            max: crate::validate::MAX_ITEMS,
        });
    }
    let bill = bill_id(month, id);
    Ok(Bill {
        bill_id: bill,
        member_id: id,
        billing_month: month.to_string(),
        total_amount: total,
        discount_amount: discount,
        vat_amount: vat,
        final_amount: before_rounding - rounding,
        items: lines
            .into_iter()
            .enumerate()
            .map(|(seq, l)| BillItem {
                item_id: item_id(bill, seq),
                kind: l.kind,
                product_id: l.product_id,
                description: l.description,
                quantity: l.quantity,
                amount: l.amount,
                snapshot: l.snapshot.to_string(),
            })
            .collect(),
        settled_at,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn catalogue() -> HashMap<String, Product> {
        products::catalogue(0)
            .into_iter()
            .map(|p| (p.product_id.clone(), p))
            .collect()
    }

    fn member(plan: &str) -> Member {
        Member {
            member_id: 7,
            name: "n".into(),
            email: "e".into(),
            phone: "p".into(),
            delivery_day: 1,
            dnd_start_minute: None,
            dnd_end_minute: None,
            plan_id: plan.into(),
            addon_ids: vec![],
            device_id: None,
            contract_months: 0,
            // 2024-01-01: under five years before 2026-11.
            joined_on: 19_723,
            family_bundle: false,
            updated_at: 0,
        }
    }

    fn month() -> BillingMonth {
        "2026-11".parse().unwrap()
    }

    fn check_invariants(b: &Bill) {
        let charges: i64 = b
            .items
            .iter()
            .filter(|i| i.kind == BillItemKind::Charge)
            .map(|i| i.amount)
            .sum();
        let discounts: i64 = b
            .items
            .iter()
            .filter(|i| i.kind == BillItemKind::Discount)
            .map(|i| i.amount)
            .sum();
        assert_eq!(charges, b.total_amount);
        assert_eq!(discounts, b.discount_amount);
        assert_eq!(
            b.final_amount,
            b.total_amount - b.discount_amount + b.vat_amount
        );
        assert_eq!(b.final_amount % ROUNDING_UNIT, 0);
        assert!(b.items.iter().all(|i| i.amount >= 0));
    }

    #[test]
    fn plan_only_bill_adds_vat() {
        // 55,000 plan, no usage, no discounts: VAT 5,500, final 60,500.
        let b = compute_bill(
            month(),
            &member("plan-5g-slim"),
            &catalogue(),
            &BTreeMap::new(),
            1,
        )
        .unwrap();
        assert_eq!(
            (
                b.total_amount,
                b.discount_amount,
                b.vat_amount,
                b.final_amount
            ),
            (55_000, 0, 5_500, 60_500)
        );
        assert_eq!(b.bill_id, 2_026_110_000_000_007);
        check_invariants(&b);
    }

    #[test]
    fn worked_example_from_the_rules_document() {
        // LTE basic (33,000; 2 GB, 300 min, 100 msgs) with a 24-month contract and the family
        // bundle, music add-on, Galaxy A36 instalment; used 2,548 MB, 19,000 s, 100 msgs,
        // 12,300 won of micro-payments.
        let mut m = member("plan-lte-basic");
        m.contract_months = 24;
        m.family_bundle = true;
        m.addon_ids = vec!["addon-music".into()];
        m.device_id = Some("device-galaxy-a36".into());
        let usage: BTreeMap<String, i64> = [
            ("usage-data".to_string(), 2_548),
            ("usage-voice".to_string(), 19_000),
            ("usage-sms".to_string(), 100),
            ("micro-payment".to_string(), 12_300),
        ]
        .into();
        let b = compute_bill(month(), &m, &catalogue(), &usage, 1).unwrap();
        let amount = |id: &str| b.items.iter().find(|i| i.product_id == id).unwrap().amount;
        // 500 MB over at 2,253 won per 100 MB = 11,265; 1,000 s over at 198 per 100 s = 1,980.
        assert_eq!(amount("usage-data"), 11_265);
        assert_eq!(amount("usage-voice"), 1_980);
        assert_eq!(amount("usage-sms"), 0);
        assert_eq!(amount("micro-payment"), 12_300);
        // Contract 25% of 33,000 = 8,250; family 10% of the remaining 24,750 = 2,475.
        assert_eq!(amount("discount-contract"), 8_250);
        assert_eq!(amount("discount-family"), 2_475);
        // Charges 33,000 + 7,900 + 21,000 + 11,265 + 1,980 + 0 + 12,300 = 87,445.
        assert_eq!(b.total_amount, 87_445);
        // Taxable 87,445 - 12,300 - 10,725 = 64,420; VAT 6,442.
        assert_eq!(b.vat_amount, 6_442);
        // 87,445 - 10,725 + 6,442 = 83,162 -> 83,160 with a 2-won rounding line.
        assert_eq!(amount("rounding"), 2);
        assert_eq!(b.final_amount, 83_160);
        check_invariants(&b);
    }

    #[test]
    fn unlimited_allowances_and_caps() {
        let mut m = member("plan-5g-premium");
        m.family_bundle = true;
        m.joined_on = 12_784; // 2005: long tenure
        let usage: BTreeMap<String, i64> = [("usage-data".to_string(), 900_000)].into();
        let b = compute_bill(month(), &m, &catalogue(), &usage, 1).unwrap();
        let amount = |id: &str| b.items.iter().find(|i| i.product_id == id).unwrap().amount;
        assert_eq!(amount("usage-data"), 0);
        // Family 10% of 105,000 = 10,500 (under the 11,000 cap); tenure 5% = 5,250 -> cap 5,000.
        assert_eq!(amount("discount-family"), 10_500);
        assert_eq!(amount("discount-tenure"), 5_000);
        check_invariants(&b);
    }

    #[test]
    fn roaming_pass_makes_roaming_data_free_up_to_its_allowance() {
        let mut m = member("plan-5g-slim");
        m.addon_ids = vec!["addon-roaming-pass".into()];
        let usage: BTreeMap<String, i64> = [("roaming-data".to_string(), 3_082)].into();
        let b = compute_bill(month(), &m, &catalogue(), &usage, 1).unwrap();
        // 10 MB over the 3,072 MB pass at 1,100 won per 10 MB.
        assert_eq!(
            b.items
                .iter()
                .find(|i| i.product_id == "roaming-data")
                .unwrap()
                .amount,
            1_100
        );
        check_invariants(&b);
    }

    #[test]
    fn usage_validation() {
        let c = catalogue();
        assert!(validate_usage(&c, "usage-data", 10).is_ok());
        assert_eq!(
            validate_usage(&c, "nope", 1),
            Err(UsageError::UnknownProduct("nope".into()))
        );
        assert!(matches!(
            validate_usage(&c, "plan-5g-slim", 1),
            Err(UsageError::NotMetered(_))
        ));
        assert!(matches!(
            validate_usage(&c, "usage-sms", 0),
            Err(UsageError::NotPositive { .. })
        ));
        assert!(matches!(
            validate_usage(&c, "micro-payment", 2_000_000),
            Err(UsageError::Absurd { .. })
        ));
    }

    #[test]
    fn every_generated_member_bills_consistently() {
        let g = crate::generator::Generator::new(11, month(), chrono_tz::Asia::Seoul);
        let c = catalogue();
        for id in 1..=3_000 {
            let mut usage = BTreeMap::new();
            for u in g.usage(id) {
                validate_usage(&c, &u.product_id, u.quantity).unwrap();
                *usage.entry(u.product_id).or_insert(0) += u.quantity;
            }
            let b = compute_bill(month(), &g.member(id), &c, &usage, 1).unwrap();
            check_invariants(&b);
            assert_eq!(
                b,
                compute_bill(month(), &g.member(id), &c, &usage, 1).unwrap()
            );
        }
    }
}
