//! Record types, one per `.avsc` file in `schemas/`. Field names and order follow the schema;
//! a unit test checks every type against its schema both ways.

use std::sync::OnceLock;

use apache_avro::Schema;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// A type whose values are written with one compiled-in Avro schema.
pub trait AvroRecord: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The schema's JSON text, exactly as in `schemas/`.
    const SCHEMA_JSON: &'static str;
    /// The parsed schema, parsed once per process.
    fn schema() -> &'static Schema;
}

macro_rules! avro_record {
    ($ty:ty, $file:literal) => {
        impl AvroRecord for $ty {
            const SCHEMA_JSON: &'static str = include_str!(concat!("../../../schemas/", $file));
            fn schema() -> &'static Schema {
                static SCHEMA: OnceLock<Schema> = OnceLock::new();
                // The schema is compiled in and parsed by a unit test, so a failure here is a
                // build defect, not a runtime condition.
                #[allow(clippy::expect_used)]
                SCHEMA.get_or_init(|| {
                    Schema::parse_str(Self::SCHEMA_JSON)
                        .expect(concat!("schemas/", $file, " parses"))
                })
            }
        }
    };
}

/// A member on the members changelog. See `schemas/member.avsc`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub member_id: i64,
    pub name: String,
    pub email: String,
    pub phone: String,
    pub delivery_day: i32,
    pub dnd_start_minute: Option<i32>,
    pub dnd_end_minute: Option<i32>,
    pub plan_id: String,
    pub addon_ids: Vec<String>,
    pub device_id: Option<String>,
    pub contract_months: i32,
    /// Days since 1970-01-01.
    pub joined_on: i32,
    pub family_bundle: bool,
    /// Epoch milliseconds.
    pub updated_at: i64,
}
avro_record!(Member, "member.avsc");

/// What a catalogue entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ProductKind {
    Plan,
    Addon,
    Device,
    Usage,
    Roaming,
    MicroPayment,
    Discount,
}

/// Free units of one metered product that a plan includes each month.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allowance {
    pub usage_product_id: String,
    /// Free units per month; -1 means unlimited.
    pub quantity: i64,
}

/// A product catalogue entry. See `schemas/product.avsc`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Product {
    pub product_id: String,
    pub name: String,
    pub kind: ProductKind,
    pub monthly_fee: i64,
    pub usage_unit: Option<String>,
    pub unit_price: i64,
    pub per_units: i64,
    pub allowances: Vec<Allowance>,
    pub instalment_months: i32,
    pub discount_rate_bp: i32,
    pub discount_cap: i64,
    pub priority: i32,
    pub updated_at: i64,
}
avro_record!(Product, "product.avsc");

/// One metered usage event. See `schemas/usage_record.avsc`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRecord {
    pub usage_id: String,
    pub member_id: i64,
    pub product_id: String,
    pub quantity: i64,
    pub billing_month: String,
    pub occurred_at: i64,
}
avro_record!(UsageRecord, "usage_record.avsc");

/// Whether a bill line adds to or takes from the bill.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum BillItemKind {
    Charge,
    Discount,
}

/// One line of a bill. See `schemas/bill.avsc`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BillItem {
    pub item_id: i64,
    pub kind: BillItemKind,
    pub product_id: String,
    pub description: String,
    pub quantity: i64,
    pub amount: i64,
    pub snapshot: String,
}

/// A settled bill. See `schemas/bill.avsc`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bill {
    pub bill_id: i64,
    pub member_id: i64,
    pub billing_month: String,
    pub total_amount: i64,
    pub discount_amount: i64,
    pub vat_amount: i64,
    pub final_amount: i64,
    pub items: Vec<BillItem>,
    pub settled_at: i64,
}
avro_record!(Bill, "bill.avsc");

/// A request to deliver one bill by email. See `schemas/email_request.avsc`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmailRequest {
    pub delivery_id: String,
    pub bill_id: i64,
    pub member_id: i64,
    pub billing_month: String,
    pub attempt: i32,
    pub requested_at: i64,
    pub not_before: Option<i64>,
    pub last_error: Option<String>,
}
avro_record!(EmailRequest, "email_request.avsc");

/// A request to deliver a bill's summary by SMS. See `schemas/sms_request.avsc`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SmsRequest {
    pub delivery_id: String,
    pub bill_id: i64,
    pub member_id: i64,
    pub billing_month: String,
    pub final_amount: i64,
    pub attempt: i32,
    pub requested_at: i64,
    pub not_before: Option<i64>,
    pub email_error: Option<String>,
    pub last_error: Option<String>,
}
avro_record!(SmsRequest, "sms_request.avsc");

