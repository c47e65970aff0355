"""SPIFFE IDs (the SPIFFE-ID standard, section 2), and the patterns policies match them with.

    spiffe://<trust domain>[/<segment>]*

Rules enforced, as the standard states them and go-spiffe enforces them:
- the scheme is exactly `spiffe` (lowercase) followed by `://`;
- the trust domain is non-empty, at most 255 bytes, of lowercase letters, digits, `.`, `-` and
  `_` only (so no port, no userinfo, no uppercase);
- the path is empty or `/`-separated non-empty segments of letters, digits, `.`, `-`, `_`; no
  `.` or `..` segment, no trailing `/`, no percent-encoding, no query or fragment;
- the whole ID is at most 2048 bytes.
An ID that breaks a rule is refused (never "fixed"), with the rule in the message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SCHEME_PREFIX = "spiffe://"
MAX_ID_BYTES = 2048
MAX_TRUST_DOMAIN_BYTES = 255
_TRUST_DOMAIN_CHARS = re.compile(r"[a-z0-9._-]+")
_SEGMENT_CHARS = re.compile(r"[A-Za-z0-9._-]+")


class SpiffeIdError(ValueError):
    """Not a valid SPIFFE ID; the message names the rule that was broken."""


def parse_trust_domain(name: str) -> str:
    if not name:
        raise SpiffeIdError("the trust domain is empty")
    if len(name.encode()) > MAX_TRUST_DOMAIN_BYTES:
        raise SpiffeIdError(f"the trust domain is longer than {MAX_TRUST_DOMAIN_BYTES} bytes")
    if not _TRUST_DOMAIN_CHARS.fullmatch(name):
        if name.lower() != name and _TRUST_DOMAIN_CHARS.fullmatch(name.lower()):
            raise SpiffeIdError(f"the trust domain {name!r} must be lowercase")
        raise SpiffeIdError(
            f"the trust domain {name!r} may only contain lowercase letters, digits, '.', '-' "
            "and '_' (no port, no user info)"
        )
    return name


@dataclass(frozen=True, order=True)
class SpiffeId:
    trust_domain: str
    path: str = ""

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        if not isinstance(text, str) or not text:
            raise SpiffeIdError("a SPIFFE ID is required")
        if len(text.encode()) > MAX_ID_BYTES:
            raise SpiffeIdError(f"a SPIFFE ID is at most {MAX_ID_BYTES} bytes")
        if not text.startswith(SCHEME_PREFIX):
            if text.lower().startswith(SCHEME_PREFIX):
                raise SpiffeIdError("the scheme must be lowercase 'spiffe'")
            raise SpiffeIdError(f"{text!r} does not start with 'spiffe://'")
        rest = text[len(SCHEME_PREFIX) :]
        if "?" in rest or "#" in rest:
            raise SpiffeIdError("a SPIFFE ID has no query or fragment")
        if "%" in rest:
            raise SpiffeIdError("a SPIFFE ID has no percent-encoded characters")
        domain, slash, path = rest.partition("/")
        parse_trust_domain(domain)
        path = slash + path
        check_path(path)
        return cls(domain, path)

    @classmethod
    def of(cls, trust_domain: str, *segments: str) -> SpiffeId:
        path = "".join(f"/{s}" for s in segments)
        check_path(path)
        return cls(parse_trust_domain(trust_domain), path)

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.path.split("/")[1:]) if self.path else ()

    def member_of(self, trust_domain: str) -> bool:
        return self.trust_domain == trust_domain

    def __str__(self) -> str:
        return f"{SCHEME_PREFIX}{self.trust_domain}{self.path}"


def check_path(path: str) -> None:
    if not path:
        return
    if not path.startswith("/"):
        raise SpiffeIdError("the path must start with '/'")
    if path.endswith("/"):
        raise SpiffeIdError("the path must not end with '/'")
    for segment in path.split("/")[1:]:
        if not segment:
            raise SpiffeIdError("the path has an empty segment ('//')")
        if segment in (".", ".."):
            raise SpiffeIdError(f"the path segment {segment!r} is not allowed")
        if not _SEGMENT_CHARS.fullmatch(segment):
            raise SpiffeIdError(
                f"the path segment {segment!r} may only contain letters, digits, '.', '-' and '_'"
            )


@dataclass(frozen=True)
class SpiffeIdPattern:
    """`spiffe://td/agents/*` (one segment), `spiffe://td/agents/**` (any number, even none),
    `spiffe://td/**` (the whole trust domain), or an exact ID. `*` may only stand for whole
    segments, and the trust domain is always literal: a pattern never spans trust domains."""

    trust_domain: str
    segments: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> SpiffeIdPattern:
        if not text.startswith(SCHEME_PREFIX):
            raise SpiffeIdError(f"pattern {text!r} does not start with 'spiffe://'")
        domain, _, path = text[len(SCHEME_PREFIX) :].partition("/")
        parse_trust_domain(domain)
        segments = tuple(path.split("/")) if path else ()
        for i, segment in enumerate(segments):
            if segment == "**":
                if i != len(segments) - 1:
                    raise SpiffeIdError(f"in pattern {text!r}, '**' must be the last segment")
            elif segment != "*":
                check_path("/" + segment)
        return cls(domain, segments)

    def matches(self, spiffe_id: SpiffeId) -> bool:
        if spiffe_id.trust_domain != self.trust_domain:
            return False
        actual = spiffe_id.segments
        for i, want in enumerate(self.segments):
            if want == "**":
                return True
            if i >= len(actual) or (want != "*" and want != actual[i]):
                return False
        return len(actual) == len(self.segments)

    def __str__(self) -> str:
        path = "".join(f"/{s}" for s in self.segments)
        return f"{SCHEME_PREFIX}{self.trust_domain}{path}"
