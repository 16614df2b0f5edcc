"""relay: a durable SMTP relay for Amazon SES.

Applications speak SMTP to the relay; it spools each message to disk before answering
250 and forwards the raw MIME through SESv2 SendEmail at the account's send rate.
"""

__version__ = "0.1.0"
