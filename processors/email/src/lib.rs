//! The email channel.
//!
//! Consumes `email-requests` and `email-requests-retry-N` (group `email`); renders the bill
//! with the active email template (maud, escaped) and sends it through a [`MailGateway`].
//! Produces retries to `email-requests-retry-N` and, once email gives up (an undeliverable
//! address, or the last attempt failed), an [`SmsRequest`] with the bill's summary to
//! `sms-requests`. Guarantees and steps: [`billing_messaging::channel`].
//! Run: `email` (see `email --help`; the gateway simulation is configured by `GATEWAY_*`).

use billing_messaging::{
    Channel, GaveUp, Mail, MailGateway, MessagingError, SendError, UnknownOutcome,
    channel::idempotency_key,
    store::{BillContext, DeliveryStatus, DeliveryUpdate, TemplateRow},
    template::render_email,
};
use billing_runtime::{CommonArgs, Incoming, Producer};
use billing_schema::{
    EmailRequest, Encoder, Registry, SmsRequest,
    catalogue::{EMAIL_REQUESTS, EMAIL_RETRIES, MAX_RETRIES, SMS_REQUESTS, Topic},
};

/// The channel's name: group id, stage, `delivery.channel`.
pub const NAME: &str = "email";

/// Email over a [`MailGateway`], falling back to SMS.
#[derive(Debug)]
pub struct EmailChannel<G> {
    gateway: G,
    producer: Producer,
    sms_topic: String,
    sms_encoder: Encoder<SmsRequest>,
}

impl<G: MailGateway> EmailChannel<G> {
    /// An email channel sending through `gateway`.
    pub async fn new(common: &CommonArgs, gateway: G) -> Result<Self, MessagingError> {
        let catalogue = common.catalogue();
        let registry = Registry::new(&common.schema_registry_url)?;
        Ok(EmailChannel {
            gateway,
            producer: Producer::new(&common.kafka())?,
            sms_topic: catalogue.name(&SMS_REQUESTS.spec),
            sms_encoder: Encoder::register(&registry, &catalogue.value_subject(&SMS_REQUESTS.spec))
                .await?,
        })
    }
}

impl<G: MailGateway> Channel for EmailChannel<G> {
    type Request = EmailRequest;
    const NAME: &'static str = NAME;
    const GAVE_UP: DeliveryStatus = DeliveryStatus::Failed;
    const NEEDS_ITEMS: bool = true;
    const TOPIC: Topic<EmailRequest> = EMAIL_REQUESTS;
    const RETRY_TOPICS: [Topic<EmailRequest>; MAX_RETRIES] = EMAIL_RETRIES;

    async fn deliver(
        &self,
        bill: &BillContext,
        template: &TemplateRow,
        r: &EmailRequest,
    ) -> Result<(), SendError> {
        let (subject, html) = render_email(
            template.subject.as_deref().unwrap_or_default(),
            &template.body,
            &bill.view,
        );
        let mail = Mail {
            idempotency_key: idempotency_key(NAME, r.bill_id),
            to: bill.email.clone(),
            subject,
            html,
            attempt: u32::try_from(r.attempt).unwrap_or(0),
        };
        self.gateway.send(&mail).await
    }

    fn unknown_outcome(&self) -> UnknownOutcome {
        self.gateway.unknown_outcome()
    }

    async fn give_up(
        &self,
        bill: &BillContext,
        record: &Incoming<EmailRequest>,
        error: &str,
    ) -> Result<GaveUp, String> {
        let r = &record.value;
        let sms = SmsRequest {
            delivery_id: format!("sms-{}", r.bill_id),
            bill_id: r.bill_id,
            member_id: r.member_id,
            billing_month: r.billing_month.clone(),
            final_amount: bill.view.final_amount,
            attempt: 0,
            requested_at: chrono::Utc::now().timestamp_millis(),
            not_before: None,
            email_error: Some(error.to_string()),
            last_error: None,
        };
        let payload = self.sms_encoder.encode(&sms).map_err(|e| e.to_string())?;
        let key = r.member_id.to_string();
        self.producer
            .send(&self.sms_topic, Some(key.as_bytes()), Some(&payload), None)
            .await
            .map_err(|e| e.to_string())?;
        Ok(GaveUp {
            also: vec![DeliveryUpdate {
                bill_id: r.bill_id,
                channel: "sms",
                status: DeliveryStatus::Queued,
                attempts: 0,
                sent_at: None,
                last_error: None,
                template_version: None,
                handover: None,
                source: None,
            }],
        })
    }
}
