//! The topic catalogue: every topic the platform uses, declared once with its key format,
//! cleanup policy, partitioning and value type. Processors never spell a topic name.
//!
//! A [`Catalogue`] adds an optional prefix to every name (and so to every subject), which
//! lets tests and parallel environments share one broker and one registry without meeting.

use std::marker::PhantomData;

use crate::types::{
    AvroRecord, Bill, DeadLetter, EmailRequest, Member, Product, SmsRequest, UsageRecord,
};

/// How a record key is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyFormat {
    /// The member id as a decimal UTF-8 string (Kafka's StringSerde). Every member-keyed topic
    /// uses it with the murmur2 partitioner, which is what makes them co-partitioned.
    MemberId,
    /// The product id as a UTF-8 string.
    ProductId,
    /// The source topic's name as a UTF-8 string (dead letters).
    SourceTopic,
}

/// The topic's cleanup policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cleanup {
    /// A changelog: the latest value per key is the state; a null value deletes the key.
    Compact,
    /// An event stream, kept for the retention period.
    Delete,
}

/// How many partitions a topic has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Partitioning {
    /// The platform's partition count (`BILLING_PARTITIONS`): every member-keyed topic has the
    /// same count, or co-partitioning breaks.
    Shared,
    /// A single partition: a small table every instance reads whole.
    Single,
}

/// Static facts about one topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicSpec {
    /// The kebab-case base name, before any prefix.
    pub name: &'static str,
    pub key: KeyFormat,
    pub cleanup: Cleanup,
    pub partitioning: Partitioning,
    /// The Avro record's full name (for docs and checks).
    pub record: &'static str,
    /// The value schema's JSON text.
    pub schema_json: &'static str,
}

/// A topic whose values are of type `V`.
#[derive(Debug)]
pub struct Topic<V> {
    pub spec: TopicSpec,
    _value: PhantomData<fn() -> V>,
}

impl<V> Clone for Topic<V> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<V> Copy for Topic<V> {}

impl<V: AvroRecord> Topic<V> {
    const fn new(
        name: &'static str,
        key: KeyFormat,
        cleanup: Cleanup,
        partitioning: Partitioning,
        record: &'static str,
    ) -> Self {
        Topic {
            spec: TopicSpec {
                name,
                key,
                cleanup,
                partitioning,
                record,
                schema_json: V::SCHEMA_JSON,
            },
            _value: PhantomData,
        }
    }
}

/// Members changelog (compacted): contact details, preferences, subscriptions.
pub const MEMBERS: Topic<Member> = Topic::new(
    "members",
    KeyFormat::MemberId,
    Cleanup::Compact,
    Partitioning::Shared,
    "kr.billing.Member",
);
/// Product catalogue changelog (compacted, one partition: every reader needs all of it).
pub const PRODUCTS: Topic<Product> = Topic::new(
    "products",
    KeyFormat::ProductId,
    Cleanup::Compact,
    Partitioning::Single,
    "kr.billing.Product",
);
/// Metered usage, co-partitioned with members.
pub const USAGE_RECORDS: Topic<UsageRecord> = Topic::new(
    "usage-records",
    KeyFormat::MemberId,
    Cleanup::Delete,
    Partitioning::Shared,
    "kr.billing.UsageRecord",
);
/// Settled bills with their items.
pub const BILLS: Topic<Bill> = Topic::new(
    "bills",
    KeyFormat::MemberId,
    Cleanup::Delete,
    Partitioning::Shared,
    "kr.billing.Bill",
);
/// Requests to deliver a bill by email.
pub const EMAIL_REQUESTS: Topic<EmailRequest> = Topic::new(
    "email-requests",
    KeyFormat::MemberId,
    Cleanup::Delete,
    Partitioning::Shared,
    "kr.billing.EmailRequest",
);
/// Requests to deliver a bill summary by SMS.
pub const SMS_REQUESTS: Topic<SmsRequest> = Topic::new(
    "sms-requests",
    KeyFormat::MemberId,
    Cleanup::Delete,
    Partitioning::Shared,
    "kr.billing.SmsRequest",
);
/// Records any stage gave up on, with the reason and the original bytes.
pub const DEAD_LETTERS: Topic<DeadLetter> = Topic::new(
    "dead-letters",
    KeyFormat::SourceTopic,
    Cleanup::Delete,
    Partitioning::Shared,
    "kr.billing.DeadLetter",
);