/// A record that could not be processed or delivered. See `schemas/dead_letter.avsc`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    pub stage: String,
    pub reason: String,
    #[serde(with = "apache_avro::serde::bytes_opt")]
    pub key: Option<Vec<u8>>,
    #[serde(with = "apache_avro::serde::bytes_opt")]
    pub payload: Option<Vec<u8>>,
    pub attempts: Vec<String>,
    pub occurred_at: i64,
}
avro_record!(DeadLetter, "dead_letter.avsc");

/// Every schema file with its record's full name, for registration and checks.
pub fn all_schemas() -> [(&'static str, &'static str); 7] {
    [
        ("kr.billing.Member", Member::SCHEMA_JSON),
        ("kr.billing.Product", Product::SCHEMA_JSON),
        ("kr.billing.UsageRecord", UsageRecord::SCHEMA_JSON),
        ("kr.billing.Bill", Bill::SCHEMA_JSON),
        ("kr.billing.EmailRequest", EmailRequest::SCHEMA_JSON),
        ("kr.billing.SmsRequest", SmsRequest::SCHEMA_JSON),
        ("kr.billing.DeadLetter", DeadLetter::SCHEMA_JSON),
    ]
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::codec::{decode_datum, encode_datum};

    fn round_trip<T: AvroRecord + PartialEq + std::fmt::Debug>(value: T) {
        let bytes = encode_datum(&value).unwrap();
        let back: T = decode_datum(T::schema(), &bytes).unwrap();
        assert_eq!(back, value);
    }

    #[test]
    fn every_schema_parses_and_names_its_record() {
        for (name, json) in all_schemas() {
            let schema = Schema::parse_str(json).unwrap();
            assert_eq!(
                schema.name().map(|n| n.fullname(None)),
                Some(name.to_string())
            );
        }
    }

    #[test]
    fn every_type_round_trips_through_its_schema() {
        round_trip(Member {
            member_id: 7,
            name: "김민준".into(),
            email: "m7@example.kr".into(),
            phone: "+821000000007".into(),
            delivery_day: 31,
            dnd_start_minute: Some(22 * 60),
            dnd_end_minute: Some(7 * 60),
            plan_id: "plan-5g-standard".into(),
            addon_ids: vec!["addon-music".into()],
            device_id: None,
            contract_months: 24,
            joined_on: 18_000,
            family_bundle: true,
            updated_at: 1_700_000_000_000,
        });
        round_trip(Product {
            product_id: "plan-5g-standard".into(),
            name: "5G 스탠다드".into(),
            kind: ProductKind::Plan,
            monthly_fee: 75_000,
            usage_unit: None,
            unit_price: 0,
            per_units: 1,
            allowances: vec![Allowance {
                usage_product_id: "usage-data".into(),
                quantity: -1,
            }],
            instalment_months: 0,
            discount_rate_bp: 0,
            discount_cap: 0,
            priority: 0,
            updated_at: 1,
        });
        round_trip(UsageRecord {
            usage_id: "2026-11/7/0".into(),
            member_id: 7,
            product_id: "usage-voice".into(),
            quantity: 120,
            billing_month: "2026-11".into(),
            occurred_at: 2,
        });
        round_trip(Bill {
            bill_id: 1,
            member_id: 7,
            billing_month: "2026-11".into(),
            total_amount: 100,
            discount_amount: 10,
            vat_amount: 9,
            final_amount: 99,
            items: vec![BillItem {
                item_id: 100,
                kind: BillItemKind::Discount,
                product_id: "disc".into(),
                description: "d".into(),
                quantity: 1,
                amount: 10,
                snapshot: "{}".into(),
            }],
            settled_at: 3,
        });
        round_trip(EmailRequest {
            delivery_id: "d".into(),
            bill_id: 1,
            member_id: 7,
            billing_month: "2026-11".into(),
            attempt: 2,
            requested_at: 4,
            not_before: Some(5),
            last_error: None,
        });
        round_trip(SmsRequest {
            delivery_id: "d".into(),
            bill_id: 1,
            member_id: 7,
            billing_month: "2026-11".into(),
            final_amount: 99,
            attempt: 0,
            requested_at: 4,
            not_before: None,
            email_error: Some("bounced".into()),
            last_error: None,
        });
        round_trip(DeadLetter {
            source_topic: "usage-records".into(),
            source_partition: 3,
            source_offset: 42,
            stage: "settlement".into(),
            reason: "unknown product".into(),
            key: Some(b"7".to_vec()),
            payload: Some(vec![0, 1, 2, 255]),
            attempts: vec!["a".into()],
            occurred_at: 6,
        });
    }
}
