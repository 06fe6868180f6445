alter table delivery drop column handover_source, drop column handover, drop column claim_until, drop column claim_owner;
update delivery set status = 'failed' where status in ('sending', 'unknown');
alter table delivery drop constraint delivery_status_check;
alter table delivery add constraint delivery_status_check
    check (status in ('queued', 'sent', 'failed', 'dead'));