/// Most retries a channel may be configured with: one retry topic per retry.
pub const MAX_RETRIES: usize = 4;

const fn retry<V: AvroRecord>(name: &'static str, record: &'static str) -> Topic<V> {
    Topic::new(
        name,
        KeyFormat::MemberId,
        Cleanup::Delete,
        Partitioning::Shared,
        record,
    )
}

/// Email retries, one topic per retry number: every record in a topic waits the same delay,
/// so a partition's records fall due in order and the consumer holds only its head.
pub const EMAIL_RETRIES: [Topic<EmailRequest>; MAX_RETRIES] = [
    retry("email-requests-retry-1", "kr.billing.EmailRequest"),
    retry("email-requests-retry-2", "kr.billing.EmailRequest"),
    retry("email-requests-retry-3", "kr.billing.EmailRequest"),
    retry("email-requests-retry-4", "kr.billing.EmailRequest"),
];
/// SMS retries, as for email.
pub const SMS_RETRIES: [Topic<SmsRequest>; MAX_RETRIES] = [
    retry("sms-requests-retry-1", "kr.billing.SmsRequest"),
    retry("sms-requests-retry-2", "kr.billing.SmsRequest"),
    retry("sms-requests-retry-3", "kr.billing.SmsRequest"),
    retry("sms-requests-retry-4", "kr.billing.SmsRequest"),
];

/// Every topic in the catalogue.
pub const ALL: [TopicSpec; 15] = [
    MEMBERS.spec,
    PRODUCTS.spec,
    USAGE_RECORDS.spec,
    BILLS.spec,
    EMAIL_REQUESTS.spec,
    EMAIL_RETRIES[0].spec,
    EMAIL_RETRIES[1].spec,
    EMAIL_RETRIES[2].spec,
    EMAIL_RETRIES[3].spec,
    SMS_REQUESTS.spec,
    SMS_RETRIES[0].spec,
    SMS_RETRIES[1].spec,
    SMS_RETRIES[2].spec,
    SMS_RETRIES[3].spec,
    DEAD_LETTERS.spec,
];

/// The catalogue as seen by one environment: a name prefix and the shared partition count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Catalogue {
    /// Prepended to every topic name and subject; empty in production.
    pub prefix: String,
    /// Partition count of every [`Partitioning::Shared`] topic.
    pub partitions: i32,
}

impl Catalogue {
    /// A catalogue with the given prefix and shared partition count.
    pub fn new(prefix: impl Into<String>, partitions: i32) -> Self {
        Catalogue {
            prefix: prefix.into(),
            partitions,
        }
    }

    /// The full topic name.
    pub fn name(&self, spec: &TopicSpec) -> String {
        format!("{}{}", self.prefix, spec.name)
    }

    /// The value subject under the topic name strategy: `<topic>-value`.
    pub fn value_subject(&self, spec: &TopicSpec) -> String {
        format!("{}-value", self.name(spec))
    }

    /// The partition count the topic is created with.
    pub fn partitions(&self, spec: &TopicSpec) -> i32 {
        match spec.partitioning {
            Partitioning::Shared => self.partitions,
            Partitioning::Single => 1,
        }
    }

    /// Which catalogue topic a full name belongs to, if any.
    pub fn spec_of(&self, topic: &str) -> Option<&'static TopicSpec> {
        let base = topic.strip_prefix(self.prefix.as_str())?;
        ALL.iter().find(|s| s.name == base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_kebab_case_and_unique() {
        let mut names: Vec<_> = ALL.iter().map(|s| s.name).collect();
        assert!(names.iter().all(|n| {
            n.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        }));
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ALL.len());
    }

    #[test]
    fn prefix_applies_to_names_and_subjects() {
        let c = Catalogue::new("t1.", 4);
        assert_eq!(c.name(&BILLS.spec), "t1.bills");
        assert_eq!(c.value_subject(&BILLS.spec), "t1.bills-value");
        assert_eq!(c.partitions(&PRODUCTS.spec), 1);
        assert_eq!(c.partitions(&USAGE_RECORDS.spec), 4);
        assert_eq!(c.spec_of("t1.usage-records"), Some(&USAGE_RECORDS.spec));
        assert_eq!(c.spec_of("usage-records"), None);
    }

    #[test]
    fn member_keyed_topics_share_partitioning() {
        for spec in ALL.iter().filter(|s| s.key == KeyFormat::MemberId) {
            assert_eq!(spec.partitioning, Partitioning::Shared, "{}", spec.name);
        }
    }
}
