drop table gateway_mailbox;
delete from template where (channel, name, version) in (('email', 'monthly-bill', 1), ('sms', 'bill-summary', 1));
alter table delivery drop column template_version;
