"""What the ingress repairs or refuses in a message's bytes before they are spooled.

Line endings, Postfix-style "normalize": a bare LF becomes CRLF; a bare CR (one not
before an LF) and a NUL byte are refused with 550 5.5.2, so a lone CR or LF is never
forwarded. A line over 998 octets (RFC 5321 4.5.3.1.6) is refused with 550 5.5.2. The
header must hold exactly one From field (550 5.6.0), and each of its addresses must pass
the sender rules: smtp.allowed_sender_domains and an authenticated user's senders
(550 5.7.1). Pure functions on bytes; called by relay.ingress.server and relay.ingress.sendmail.
"""

from __future__ import annotations

import email.utils
import functools

from relay.ingress import addresses, headers
from relay.ingress.credentials import User
from relay.ingress.replies import Reply

#: RFC 5321 4.5.3.1.6: a text line holds at most 998 octets before its CRLF
MAX_LINE = 998
#: a From field longer than this is not parsed (it never holds more than a few addresses)
MAX_FROM = 4096

BARE_CR = Reply(550, "5.5.2", "Message refused: bare CR (a CR not followed by LF)")
NUL = Reply(550, "5.5.2", "Message refused: NUL character in the content")
LONG_LINE = Reply(550, "5.5.2",
                  f"Message refused: a line is longer than {MAX_LINE} octets (RFC 5321)")
NO_FROM = Reply(550, "5.6.0", "Message refused: no From header")
TWO_FROM = Reply(550, "5.6.0", "Message refused: more than one From header")
BAD_FROM = Reply(550, "5.6.0", "Message refused: the From header holds no valid address")
FROM_NOT_ALLOWED = Reply(550, "5.7.1", "Header From address not allowed on this relay")


def line_endings(data: bytes) -> tuple[bytes, Reply | None]:
    """The message with every line ending CRLF, or the reply refusing it (NUL, bare CR)."""
    if b"\0" in data:
        return data, NUL
    crlf = data.count(b"\r\n")
    if data.count(b"\r") != crlf:
        return data, BARE_CR
    if data.count(b"\n") != crlf:
        # every CR is before an LF: make each LF a CRLF
        data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return data, None


def long_line(data: bytes) -> bool:
    """A line (CRLF line endings) longer than MAX_LINE octets."""
    return len(data) > MAX_LINE and max(map(len, data.split(b"\r\n"))) > MAX_LINE


def from_addresses(parts: headers.Split) -> tuple[list[str], Reply | None]:
    """The addresses of the one From field, or the reply refusing the message."""
    found = [f for f, n in zip(parts.fields, parts.names(), strict=True) if n == b"from"]
    if not found:
        return [], NO_FROM
    if len(found) > 1:
        return [], TWO_FROM
    field = found[0]
    if len(field) > MAX_FROM:
        return [], BAD_FROM
    mailboxes = list(_mailboxes(field.partition(b":")[2].decode("ascii", "replace")))
    if not mailboxes or any("@" not in a for a in mailboxes):
        return [], BAD_FROM
    return mailboxes, None


@functools.lru_cache(maxsize=1024)
def _mailboxes(value: str) -> tuple[str, ...]:
    """The addresses in a From field's value (email's parser, about 6 us), remembered: an
    application sends from the same few addresses."""
    return tuple(a for _, a in email.utils.getaddresses([value]) if a)


def sender_reply(address: str, *, allowed_domains: tuple[str, ...],
                 user: User | None) -> Reply | None:
    """None when a header From address passes the sender rules, else the refusal."""
    if not allowed_domains and (user is None or not user.senders):
        return None  # no rule to break
    try:
        address = addresses.sender(address, allowed_domains=allowed_domains)
    except addresses.AddressError as exc:
        if exc.kind == addresses.DOMAIN:
            return FROM_NOT_ALLOWED.with_detail(address)
        return BAD_FROM
    if user is not None and not user.may_send_as(address):
        return FROM_NOT_ALLOWED.with_detail(address)
    return None


def inspect(data: bytes, *, allowed_domains: tuple[str, ...],
            user: User | None) -> tuple[bytes, Reply | None]:
    """The message as it may be spooled (CRLF line endings), or the reply refusing it."""
    data, _, refusal = check(data, allowed_domains=allowed_domains, user=user)
    return data, refusal


def check(data: bytes, *, allowed_domains: tuple[str, ...],
          user: User | None) -> tuple[bytes, headers.Split | None, Reply | None]:
    """inspect(), with the header split of the message it returns (None when refused
    before the header was looked at), for the rest of the work on it."""
    data, refusal = line_endings(data)
    if refusal is None and long_line(data):
        refusal = LONG_LINE
    if refusal is not None:
        return data, None, refusal
    parts = headers.split(data)
    mailboxes, refusal = from_addresses(parts)
    for address in mailboxes:
        refusal = refusal or sender_reply(address, allowed_domains=allowed_domains, user=user)
    return data, parts, refusal
