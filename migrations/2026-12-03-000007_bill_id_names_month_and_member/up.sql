-- A bill's id is its month and its member: yyyymm * 10^10 + member id (the sink has always
-- derived it so, `billing_domain::rules::bill_id`). Declared here so the database holds it
-- too: dispatch selects a month's bills in ranges of member ids as ranges of bill ids, and a
-- bill whose id broke the rule would fall outside every range and never be dispatched.
-- Two expressions per inserted row; no index, no trigger.
alter table bill
    add constraint bill_member_id_range check (member_id between 1 and 9999999999),
    add constraint bill_id_names_month_and_member
        check (id = replace(billing_month, '-', '')::bigint * 10000000000 + member_id);
