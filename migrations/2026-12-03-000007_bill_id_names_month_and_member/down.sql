alter table bill
    drop constraint bill_id_names_month_and_member,
    drop constraint bill_member_id_range;
