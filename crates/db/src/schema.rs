//! Diesel table declarations, kept in step with `migrations/` by hand (and checked by the
//! integration tests, which run the migrations and then query through these).

diesel::table! {
    member (id) {
        id -> Int8,
        name -> Text,
        email -> Text,
        phone -> Text,
        delivery_day -> Int2,
        dnd_start -> Nullable<Time>,
        dnd_end -> Nullable<Time>,
        plan_id -> Text,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    bill (id) {
        id -> Int8,
        member_id -> Int8,
        billing_month -> Text,
        total_amount -> Int8,
        discount_amount -> Int8,
        vat_amount -> Int8,
        final_amount -> Int8,
        settled_at -> Timestamptz,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    bill_item (id) {
        id -> Int8,
        bill_id -> Int8,
        kind -> Text,
        product_id -> Text,
        description -> Text,
        quantity -> Int8,
        amount -> Int8,
        snapshot -> Jsonb,
    }
}

diesel::table! {
    dispatch (bill_id) {
        bill_id -> Int8,
        member_id -> Int8,
        requested_at -> Timestamptz,
        pass_id -> Int8,
    }
}

diesel::table! {
    dispatch_pass (id) {
        id -> Int8,
        run_at -> Timestamptz,
        trigger -> Text,
        selected -> Int8,
        held -> Int8,
        published_through -> Nullable<Int8>,
        completed_at -> Nullable<Timestamptz>,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    delivery (bill_id, channel) {
        bill_id -> Int8,
        channel -> Text,
        status -> Text,
        attempts -> Int4,
        sent_at -> Nullable<Timestamptz>,
        last_error -> Nullable<Text>,
        updated_at -> Timestamptz,
        template_version -> Nullable<Int4>,
        claim_owner -> Nullable<Text>,
        claim_until -> Nullable<Timestamptz>,
        handover -> Nullable<Text>,
        handover_source -> Nullable<Text>,
    }
}

diesel::table! {
    dead_letter (id) {
        id -> Int8,
        source_topic -> Text,
        source_partition -> Int4,
        source_offset -> Int8,
        stage -> Text,
        reason -> Text,
        key -> Nullable<Bytea>,
        payload -> Nullable<Bytea>,
        attempts -> Jsonb,
        created_at -> Timestamptz,
        replayed_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    template (id) {
        id -> Int8,
        channel -> Text,
        name -> Text,
        version -> Int4,
        subject -> Nullable<Text>,
        body -> Text,
        active -> Bool,
        created_at -> Timestamptz,
        activated_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    dispatch_reservation (id) {
        id -> Int8,
        fire_at -> Timestamptz,
        billing_month -> Nullable<Text>,
        member_ids -> Nullable<Array<Int8>>,
        created_at -> Timestamptz,
        fired_at -> Nullable<Timestamptz>,
        pass_id -> Nullable<Int8>,
        note -> Nullable<Text>,
    }
}

diesel::table! {
    quiet_hours (id) {
        id -> Int2,
        start_time -> Time,
        end_time -> Time,
        time_zone -> Text,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    consumer_offset (group_id, topic, partition) {
        group_id -> Text,
        topic -> Text,
        partition -> Int4,
        next_offset -> Int8,
        updated_at -> Timestamptz,
    }
}

diesel::joinable!(bill_item -> bill (bill_id));
diesel::joinable!(delivery -> bill (bill_id));
diesel::table! {
    gateway_mailbox (channel, idempotency_key) {
        channel -> Text,
        idempotency_key -> Text,
        address -> Text,
        accepted_at -> Timestamptz,
        resubmissions -> Int4,
    }
}

diesel::joinable!(dispatch -> dispatch_pass (pass_id));
diesel::allow_tables_to_appear_in_same_query!(
    member,
    bill,
    bill_item,
    dispatch,
    dispatch_pass,
    gateway_mailbox,
    delivery,
    dead_letter,
    template,
    dispatch_reservation,
    quiet_hours,
    consumer_offset,
);

// Session-local staging tables of the bill sink (`create temp table ... (like ...)`): a batch
// is COPYed into them, then moved into the real tables with `on conflict do nothing`.
diesel::table! {
    bill_stage (id) {
        id -> Int8,
        member_id -> Int8,
        billing_month -> Text,
        total_amount -> Int8,
        discount_amount -> Int8,
        vat_amount -> Int8,
        final_amount -> Int8,
        settled_at -> Timestamptz,
    }
}

diesel::table! {
    member_stage (id) {
        id -> Int8,
        name -> Text,
        email -> Text,
        phone -> Text,
        delivery_day -> Int2,
        dnd_start -> Nullable<Time>,
        dnd_end -> Nullable<Time>,
        plan_id -> Text,
        updated_at -> Timestamptz,
    }
}
