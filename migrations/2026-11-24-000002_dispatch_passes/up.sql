-- Dispatch passes: the outbox is published pass by pass, in bill-id order, and the broker's
-- acknowledgement is recorded as a cursor on the pass (`published_through`, the highest bill
-- id acknowledged) instead of a mark on each row. A million-row pass used to spend 15 s
-- updating `published_at` row by row; the cursor is one update per chunk. A pass whose
-- `completed_at` is null still has rows to publish: the next pass publishes them first.
create table dispatch_pass (
    id                bigserial primary key,
    -- the pass's clock (the injected `now`), not the wall clock
    run_at            timestamptz not null,
    trigger           text not null check (trigger in ('schedule', 'operator', 'reservation', 'migration')),
    selected          bigint not null default 0,
    held              bigint not null default 0,
    published_through bigint null,
    completed_at      timestamptz null,
    created_at        timestamptz not null default now()
);
create index dispatch_pass_open_idx on dispatch_pass (id) where completed_at is null;

alter table dispatch add column pass_id bigint;
-- Rows from before passes: the published ones into a completed pass, the rest into an open one
-- that the next pass publishes.
with p as (insert into dispatch_pass (run_at, trigger, completed_at)
           select now(), 'migration', now() where exists (select 1 from dispatch where published_at is not null)
           returning id)
update dispatch set pass_id = (select id from p) where published_at is not null;
with p as (insert into dispatch_pass (run_at, trigger)
           select now(), 'migration' where exists (select 1 from dispatch where published_at is null)
           returning id)
update dispatch set pass_id = (select id from p) where published_at is null;
-- No foreign key to dispatch_pass: rows take the id of the pass inserted in the same
-- transaction, and the check cost 4.8 s per million rows.
alter table dispatch alter column pass_id set not null;

-- The delivery id is `email-<bill id>`, derived where it is published; a stored copy with its
-- own unique index cost a third of the insert. The foreign key to `bill` goes too: rows are
-- only ever inserted by selecting from `bill`, and bills are never deleted, while the check
-- cost 10 s per million rows.
alter table dispatch drop column delivery_id,
    drop column published_at,
    drop constraint dispatch_bill_id_fkey;

-- Reservations: which pass fired each one.
alter table dispatch_reservation add column pass_id bigint null references dispatch_pass (id),
    add column note text null;
