DROP TABLE login_address_throttle;
DROP TABLE login_account_throttle;
