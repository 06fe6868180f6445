alter table delivery add constraint delivery_bill_id_fkey foreign key (bill_id) references bill (id);
