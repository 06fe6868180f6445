-- Claims: before a channel calls its provider it claims the bill's delivery on that channel
-- (`sending`, with an owner and a lease), so no rebalance, replay, duplicate request or
-- second instance makes two processes send the same bill. The outcome is written as soon as
-- the provider answers, with the hand-over it implies (`retry`: the next attempt is to be
-- published; `give-up`: the next channel or the dead-letter queue), before that hand-over is
-- published, so a redo after a crash republishes it instead of forking or losing it.
-- `unknown`: a claim whose process died before the provider's answer was recorded, held for
-- an operator by a provider without idempotency keys (docs/architecture.md).
alter table delivery drop constraint delivery_status_check;
alter table delivery add constraint delivery_status_check
    check (status in ('queued', 'sending', 'sent', 'failed', 'dead', 'unknown'));
alter table delivery
    add column claim_owner text null,
    add column claim_until timestamptz null,
    add column handover    text null check (handover in ('retry', 'give-up')),
    -- The request record (topic/partition/offset) whose attempt recorded this outcome: only a
    -- redo of that very record republishes the hand-over; another copy of the same attempt
    -- (a duplicated request) is behind the delivery and does nothing.
    add column handover_source text null;
