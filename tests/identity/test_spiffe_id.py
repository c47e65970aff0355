"""The SPIFFE ID rules (SPIFFE-ID standard, section 2) and policy patterns."""

from __future__ import annotations

import pytest

from identity.spiffe_id import SpiffeId, SpiffeIdError, SpiffeIdPattern, parse_trust_domain


@pytest.mark.parametrize(
    ("text", "trust_domain", "path"),
    [
        ("spiffe://example.org", "example.org", ""),
        ("spiffe://example.org/ns/prod/sa/web", "example.org", "/ns/prod/sa/web"),
        ("spiffe://a_b-c.1/x", "a_b-c.1", "/x"),
        ("spiffe://192.168.0.1/x", "192.168.0.1", "/x"),
        # The path is case-sensitive and may hold uppercase letters; so may segments with dots.
        ("spiffe://example.org/Agents/v1.2/..x", "example.org", "/Agents/v1.2/..x"),
    ],
)
def test_valid_ids(text: str, trust_domain: str, path: str) -> None:
    parsed = SpiffeId.parse(text)
    assert (parsed.trust_domain, parsed.path) == (trust_domain, path)
    assert str(parsed) == text


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "required"),
        ("example.org/x", "does not start with 'spiffe://'"),
        ("https://example.org/x", "does not start with 'spiffe://'"),
        ("SPIFFE://example.org/x", "scheme must be lowercase"),
        ("Spiffe://example.org", "scheme must be lowercase"),
        ("spiffe://Example.org/x", "must be lowercase"),
        ("spiffe://example.org:8443/x", "no port"),
        ("spiffe://user@example.org/x", "no user info"),
        ("spiffe:///x", "trust domain is empty"),
        ("spiffe://", "trust domain is empty"),
        ("spiffe://[::1]/x", "may only contain"),
        ("spiffe://example.org/", "must not end with '/'"),
        ("spiffe://example.org/a/", "must not end with '/'"),
        ("spiffe://example.org//a", "empty segment"),
        ("spiffe://example.org/a//b", "empty segment"),
        ("spiffe://example.org/./a", "'.' is not allowed"),
        ("spiffe://example.org/a/..", "'..' is not allowed"),
        ("spiffe://example.org/a%20b", "percent-encoded"),
        ("spiffe://ex%41mple.org/a", "percent-encoded"),
        ("spiffe://example.org/a?x=1", "no query or fragment"),
        ("spiffe://example.org/a#frag", "no query or fragment"),
        ("spiffe://example.org/a b", "may only contain"),
        ("spiffe://example.org/café", "may only contain"),
        ("spiffe://example.org/a*", "may only contain"),
    ],
)
def test_invalid_ids(text: str, reason: str) -> None:
    with pytest.raises(SpiffeIdError, match=reason.replace("?", r"\?").replace("*", r"\*")):
        SpiffeId.parse(text)


def test_length_limits() -> None:
    prefix = "spiffe://example.org/"
    longest = prefix + "a" * (2048 - len(prefix))
    assert str(SpiffeId.parse(longest)) == longest
    with pytest.raises(SpiffeIdError, match="at most 2048 bytes"):
        SpiffeId.parse(longest + "a")
    # Non-ASCII counts in bytes (and is refused anyway).
    with pytest.raises(SpiffeIdError, match="2048 bytes"):
        SpiffeId.parse(prefix + "é" * 1020)

    domain = "a" * 255
    assert parse_trust_domain(domain) == domain
    assert SpiffeId.parse(f"spiffe://{domain}/x").trust_domain == domain
    with pytest.raises(SpiffeIdError, match="longer than 255 bytes"):
        SpiffeId.parse(f"spiffe://{domain}a/x")


def test_not_a_string() -> None:
    with pytest.raises(SpiffeIdError):
        SpiffeId.parse(None)  # type: ignore[arg-type]


def test_of_builds_and_checks() -> None:
    assert str(SpiffeId.of("example.org", "agents", "a1")) == "spiffe://example.org/agents/a1"
    assert SpiffeId.of("example.org").segments == ()
    with pytest.raises(SpiffeIdError, match="'..' is not allowed"):
        SpiffeId.of("example.org", "a", "..")
    with pytest.raises(SpiffeIdError, match="empty segment"):
        SpiffeId.of("example.org", "", "a")
    with pytest.raises(SpiffeIdError):
        SpiffeId.of("Example.org", "a")


def test_segments_and_membership() -> None:
    sid = SpiffeId.parse("spiffe://example.org/agents/a1")
    assert sid.segments == ("agents", "a1")
    assert sid.member_of("example.org")
    assert not sid.member_of("example.com")
    assert sid == SpiffeId.parse("spiffe://example.org/agents/a1")


@pytest.mark.parametrize(
    ("pattern", "ids", "expected"),
    [
        (
            "spiffe://example.org/agents/*",
            ["agents/a1", "agents", "agents/a1/b", "other/a1", ""],
            [True, False, False, False, False],
        ),
        (
            "spiffe://example.org/agents/**",
            ["agents/a1", "agents", "agents/a1/b", "agentsx/a1", ""],
            [True, True, True, False, False],
        ),
        ("spiffe://example.org/**", ["", "a", "a/b/c"], [True, True, True]),
        (
            "spiffe://example.org/agents/a1",
            ["agents/a1", "agents/a2", "agents/a1/x"],
            [True, False, False],
        ),
        ("spiffe://example.org/*/a1", ["x/a1", "y/a1", "x/a2", "a1"], [True, True, False, False]),
        ("spiffe://example.org", ["", "a"], [True, False]),
    ],
)
def test_pattern_matching(pattern: str, ids: list[str], expected: list[bool]) -> None:
    compiled = SpiffeIdPattern.parse(pattern)
    for path, want in zip(ids, expected, strict=True):
        text = "spiffe://example.org" + (f"/{path}" if path else "")
        assert compiled.matches(SpiffeId.parse(text)) is want, (pattern, text)
    assert str(compiled) == pattern


@pytest.mark.parametrize(
    "pattern",
    ["spiffe://example.org/**", "spiffe://example.org/a/*", "spiffe://example.org/a"],
)
def test_pattern_never_matches_another_trust_domain(pattern: str) -> None:
    compiled = SpiffeIdPattern.parse(pattern)
    for other in ("spiffe://example.com/a/x", "spiffe://evil.example.org/a", "spiffe://a/x"):
        assert not compiled.matches(SpiffeId.parse(other))


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("example.org/*", "does not start with"),
        ("spiffe://*/a", "may only contain"),
        ("spiffe://Example.org/a", "must be lowercase"),
        ("spiffe://example.org/**/a", "must be the last segment"),
        ("spiffe://example.org/a*", "may only contain"),
        ("spiffe://example.org/a/", "must not end with '/'"),
        ("spiffe://example.org/../a", "'..' is not allowed"),
    ],
)
def test_invalid_patterns(pattern: str, reason: str) -> None:
    with pytest.raises(SpiffeIdError, match=reason.replace("*", r"\*")):
        SpiffeIdPattern.parse(pattern)
