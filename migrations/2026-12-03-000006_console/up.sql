-- Console sessions: the cookie carries a random token; only its SHA-256 is stored, so a copy
-- of this table opens no session. Each session has its own CSRF token for forms.
create table console_session (
    token_sha256 text primary key,
    operator     text not null references operator (name),
    role         text not null check (role in ('viewer', 'operator')),
    csrf         text not null,
    created_at   timestamptz not null default now(),
    expires_at   timestamptz not null
);
create index console_session_expiry_idx on console_session (expires_at);

-- Every operator action (console or CLI): who, what, when, and how it ended.
create table audit (
    id       bigserial primary key,
    at       timestamptz not null default now(),
    operator text not null,
    action   text not null,
    detail   text not null,
    result   text not null
);
create index audit_at_idx on audit (at desc);
