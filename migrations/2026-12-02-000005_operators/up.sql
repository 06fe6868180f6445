-- Console accounts (`billing operator add NAME --role viewer|operator`). The password is kept
-- only as an argon2id PHC string (salted); `viewer` may look, `operator` may also act.
create table operator (
    name          text primary key check (name ~ '^[a-z0-9][a-z0-9._-]{0,62}$'),
    role          text not null check (role in ('viewer', 'operator')),
    password_hash text not null check (password_hash like '$argon2%'),
    created_at    timestamptz not null default now(),
    disabled_at   timestamptz null
);
