"""Delivery: the ports to SES and the store, the scheduler, the account watch, one attempt per
message and its outcomes, the pool, the rate limiter, the retry policy and DSNs. No transport."""
