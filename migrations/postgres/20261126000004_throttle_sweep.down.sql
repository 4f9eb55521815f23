ALTER TABLE login_account_throttle DROP COLUMN last_failure_at;
