-- Messaging: the first active templates, which template version a delivery used, and the
-- simulated gateways' mailbox.

alter table delivery add column template_version int null;

-- Placeholders are `{{name}}`; member data is always HTML-escaped by the renderer, and
-- templates are plain text (no markup): the layout of the bill is the renderer's.
insert into template (channel, name, version, subject, body, active, activated_at) values
('email', 'monthly-bill', 1, '[KT Billing] {{billing_month}} 청구서',
 E'{{member_name}} 고객님, 안녕하세요.\n\n{{billing_month}} 이용 요금을 안내해 드립니다. 이번 달 청구 금액은 {{final_amount}}입니다.\n\n항상 저희 서비스를 이용해 주셔서 감사합니다.',
 true, now()),
('sms', 'bill-summary', 1, null,
 '[Billing] {{member_name}}님 {{billing_month}} 청구금액 {{final_amount}}. 상세 내역은 이메일/앱에서 확인하세요.',
 true, now());

-- What the simulated gateways accepted, keyed by the idempotency key they were given (the
-- delivery id and channel), as a real provider's idempotent API would. Only used when a
-- processor runs with `GATEWAY_MAILBOX=postgres` (tests, demos); `resubmissions` counts
-- sends of an already accepted key, which the gateway acknowledged without delivering again.
create table gateway_mailbox (
    channel         text not null,
    idempotency_key text not null,
    address         text not null,
    accepted_at     timestamptz not null default now(),
    resubmissions   int not null default 0,
    primary key (channel, idempotency_key)
);
