-- When an account key last failed, so that rows untouched for a day (most
-- of them unknown names someone tried) can be swept, and a day without
-- failures forgives old ones. Rows from before count as failing now.
ALTER TABLE login_account_throttle ADD COLUMN last_failure_at INTEGER NOT NULL DEFAULT 0;
UPDATE login_account_throttle SET last_failure_at = CAST(strftime('%s', 'now') AS INTEGER) * 1000000;
