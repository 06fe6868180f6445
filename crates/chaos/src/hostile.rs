//! Hostile records for every input topic of the platform, each remembered by where it landed
//! so the run can check it became a dead letter; and honest duplicates (an at-least-once
//! upstream re-sending usage unchanged), which must be billed once and are no dead letters.

use std::collections::BTreeMap;

use billing_domain::{BillingMonth, generator::Generator, products, rules};
use billing_runtime::{CommonArgs, Producer, consumer::NOT_BEFORE};
use billing_schema::{
    Bill, EmailRequest, Encoder, Member, Product, ProductKind, Registry, SmsRequest, UsageRecord,
    catalogue::{
        BILLS, DEAD_LETTERS, EMAIL_REQUESTS, EMAIL_RETRIES, MEMBERS, PRODUCTS, SMS_REQUESTS,
        USAGE_RECORDS,
    },
};
use rdkafka::message::{Header, OwnedHeaders};

/// Where one hostile record landed, and what it was.
#[derive(Debug, Clone)]
pub struct Injected {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub what: &'static str,
}

/// Writes records and remembers the hostile ones.
pub struct Injector<'a> {
    common: &'a CommonArgs,
    registry: &'a Registry,
    producer: Producer,
    pub injected: Vec<Injected>,
    /// Usage records sent twice unchanged.
    pub repeats: usize,
}

/// Bytes no decoder can read: not the Confluent framing.
const GARBAGE: &[u8] = b"\xff\xfe not an avro record \x00";
/// Framed, naming a schema id that is registered for no subject of the topic (or at all).
const FOREIGN: &[u8] = b"\x00\x7f\xff\xff\xf0\x02\x04\x06";

impl<'a> Injector<'a> {
    pub fn new(common: &'a CommonArgs, registry: &'a Registry) -> anyhow::Result<Self> {
        Ok(Injector {
            common,
            registry,
            producer: Producer::new(&common.kafka())?,
            injected: Vec::new(),
            repeats: 0,
        })
    }

    async fn send(
        &mut self,
        topic: &str,
        key: &str,
        payload: &[u8],
        headers: Option<OwnedHeaders>,
        what: Option<&'static str>,
    ) -> anyhow::Result<()> {
        let d = self
            .producer
            .send(topic, Some(key.as_bytes()), Some(payload), headers)
            .await?;
        if let Some(what) = what {
            self.injected.push(Injected {
                topic: topic.to_string(),
                partition: d.partition,
                offset: d.offset,
                what,
            });
        }
        Ok(())
    }

    async fn encoder<V: billing_schema::AvroRecord>(
        &self,
        spec: &billing_schema::TopicSpec,
    ) -> anyhow::Result<Encoder<V>> {
        let subject = self.common.catalogue().value_subject(spec);
        Ok(Encoder::register(self.registry, &subject).await?)
    }

    /// Settlement's and the sink's inputs: members, products, usage and bills. Hostile members
    /// take ids above the seeded `members`, so everyone seeded is still billed to the rules.
    pub async fn settlement_inputs(
        &mut self,
        g: &Generator,
        members: i64,
        month: BillingMonth,
    ) -> anyhow::Result<()> {
        self.members(g, members).await?;
        self.products(g).await?;
        self.usage(g, members).await?;
        self.bills(g, month).await
    }

