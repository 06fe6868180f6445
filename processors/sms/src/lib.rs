//! The SMS channel: the fallback when email gives up.
//!
//! Consumes `sms-requests` and `sms-requests-retry-N` (group `sms`); renders the active SMS
//! template (a short summary) and sends it through an [`SmsGateway`]. Produces retries to
//! `sms-requests-retry-N` and, once SMS gives up too, a [`DeadLetter`] with the attempt history
//! and the request's bytes to `dead-letters` (recorded in `dead_letter` by the `dlq`
//! processor, and replayable with `billing dlq replay`). Guarantees and steps:
//! [`billing_messaging::channel`].
//! Run: `sms` (see `sms --help`).

use billing_messaging::{
    Channel, GaveUp, MessagingError, SendError, Sms, SmsGateway, UnknownOutcome,
    channel::idempotency_key,
    store::{BillContext, DeliveryStatus, TemplateRow},
    template::render_sms,
};
use billing_runtime::{CommonArgs, Incoming, Producer};
use billing_schema::{
    DeadLetter, Encoder, Registry, SmsRequest,
    catalogue::{DEAD_LETTERS, MAX_RETRIES, SMS_REQUESTS, SMS_RETRIES, Topic},
};

/// The channel's name: group id, stage, `delivery.channel`.
pub const NAME: &str = "sms";
/// The stage recorded on the dead letters of undeliverable bills.
pub const UNDELIVERABLE: &str = "undeliverable";

/// SMS over an [`SmsGateway`], ending in the dead-letter topic.
#[derive(Debug)]
pub struct SmsChannel<G> {
    gateway: G,
    producer: Producer,
    dlq_topic: String,
    dlq_encoder: Encoder<DeadLetter>,
    /// Re-encodes a request as the dead letter's payload, replayable to `sms-requests`.
    request_encoder: Encoder<SmsRequest>,
}

impl<G: SmsGateway> SmsChannel<G> {
    /// An SMS channel sending through `gateway`.
    pub async fn new(common: &CommonArgs, gateway: G) -> Result<Self, MessagingError> {
        let catalogue = common.catalogue();
        let registry = Registry::new(&common.schema_registry_url)?;
        Ok(SmsChannel {
            gateway,
            producer: Producer::new(&common.kafka())?,
            dlq_topic: catalogue.name(&DEAD_LETTERS.spec),
            dlq_encoder: Encoder::register(&registry, &catalogue.value_subject(&DEAD_LETTERS.spec))
                .await?,
            request_encoder: Encoder::register(
                &registry,
                &catalogue.value_subject(&SMS_REQUESTS.spec),
            )
            .await?,
        })
    }
}

impl<G: SmsGateway> Channel for SmsChannel<G> {
    type Request = SmsRequest;
    const NAME: &'static str = NAME;
    const GAVE_UP: DeliveryStatus = DeliveryStatus::Dead;
    const NEEDS_ITEMS: bool = false;
    const TOPIC: Topic<SmsRequest> = SMS_REQUESTS;
    const RETRY_TOPICS: [Topic<SmsRequest>; MAX_RETRIES] = SMS_RETRIES;

    async fn deliver(
        &self,
        bill: &BillContext,
        template: &TemplateRow,
        r: &SmsRequest,
    ) -> Result<(), SendError> {
        let sms = Sms {
            idempotency_key: idempotency_key(NAME, r.bill_id),
            to: bill.phone.clone(),
            text: render_sms(&template.body, &bill.view),
            attempt: u32::try_from(r.attempt).unwrap_or(0),
        };
        self.gateway.send(&sms).await
    }

    fn unknown_outcome(&self) -> UnknownOutcome {
        self.gateway.unknown_outcome()
    }

    async fn give_up(
        &self,
        _bill: &BillContext,
        record: &Incoming<SmsRequest>,
        error: &str,
    ) -> Result<GaveUp, String> {
        let r = &record.value;
        let mut attempts = Vec::new();
        if let Some(e) = &r.email_error {
            attempts.push(format!("email: {e}"));
        }
        if let Some(e) = &r.last_error {
            attempts.push(format!("sms attempt {}: {e}", r.attempt));
        }
        attempts.push(format!("sms attempt {}: {error}", r.attempt + 1));
        // Replayable from the start of the SMS channel.
        let replay = SmsRequest {
            attempt: 0,
            not_before: None,
            last_error: None,
            ..r.clone()
        };
        let letter = DeadLetter {
            source_topic: record.topic.clone(),
            source_partition: record.partition,
            source_offset: record.offset,
            stage: UNDELIVERABLE.to_string(),
            reason: format!("bill {} undeliverable by email and SMS: {error}", r.bill_id),
            key: record.key.clone(),
            payload: Some(
                self.request_encoder
                    .encode(&replay)
                    .map_err(|e| e.to_string())?,
            ),
            attempts,
            occurred_at: chrono::Utc::now().timestamp_millis(),
        };
        let payload = self
            .dlq_encoder
            .encode(&letter)
            .map_err(|e| e.to_string())?;
        self.producer
            .send(
                &self.dlq_topic,
                Some(record.topic.as_bytes()),
                Some(&payload),
                None,
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok(GaveUp { also: vec![] })
    }
}
