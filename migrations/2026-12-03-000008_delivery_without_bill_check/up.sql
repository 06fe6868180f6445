-- A delivery's bill is not checked by a foreign key. Deliveries are only created by a
-- channel's claim, and a channel claims a bill only after loading it (a request for an unknown
-- bill is a dead letter, "bill not found"); bills are never deleted. The check cost more than
-- its insert: its trigger probed `bill` and locked the bill's row (`for key share`) on every
-- claim, a write to a million bill rows per month that vacuum then has to clean up.
-- `scripts/bench-messaging`, 1,000,000 bills, alternated on one stack: 74.59 s and 92.69 s
-- without the check (PostgreSQL 61.8-62.0 core-s) against 85.73 s and 126.66 s with it
-- (66.0 and 150.8 core-s).
alter table delivery drop constraint delivery_bill_id_fkey;