    async fn members(&mut self, g: &Generator, n: i64) -> anyhow::Result<()> {
        let enc = self.encoder::<Member>(&MEMBERS.spec).await?;
        let topic = self.common.catalogue().name(&MEMBERS.spec);
        type Mutation = fn(&mut Member);
        let cases: [(i64, &'static str, Mutation); 6] = [
            (n + 1, "member: NUL in the name", |m| m.name = "a\0b".into()),
            (n + 2, "member: joined at the end of time", |m| {
                m.joined_on = i32::MAX;
            }),
            (n + 3, "member: 5,000 copies of an add-on", |m| {
                m.addon_ids = vec!["addon-music".into(); 5000];
            }),
            (n + 4, "member: do-not-disturb from minute -1", |m| {
                m.dnd_start_minute = Some(-1);
                m.dnd_end_minute = Some(600);
            }),
            (10_000_000_000, "member: id out of range", |_| {}),
            (-7, "member: negative id", |_| {}),
        ];
        for (id, what, mutate) in cases {
            let mut m = g.member(1);
            m.member_id = id;
            mutate(&mut m);
            self.send(&topic, &id.to_string(), &enc.encode(&m)?, None, Some(what))
                .await?;
        }
        let key = (n + 5).to_string();
        let other = enc.encode(&g.member(1))?;
        self.send(
            &topic,
            &key,
            &other,
            None,
            Some("member: value of another key"),
        )
        .await?;
        self.send(
            &topic,
            &(n + 6).to_string(),
            GARBAGE,
            None,
            Some("member: garbage"),
        )
        .await
    }

    async fn products(&mut self, g: &Generator) -> anyhow::Result<()> {
        let enc = self.encoder::<Product>(&PRODUCTS.spec).await?;
        let topic = self.common.catalogue().name(&PRODUCTS.spec);
        let mut evil = products::catalogue(g.updated_at())
            .into_iter()
            .find(|p| p.kind == ProductKind::Addon)
            .ok_or_else(|| anyhow::anyhow!("no add-on in the catalogue"))?;
        evil.product_id = "addon-evil".into();
        evil.monthly_fee = -100;
        let what = Some("product: negative price");
        self.send(&topic, "addon-evil", &enc.encode(&evil)?, None, what)
            .await?;
        self.send(
            &topic,
            "addon-foreign",
            FOREIGN,
            None,
            Some("product: foreign schema id"),
        )
        .await
    }

    async fn usage(&mut self, g: &Generator, n: i64) -> anyhow::Result<()> {
        let enc = self.encoder::<UsageRecord>(&USAGE_RECORDS.spec).await?;
        let topic = self.common.catalogue().name(&USAGE_RECORDS.spec);
        let sample: Vec<UsageRecord> = (1..=n).flat_map(|id| g.usage(id)).take(21).collect();
        let Some((changed, repeated)) = sample.split_last() else {
            anyhow::bail!("the seeded month has no usage");
        };
        for u in repeated {
            self.send(
                &topic,
                &u.member_id.to_string(),
                &enc.encode(u)?,
                None,
                None,
            )
            .await?;
            self.repeats += 1;
        }
        let mut other = changed.clone();
        other.quantity += 1;
        let key = other.member_id.to_string();
        let what = Some("usage: same usage id, other content");
        self.send(&topic, &key, &enc.encode(&other)?, None, what)
            .await?;
        let mut negative = changed.clone();
        negative.usage_id = "chaos-negative".into();
        negative.quantity = -5;
        let what = Some("usage: negative quantity");
        self.send(&topic, &key, &enc.encode(&negative)?, None, what)
            .await?;
        let mut stranger = changed.clone();
        stranger.usage_id = "chaos-stranger".into();
        stranger.product_id = "plan-unknown".into();
        let what = Some("usage: unknown product");
        self.send(&topic, &key, &enc.encode(&stranger)?, None, what)
            .await?;
        self.send(&topic, &key, GARBAGE, None, Some("usage: garbage"))
            .await
    }

    async fn bills(&mut self, g: &Generator, month: BillingMonth) -> anyhow::Result<()> {
        let enc = self.encoder::<Bill>(&BILLS.spec).await?;
        let topic = self.common.catalogue().name(&BILLS.spec);
        let catalogue = products::catalogue(g.updated_at())
            .into_iter()
            .map(|p| (p.product_id.clone(), p))
            .collect();
        let settled_at = month.bounds(self.common.billing_tz).1.timestamp_millis();
        let plain = rules::compute_bill(
            month,
            &g.member(1),
            &catalogue,
            &BTreeMap::new(),
            settled_at,
        )?;
        let mut wrong_id = plain.clone();
        wrong_id.bill_id += 1;
        let what = Some("bill: id not its member's");
        self.send(&topic, "1", &enc.encode(&wrong_id)?, None, what)
            .await?;
        let mut bad_json = plain;
        bad_json.member_id = 2;
        bad_json.bill_id = rules::bill_id(month, 2);
        if let Some(item) = bad_json.items.first_mut() {
            item.snapshot = r#"{"note":"\u0000"}"#.into();
        }
        // Member 2's real bill arrives later from settlement; this one would shadow it if it
        // loaded, so the checks would see a wrong bill.
        let what = Some("bill: snapshot PostgreSQL cannot store");
        self.send(&topic, "2", &enc.encode(&bad_json)?, None, what)
            .await?;
        self.send(&topic, "3", GARBAGE, None, Some("bill: garbage"))
            .await
    }

    /// The channels' and the recorder's inputs: requests for bills that do not exist, a
    /// not-before at the end of time, garbage on a retry topic and on `dead-letters` itself.
    pub async fn delivery_inputs(&mut self, month: BillingMonth, n: i64) -> anyhow::Result<()> {
        let catalogue = self.common.catalogue();
        let email = self.encoder::<EmailRequest>(&EMAIL_REQUESTS.spec).await?;
        let sms = self.encoder::<SmsRequest>(&SMS_REQUESTS.spec).await?;
        let ghost = n + 1;
        let bill_id = rules::bill_id(month, ghost);
        let request = EmailRequest {
            delivery_id: format!("email-{bill_id}"),
            bill_id,
            member_id: ghost,
            billing_month: month.to_string(),
            attempt: 0,
            requested_at: 0,
            not_before: None,
            last_error: None,
        };
        let never = || {
            Some(OwnedHeaders::new().insert(Header {
                key: NOT_BEFORE,
                value: Some(&i64::MAX.to_be_bytes()[..]),
            }))
        };
        let topic = catalogue.name(&EMAIL_REQUESTS.spec);
        let key = ghost.to_string();
        let what = Some("email request: no such bill, not before the end of time");
        self.send(&topic, &key, &email.encode(&request)?, never(), what)
            .await?;
        self.send(&topic, &key, GARBAGE, None, Some("email request: garbage"))
            .await?;
        let retry = catalogue.name(&EMAIL_RETRIES[0].spec);
        let what = Some("email retry: foreign schema, not before the end of time");
        self.send(&retry, &key, FOREIGN, never(), what).await?;
        let sms_request = SmsRequest {
            delivery_id: format!("sms-{bill_id}"),
            bill_id,
            member_id: ghost,
            billing_month: month.to_string(),
            final_amount: 1,
            attempt: 0,
            requested_at: 0,
            not_before: None,
            email_error: None,
            last_error: None,
        };
        let topic = catalogue.name(&SMS_REQUESTS.spec);
        let what = Some("sms request: no such bill");
        self.send(&topic, &key, &sms.encode(&sms_request)?, None, what)
            .await?;
        self.send(&topic, &key, GARBAGE, None, Some("sms request: garbage"))
            .await?;
        let letters = catalogue.name(&DEAD_LETTERS.spec);
        self.send(&letters, &key, GARBAGE, None, Some("dead letter: garbage"))
            .await
    }
}
