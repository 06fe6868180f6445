drop table audit;
drop table console_session;
