//! Deterministic test data for a month: members and their usage.
//!
//! Each member draws from its own random stream, seeded from (seed, member id), so the output
//! depends only on the seed, the member and the month, never on how generation is split
//! across threads or batches. Timestamps come from the month, never the wall clock.

use billing_schema::{Member, UsageRecord};
use chrono_tz::Tz;
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;

use crate::{month::BillingMonth, products};

/// Per mille of members whose email address is permanently undeliverable (`.invalid`, a
/// reserved TLD): the email gateway refuses them and they fall back to SMS.
pub const UNDELIVERABLE_PER_MILLE: u32 = 5;
/// The domain of undeliverable addresses.
pub const UNDELIVERABLE_DOMAIN: &str = "bounce.invalid";

const SURNAMES: [&str; 20] = [
    "김", "이", "박", "최", "정", "강", "조", "윤", "장", "임", "한", "오", "서", "신", "권", "황",
    "안", "송", "류", "홍",
];
const SYLLABLES: [&str; 24] = [
    "민", "서", "준", "지", "현", "우", "윤", "도", "하", "예", "은", "수", "연", "진", "영", "호",
    "유", "아", "성", "재", "희", "태", "원", "빈",
];
const DOMAINS: [&str; 5] = [
    "naver.com",
    "gmail.com",
    "daum.net",
    "kakao.com",
    "hanmail.net",
];

/// SplitMix64: spreads (seed, id) into independent stream seeds.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Generates one month's data.
#[derive(Debug, Clone)]
pub struct Generator {
    seed: u64,
    month: BillingMonth,
    start_ms: i64,
    end_ms: i64,
    first_day: i32,
}

impl Generator {
    /// A generator for `month` in time zone `tz`.
    pub fn new(seed: u64, month: BillingMonth, tz: Tz) -> Self {
        let (start, end) = month.bounds(tz);
        let first_day = i32::try_from(
            month
                .first_day()
                .signed_duration_since(chrono::NaiveDate::default())
                .num_days(),
        )
        .unwrap_or(i32::MAX);
        Generator {
            seed,
            month,
            start_ms: start.timestamp_millis(),
            end_ms: end.timestamp_millis(),
            first_day,
        }
    }

    /// The instant every generated record is stamped with as its last update.
    pub fn updated_at(&self) -> i64 {
        self.start_ms
    }

    fn rng(&self, member_id: i64, stream: u64) -> Pcg64Mcg {
        let id = u64::from_ne_bytes(member_id.to_ne_bytes());
        Pcg64Mcg::seed_from_u64(mix(mix(self.seed ^ stream) ^ id))
    }

    /// Member `member_id` (1-based) as of the start of the month.
    pub fn member(&self, member_id: i64) -> Member {
        let mut r = self.rng(member_id, 1);
        let name = format!(
            "{}{}{}",
            SURNAMES[r.random_range(0..SURNAMES.len())],
            SYLLABLES[r.random_range(0..SYLLABLES.len())],
            SYLLABLES[r.random_range(0..SYLLABLES.len())]
        );
        let email = if r.random_range(0..1000) < UNDELIVERABLE_PER_MILLE {
            format!("member{member_id}@{UNDELIVERABLE_DOMAIN}")
        } else {
            format!(
                "member{member_id}@{}",
                DOMAINS[r.random_range(0..DOMAINS.len())]
            )
        };
        let phone = format!("+8210{:08}", member_id.rem_euclid(100_000_000));
        let delivery_day = r.random_range(1..=31);
        let (dnd_start_minute, dnd_end_minute) = if r.random_range(0..100) < 30 {
            // Evenings into mornings mostly, so many windows cross midnight.
            let start = r.random_range(19..=25) % 24 * 60 + [0, 30][r.random_range(0..2)];
            let length = r.random_range(6..=11) * 60;
            (Some(start), Some((start + length) % (24 * 60)))
        } else {
            (None, None)
        };
        let pick = r.random_range(0..1000);
        let mut acc = 0;
        let mut plan_id = products::PLANS[0].0;
        for (id, share) in products::PLANS {
            acc += share;
            if pick < acc {
                plan_id = id;
                break;
            }
        }
        let addon_ids = products::ADDONS
            .iter()
            .filter(|_| r.random_range(0..100) < 20)
            .map(|s| (*s).to_string())
            .collect();
        let device_id = (r.random_range(0..100) < 35)
            .then(|| products::DEVICES[r.random_range(0..products::DEVICES.len())].to_string());
        let contract_months = match r.random_range(0..100) {
            0..50 => 24,
            50..60 => 12,
            _ => 0,
        };
        // Joined between 2005-01-01 (day 12784) and the day before the month.
        let joined_on = r.random_range(12_784..self.first_day.max(12_785));
        Member {
            member_id,
            name,
            email,
            phone,
            delivery_day,
            dnd_start_minute,
            dnd_end_minute,
            plan_id: plan_id.to_string(),
            addon_ids,
            device_id,
            contract_months,
            joined_on,
            family_bundle: r.random_range(0..100) < 25,
            updated_at: self.start_ms,
        }
    }

