//! The product catalogue of a Korean mobile operator. Prices are integer won; a metered price
//! is `unit_price` won per `per_units` units, so fractional rates (1.98 won a second) need no
//! fractions of a won.

use billing_schema::{Allowance, Product, ProductKind};

/// Megabytes in a gigabyte, for allowances.
const GB: i64 = 1024;
/// Unlimited allowance.
pub const UNLIMITED: i64 = -1;

pub const DATA: &str = "usage-data";
pub const VOICE: &str = "usage-voice";
pub const SMS: &str = "usage-sms";
pub const ROAMING_DATA: &str = "roaming-data";
pub const ROAMING_VOICE: &str = "roaming-voice";
pub const MICRO_PAYMENT: &str = "micro-payment";
pub const DISCOUNT_CONTRACT: &str = "discount-contract";
pub const DISCOUNT_FAMILY: &str = "discount-family";
pub const DISCOUNT_TENURE: &str = "discount-tenure";

/// The plans, most popular first, with their share of members in per mille.
pub const PLANS: [(&str, u32); 5] = [
    ("plan-5g-standard", 340),
    ("plan-5g-slim", 250),
    ("plan-lte-basic", 200),
    ("plan-5g-premium", 130),
    ("plan-lte-senior", 80),
];
/// Optional add-ons.
pub const ADDONS: [&str; 4] = [
    "addon-music",
    "addon-ott",
    "addon-insurance",
    "addon-roaming-pass",
];
/// Devices sold on instalment.
pub const DEVICES: [&str; 3] = ["device-galaxy-s25", "device-iphone-17", "device-galaxy-a36"];

fn base(product_id: &str, name: &str, kind: ProductKind, updated_at: i64) -> Product {
    Product {
        product_id: product_id.to_string(),
        name: name.to_string(),
        kind,
        monthly_fee: 0,
        usage_unit: None,
        unit_price: 0,
        per_units: 1,
        allowances: vec![],
        instalment_months: 0,
        discount_rate_bp: 0,
        discount_cap: 0,
        priority: 0,
        updated_at,
    }
}

fn plan(
    id: &str,
    name: &str,
    fee: i64,
    data_mb: i64,
    voice_sec: i64,
    sms: i64,
    at: i64,
) -> Product {
    let allow = |p: &str, q: i64| Allowance {
        usage_product_id: p.to_string(),
        quantity: q,
    };
    Product {
        monthly_fee: fee,
        allowances: vec![
            allow(DATA, data_mb),
            allow(VOICE, voice_sec),
            allow(SMS, sms),
        ],
        ..base(id, name, ProductKind::Plan, at)
    }
}

fn flat(id: &str, name: &str, kind: ProductKind, fee: i64, at: i64) -> Product {
    Product {
        monthly_fee: fee,
        ..base(id, name, kind, at)
    }
}

fn device(id: &str, name: &str, monthly: i64, months: i32, at: i64) -> Product {
    Product {
        monthly_fee: monthly,
        instalment_months: months,
        ..base(id, name, ProductKind::Device, at)
    }
}

fn metered(
    id: &str,
    name: &str,
    kind: ProductKind,
    unit: &str,
    price: i64,
    per: i64,
    at: i64,
) -> Product {
    Product {
        usage_unit: Some(unit.to_string()),
        unit_price: price,
        per_units: per,
        ..base(id, name, kind, at)
    }
}

fn discount(id: &str, name: &str, rate_bp: i32, cap: i64, priority: i32, at: i64) -> Product {
    Product {
        discount_rate_bp: rate_bp,
        discount_cap: cap,
        priority,
        ..base(id, name, ProductKind::Discount, at)
    }
}

/// The whole catalogue, stamped `updated_at` (epoch ms).
pub fn catalogue(updated_at: i64) -> Vec<Product> {
    let at = updated_at;
    vec![
        plan(
            "plan-5g-premium",
            "5G 프리미엄",
            105_000,
            UNLIMITED,
            UNLIMITED,
            UNLIMITED,
            at,
        ),
        plan(
            "plan-5g-standard",
            "5G 스탠다드",
            75_000,
            110 * GB,
            UNLIMITED,
            UNLIMITED,
            at,
        ),
        plan(
            "plan-5g-slim",
            "5G 슬림",
            55_000,
            10 * GB,
            UNLIMITED,
            UNLIMITED,
            at,
        ),
        plan(
            "plan-lte-basic",
            "LTE 베이직",
            33_000,
            2 * GB,
            300 * 60,
            100,
            at,
        ),
        plan(
            "plan-lte-senior",
            "LTE 시니어",
            19_800,
            GB,
            200 * 60,
            50,
            at,
        ),
        flat(
            "addon-music",
            "지니뮤직 무제한",
            ProductKind::Addon,
            7_900,
            at,
        ),
        flat(
            "addon-ott",
            "OTT 스트리밍 패스",
            ProductKind::Addon,
            9_900,
            at,
        ),
        flat(
            "addon-insurance",
            "휴대폰 분실·파손 보험",
            ProductKind::Addon,
            5_500,
            at,
        ),
        flat(
            "addon-roaming-pass",
            "로밍 데이터 패스",
            ProductKind::Addon,
            11_000,
            at,
        ),
        device("device-galaxy-s25", "갤럭시 S25 할부", 52_000, 24, at),
        device("device-iphone-17", "아이폰 17 할부", 58_500, 24, at),
        device("device-galaxy-a36", "갤럭시 A36 할부", 21_000, 24, at),
        // 22.53 won/MB, 1.98 won/s, 22 won/message: the standard overage rates.
        metered(
            DATA,
            "데이터 초과 사용",
            ProductKind::Usage,
            "MB",
            2_253,
            100,
            at,
        ),
        metered(VOICE, "음성 통화", ProductKind::Usage, "SEC", 198, 100, at),
        metered(SMS, "문자 메시지", ProductKind::Usage, "MSG", 22, 1, at),
        metered(
            ROAMING_DATA,
            "해외 로밍 데이터",
            ProductKind::Roaming,
            "MB",
            1_100,
            10,
            at,
        ),
        metered(
            ROAMING_VOICE,
            "해외 로밍 음성",
            ProductKind::Roaming,
            "SEC",
            1_500,
            60,
            at,
        ),
        metered(
            MICRO_PAYMENT,
            "휴대폰 소액결제",
            ProductKind::MicroPayment,
            "WON",
            1,
            1,
            at,
        ),
        discount(DISCOUNT_CONTRACT, "선택약정 25% 할인", 2_500, 0, 1, at),
        discount(DISCOUNT_FAMILY, "가족결합 할인", 1_000, 11_000, 2, at),
        discount(DISCOUNT_TENURE, "장기고객 할인", 500, 5_000, 3, at),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalogue_ids_are_unique_and_referenced_ids_exist() {
        let c = catalogue(0);
        let ids: std::collections::HashSet<_> = c.iter().map(|p| p.product_id.as_str()).collect();
        assert_eq!(ids.len(), c.len());
        for id in PLANS.iter().map(|p| p.0).chain(ADDONS).chain(DEVICES) {
            assert!(ids.contains(id), "{id}");
        }
        for p in &c {
            for a in &p.allowances {
                assert!(ids.contains(a.usage_product_id.as_str()));
            }
            assert!(p.per_units > 0 && p.monthly_fee >= 0 && p.unit_price >= 0);
        }
        assert_eq!(PLANS.iter().map(|p| p.1).sum::<u32>(), 1000);
    }
}
