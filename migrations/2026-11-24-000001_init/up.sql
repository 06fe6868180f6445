-- The billing platform's tables. Money is bigint won; times are timestamptz (UTC inside,
-- rendered in BILLING_TZ). Uniqueness here is what makes duplicates impossible even if a
-- processor misbehaves: one bill per (member, month), one dispatch per bill, one successful
-- delivery per bill, one dead letter per (topic, partition, offset, stage).

create table member (
    id              bigint primary key,
    name            text not null,
    email           text not null,
    phone           text not null,
    delivery_day    smallint not null check (delivery_day between 1 and 31),
    dnd_start       time null,
    dnd_end         time null,
    plan_id         text not null,
    updated_at      timestamptz not null,
    check ((dnd_start is null) = (dnd_end is null))
);

create table bill (
    id              bigint primary key,
    member_id       bigint not null,
    billing_month   text not null check (billing_month ~ '^[0-9]{4}-(0[1-9]|1[0-2])$'),
    total_amount    bigint not null check (total_amount >= 0),
    discount_amount bigint not null check (discount_amount >= 0),
    vat_amount      bigint not null check (vat_amount >= 0),
    final_amount    bigint not null,
    settled_at      timestamptz not null,
    created_at      timestamptz not null default now(),
    unique (member_id, billing_month),
    check (final_amount = total_amount - discount_amount + vat_amount)
);
create index bill_month_idx on bill (billing_month);

create table bill_item (
    id          bigint primary key,
    bill_id     bigint not null references bill (id),
    kind        text not null check (kind in ('charge', 'discount')),
    product_id  text not null,
    description text not null,
    quantity    bigint not null,
    amount      bigint not null check (amount >= 0),
    snapshot    jsonb not null
);
create index bill_item_bill_idx on bill_item (bill_id);

-- The dispatch outbox: a row is the decision to request a bill's delivery. Its primary key
-- makes a second dispatch of the same bill impossible; published_at is set once the email
-- request is acknowledged by the broker, and rows without it are re-published (same
-- delivery id) after a crash.
create table dispatch (
    bill_id      bigint primary key references bill (id),
    delivery_id  text not null unique,
    member_id    bigint not null,
    requested_at timestamptz not null,
    published_at timestamptz null
);
create index dispatch_unpublished_idx on dispatch (requested_at) where published_at is null;

create table delivery (
    bill_id    bigint not null references bill (id),
    channel    text not null check (channel in ('email', 'sms')),
    status     text not null check (status in ('queued', 'sent', 'failed', 'dead')),
    attempts   int not null default 0,
    sent_at    timestamptz null,
    last_error text null,
    updated_at timestamptz not null default now(),
    primary key (bill_id, channel)
);
-- A bill is delivered at most once, whatever the channel.
create unique index delivery_sent_once on delivery (bill_id) where status = 'sent';

create table dead_letter (
    id               bigserial primary key,
    source_topic     text not null,
    source_partition int not null,
    source_offset    bigint not null,
    stage            text not null,
    reason           text not null,
    key              bytea null,
    payload          bytea null,
    attempts         jsonb not null default '[]',
    created_at       timestamptz not null default now(),
    replayed_at      timestamptz null,
    unique (source_topic, source_partition, source_offset, stage)
);

create table template (
    id           bigserial primary key,
    channel      text not null check (channel in ('email', 'sms')),
    name         text not null,
    version      int not null,
    subject      text null,
    body         text not null,
    active       boolean not null default false,
    created_at   timestamptz not null default now(),
    activated_at timestamptz null,
    unique (channel, name, version)
);
create unique index template_one_active on template (channel) where active;

create table dispatch_reservation (
    id            bigserial primary key,
    fire_at       timestamptz not null,
    billing_month text null,
    member_ids    bigint[] null,
    created_at    timestamptz not null default now(),
    fired_at      timestamptz null,
    check (billing_month is not null or member_ids is not null)
);

-- System quiet hours: one row, editable by operators; the window may cross midnight.
create table quiet_hours (
    id         smallint primary key default 1 check (id = 1),
    start_time time not null,
    end_time   time not null,
    time_zone  text not null default 'Asia/Seoul',
    updated_at timestamptz not null default now()
);
insert into quiet_hours (id, start_time, end_time) values (1, '21:00', '08:00');

-- Offsets a sink stores in the same transaction as the rows they produced, so a restart
-- resumes exactly where the data stopped (Kafka's committed offsets are only a hint).
create table consumer_offset (
    group_id   text not null,
    topic      text not null,
    partition  int not null,
    next_offset bigint not null,
    updated_at timestamptz not null default now(),
    primary key (group_id, topic, partition)
);