    /// The member's usage for the month: 2 to 8 records (5 on average).
    pub fn usage(&self, member_id: i64) -> Vec<UsageRecord> {
        let mut r = self.rng(member_id, 2);
        let count = r.random_range(2..=8);
        (0..count)
            .map(|n| {
                let (product, quantity) = match r.random_range(0..100) {
                    0..45 => (products::DATA, r.random_range(50..=20_000)),
                    45..75 => (products::VOICE, r.random_range(10..=3_600)),
                    75..87 => (products::SMS, r.random_range(1..=60)),
                    87..90 => (products::ROAMING_DATA, r.random_range(10..=2_000)),
                    90..92 => (products::ROAMING_VOICE, r.random_range(30..=1_800)),
                    _ => (products::MICRO_PAYMENT, r.random_range(10..=500) * 100),
                };
                UsageRecord {
                    usage_id: format!("{}/{member_id}/{n}", self.month),
                    member_id,
                    product_id: product.to_string(),
                    quantity,
                    billing_month: self.month.to_string(),
                    occurred_at: r.random_range(self.start_ms..self.end_ms),
                }
            })
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn generator(seed: u64) -> Generator {
        Generator::new(seed, "2026-11".parse().unwrap(), chrono_tz::Asia::Seoul)
    }

    #[test]
    fn same_seed_same_data_in_any_order() {
        let g = generator(42);
        let forward: Vec<_> = (1..=50).map(|id| (g.member(id), g.usage(id))).collect();
        let backward: Vec<_> = (1..=50)
            .rev()
            .map(|id| (g.member(id), g.usage(id)))
            .collect();
        assert_eq!(forward, backward.into_iter().rev().collect::<Vec<_>>());
        assert_ne!(generator(43).member(1), g.member(1));
    }

    #[test]
    fn values_are_within_their_domains() {
        let g = generator(7);
        let month: BillingMonth = "2026-11".parse().unwrap();
        let (start, end) = month.bounds(chrono_tz::Asia::Seoul);
        let mut usage = 0;
        for id in 1..=2_000 {
            let m = g.member(id);
            assert!((1..=31).contains(&m.delivery_day));
            assert_eq!(m.dnd_start_minute.is_some(), m.dnd_end_minute.is_some());
            assert!(m.dnd_start_minute.unwrap_or(0) < 1440 && m.dnd_end_minute.unwrap_or(0) < 1440);
            for u in g.usage(id) {
                assert!(u.quantity > 0);
                assert!(
                    u.occurred_at >= start.timestamp_millis()
                        && u.occurred_at < end.timestamp_millis()
                );
                usage += 1;
            }
        }
        // 2..=8 a member, 5 on average.
        assert!((9_000..11_000).contains(&usage), "{usage}");
    }
}
