"""Envelope address rules at the edge: what SES could not deliver is refused at MAIL/RCPT.

Recipients get email-validator's syntax check (no DNS); non-ASCII local parts are refused
(SES cannot send SMTPUTF8) and IDN domains become punycode. Senders must be ASCII too and,
when smtp.allowed_sender_domains is set, in one of those domains. Pure functions, called
by relay.ingress.server.IngressHandler (and relay.ingress.sendmail), which turns each
AddressError kind into a reply of relay.ingress.replies.
"""

from __future__ import annotations

import functools

import email_validator

NON_ASCII = "non_ascii"  #: 553 5.6.7
SYNTAX = "syntax"  #: 553 5.1.3 (recipient) / 553 5.1.7 (sender)
DOMAIN = "domain"  #: 553 5.7.1: sender domain not allowed


class AddressError(ValueError):
    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def _validate(address: str, *, test_environment: bool) -> str:
    result = _checked(address, test_environment)
    if isinstance(result, AddressError):
        raise AddressError(result.kind, result.reason)
    return result


@functools.lru_cache(maxsize=4096)
def _checked(address: str, test_environment: bool) -> str | AddressError:
    """The outcome for one address, remembered: senders and recipients repeat a lot, and
    email-validator costs about 0.1 ms per call."""
    try:
        return _check(address, test_environment=test_environment)
    except AddressError as exc:
        return exc


def _check(address: str, *, test_environment: bool) -> str:
    local, at, _ = address.rpartition("@")
    if not at or not local:
        raise AddressError(SYNTAX, "address must be local-part@domain")
    if not local.isascii():
        raise AddressError(NON_ASCII, "non-ASCII local part: SES cannot deliver it")
    try:
        valid = email_validator.validate_email(
            address, check_deliverability=False, allow_smtputf8=False,
            test_environment=test_environment,
        )
    except email_validator.EmailNotValidError as exc:
        raise AddressError(SYNTAX, str(exc)) from None
    # the local part as written (case kept), the domain as punycode
    return f"{local}@{valid.ascii_domain}"


def recipient(address: str) -> str:
    """The address as it will be given to SES (IDN domain as punycode), or AddressError."""
    return _validate(address, test_environment=False)


def sender(address: str, *, allowed_domains: tuple[str, ...] = ()) -> str:
    """The sender as it will be given to SES, or AddressError.

    An allowed domain "example.com" admits exactly that domain; ".example.com" admits
    its subdomains as well.
    """
    addr = _validate(address, test_environment=True)
    if allowed_domains and not domain_allowed(addr.rpartition("@")[2], allowed_domains):
        raise AddressError(DOMAIN, "sender domain not allowed on this relay")
    return addr


def domain_allowed(domain: str, allowed: tuple[str, ...]) -> bool:
    domain = domain.lower().rstrip(".")
    for entry in allowed:
        entry = entry.lower()
        if entry.startswith("."):
            if domain == entry[1:] or domain.endswith(entry):
                return True
        elif domain == entry:
            return True
    return False
