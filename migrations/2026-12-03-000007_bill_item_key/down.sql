create index bill_item_bill_idx on bill_item (bill_id);
alter table bill_item drop constraint bill_item_pkey;
alter table bill_item add primary key (id);
