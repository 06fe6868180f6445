alter table dispatch_reservation drop column pass_id, drop column note;
alter table dispatch add column delivery_id text, add column published_at timestamptz;
update dispatch d set delivery_id = 'email-' || d.bill_id,
    published_at = case when p.completed_at is not null or d.bill_id <= coalesce(p.published_through, -1) then p.created_at end
    from dispatch_pass p where p.id = d.pass_id;
alter table dispatch alter column delivery_id set not null,
    add constraint dispatch_delivery_id_key unique (delivery_id),
    add constraint dispatch_bill_id_fkey foreign key (bill_id) references bill (id),
    drop column pass_id;
create index dispatch_unpublished_idx on dispatch (requested_at) where published_at is null;
drop table dispatch_pass;
