"""Every SMTP reply the ingress sends of its own, as typed values.

A Reply is a code, an enhanced status (RFC 3463; empty where aiosmtpd's own wording is kept)
and a text; its wire line is built once. REWRITES gives some of aiosmtpd's own reply lines an
enhanced status; NOT_ERRORS lists the replies that do not count against smtp.max_errors.
Pure values; used by relay.ingress.server, relay.ingress.session and relay.ingress.auth.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Reply:
    """An SMTP reply: code, enhanced status and text."""

    code: int
    status: str
    text: str
    #: the reply line without its CRLF, built once: replies go out on every command
    line: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        parts = (str(self.code), self.status, self.text) if self.status else (
            str(self.code), self.text)
        object.__setattr__(self, "line", " ".join(parts))

    def __str__(self) -> str:
        return self.line

    def with_detail(self, detail: str) -> Reply:
        """The same reply with `: detail` after its text, the text cut at 200 characters."""
        return Reply(self.code, self.status, f"{self.text}: {detail}"[:200])


# -- access and session --------------------------------------------------------------

ACCESS_DENIED = Reply(554, "5.7.1", "Access denied: relaying not permitted from your address")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
STARTTLS_FIRST = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
CONNECTION_RATE = Reply(421, "4.7.0", "Too many connections from your address, try again later")
TOO_MANY_JUNK = Reply(421, "4.7.0", "Too many commands without mail, closing connection")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
TIMEOUT = Reply(421, "4.4.2", "Timeout exceeded, closing connection")

# -- MAIL and RCPT -------------------------------------------------------------------

OK = Reply(250, "2.1.0", "Ok")
RCPT_OK = Reply(250, "2.1.5", "Ok")
TOO_MANY_RCPTS = Reply(452, "4.5.3", "Too many recipients")
BAD_ADDRESS = Reply(553, "5.1.3", "Bad recipient address syntax")
BAD_SENDER = Reply(553, "5.1.7", "Bad sender address syntax")
NON_ASCII_ADDRESS = Reply(553, "5.6.7", "Non-ASCII addresses not supported (no SMTPUTF8)")
SENDER_NOT_ALLOWED = Reply(553, "5.7.1", "Sender address not allowed on this relay")
NO_SMTPUTF8 = Reply(555, "5.6.7", "SMTPUTF8 not supported")
SUPPRESSED = Reply(550, "5.1.1", "Recipient address is on the suppression list")

# -- DATA (aiosmtpd's wording kept where the relay reads the upload itself) ---------------

NO_RCPTS = Reply(503, "5.5.1", "Error: need RCPT command")
#: the session's own DATA check, worded (without enhanced status) as aiosmtpd words it
NEED_RCPT = Reply(503, "", "Error: need RCPT command")
DATA_SYNTAX = Reply(501, "", "Syntax: DATA")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
LINE_TOO_LONG = Reply(500, "", "Line too long (see RFC5321 4.5.3.1.6)")
TOO_BIG = Reply(552, "5.3.4", "Message too big for system")
DATA_OK = Reply(250, "", "OK")
SPOOL_FULL = Reply(452, "4.3.1", "Insufficient system storage, try again later")
SPOOL_ERROR = Reply(451, "4.3.0", "Local error in processing, try again later")
#: what every queued-as reply starts with (a success clears the error count)
QUEUED_PREFIX = "250 2.0.0"


def queued_as(qid: str) -> Reply:
    """250 once the message is durable, with its queue id."""
    return Reply(250, "2.0.0", f"Ok: queued as {qid}")


# -- AUTH ----------------------------------------------------------------------------

AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_LOCKED = Reply(454, "4.7.0", "Too many failed authentication attempts, try again later")
BAD_BASE64 = Reply(501, "5.5.2", "Cannot decode base64")

#: aiosmtpd's own reply lines, given enhanced status codes
REWRITES = {
    "552 Error: Too much mail data": TOO_BIG.line,
    "552 Error: message size exceeds fixed maximum message size": TOO_BIG.line,
    "530 Must issue a STARTTLS command first": STARTTLS_FIRST.line,
}
#: reply line prefixes that do not count against smtp.max_errors: a 421 ends the session
#: anyway, and too many recipients is the client's cue to send the rest in another message
NOT_ERRORS = ("421", f"{TOO_MANY_RCPTS.code} {TOO_MANY_RCPTS.status}")
