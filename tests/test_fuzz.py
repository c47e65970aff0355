"""Property-based fuzzing (hypothesis) of everything that reads untrusted input: config and
policy files, SPIFFE IDs, bearer tokens, and the MCP and A2A endpoints of a running gateway.

The properties: bad input gets the error meant for it (ConfigError, SpiffeIdError,
AuthenticationError; an HTTP 4xx or a JSON-RPC error), never another exception, a 5xx, a hang
or a dead gateway. The example counts are kept small for CI; `DURAGATE_FUZZ_EXAMPLES=N` runs
more.
"""

from __future__ import annotations

import json
import os
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config import ConfigError, parse_config
from identity.authenticate import AuthenticationError, Authenticator
from identity.spiffe_id import SpiffeId, SpiffeIdError, SpiffeIdPattern
from policies.loader import parse_policy
from tests.gateway.conftest import INIT, MCP_HEADERS, TEST_CONFIG, GatewayFactory, GatewayProcess

EXAMPLES = int(os.environ.get("DURAGATE_FUZZ_EXAMPLES", "40"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=True,  # the same examples every run: a failure in CI reproduces locally
)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


# --- files --------------------------------------------------------------------------------

CONFIG_KEYS = [
    "listen",
    "engine",
    "identity",
    "policy",
    "limits",
    "a2a",
    "tools",
    "data_dir",
    "nope",
]


@st.composite
def config_documents(draw: st.DrawFn) -> str:
    """Mostly well-formed YAML mappings with the config's own keys and random values, plus
    some raw text."""
    if draw(st.booleans()):
        return draw(st.text(max_size=200))
    keys = draw(st.lists(st.sampled_from(CONFIG_KEYS), max_size=4, unique=True))
    document = {key: draw(json_values) for key in keys}
    if draw(st.booleans()):
        document["tools"] = [
            {
                "name": draw(st.text(max_size=6)),
                "kind": "python",
                "target": draw(st.text(max_size=20)),
            }
        ]
    return yaml.safe_dump(document)


@FUZZ
@given(config_documents())
def test_config_files_load_or_say_why(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    base = tmp_path_factory.getbasetemp()
    try:
        parse_config(text, "fuzz.yaml", base)
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.yaml"), str(exc)


POLICY_KEYS = ["tenant", "members", "groups", "tools", "nope"]


@st.composite
def policy_documents(draw: st.DrawFn) -> str:
    if draw(st.booleans()):
        return draw(st.text(max_size=200))
    document: dict[str, Any] = {
        key: draw(json_values)
        for key in draw(st.lists(st.sampled_from(POLICY_KEYS), max_size=4, unique=True))
    }
    if draw(st.booleans()):
        document["tenant"] = "fuzz"
        document["tools"] = {
            draw(st.text(min_size=1, max_size=6)): {
                "call": [draw(st.sampled_from(["group:members", "spiffe://x.org/**", "nope"]))],
                "when": draw(st.text(max_size=30)),
            }
        }
    return yaml.safe_dump(document)


@FUZZ
@given(policy_documents())
def test_policy_files_load_or_say_why(text: str) -> None:
    try:
        parse_policy(text, "fuzz.yaml")
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.yaml"), str(exc)


# --- SPIFFE IDs and tokens ----------------------------------------------------------------

id_chars = string.ascii_letters + string.digits + "-._/:%@?#*" + "é\x00 "


@FUZZ
@given(
    st.text(alphabet=id_chars, max_size=80).map(lambda s: "spiffe://" + s) | st.text(max_size=80)
)
def test_spiffe_ids_parse_or_refuse(text: str) -> None:
    try:
        parsed = SpiffeId.parse(text)
    except SpiffeIdError:
        pass
    else:
        # What parses is canonical: printing and parsing again gives the same ID.
        assert SpiffeId.parse(str(parsed)) == parsed
    try:
        SpiffeIdPattern.parse(text)
    except SpiffeIdError:
        pass


@pytest.fixture(scope="module")
def authenticator() -> Authenticator:
    config = parse_config(TEST_CONFIG.read_text(), "test.yaml", Path("."))
    identity = config.identity.model_copy(update={"allow_anonymous": False})
    return Authenticator(identity)


b64 = st.text(alphabet=string.ascii_letters + string.digits + "-_", max_size=60)


@FUZZ
@given(
    st.one_of(
        st.text(max_size=120),
        st.tuples(b64, b64, b64).map(".".join),
        st.builds(
            lambda header, claims: ".".join(
                [
                    _b64(json.dumps(header)),
                    _b64(json.dumps(claims)),
                    "sig",
                ]
            ),
            st.dictionaries(st.sampled_from(["alg", "kid", "typ"]), json_scalars, max_size=3),
            st.dictionaries(
                st.sampled_from(["sub", "aud", "exp", "iss", "act"]), json_values, max_size=5
            ),
        ),
    )
)
def test_forged_bearer_tokens_are_refused(authenticator: Authenticator, token: str) -> None:
    with pytest.raises(AuthenticationError) as info:
        authenticator.authenticate_http({"authorization": f"Bearer {token}"})
    assert info.value.status in (400, 401, 403)


def _b64(text: str) -> str:
    import base64

    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


# --- the HTTP front doors -----------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    factory = GatewayFactory(tmp_path_factory.mktemp("fuzz"))
    yield factory()
    factory.stop_all()


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as client:
        yield client


METHODS = ["initialize", "tools/list", "tools/call", "tasks/get", "tasks/list", "ping", "nope"]
A2A_METHODS = [
    "SendMessage",
    "GetTask",
    "ListTasks",
    "CancelTask",
    "message/send",
    "tasks/get",
    "x",
]


def rpc_messages(methods: list[str]) -> st.SearchStrategy[Any]:
    return st.one_of(
        json_values,
        st.fixed_dictionaries(
            {"jsonrpc": st.sampled_from(["2.0", "1.0", 2]), "method": st.sampled_from(methods)},
            optional={"id": json_scalars, "params": json_values},
        ),
    )


def _alive(gateway: GatewayProcess, http: httpx.Client) -> None:
    assert http.get(f"{gateway.base}/healthz").status_code == 200, gateway.log()


@FUZZ
@given(rpc_messages(METHODS))
def test_mcp_endpoint_never_fails_on_junk(
    fuzz_gateway: GatewayProcess, http: httpx.Client, body: Any
) -> None:
    # A session first, so that junk reaches the session's handlers as well as the transport.
    opened = http.post(fuzz_gateway.url, json=INIT, headers=MCP_HEADERS)
    session = opened.headers.get("mcp-session-id", "")
    headers = {**MCP_HEADERS, "mcp-session-id": session, "mcp-protocol-version": "2025-11-25"}
    response = http.post(fuzz_gateway.url, json=body, headers=headers)
    assert response.status_code < 500, response.text
    _alive(fuzz_gateway, http)


@FUZZ
@given(rpc_messages(A2A_METHODS), st.sampled_from(["1.0", "0.3", "", "9"]))
def test_a2a_endpoint_never_fails_on_junk(
    fuzz_gateway: GatewayProcess, http: httpx.Client, body: Any, version: str
) -> None:
    headers = {"A2A-Version": version} if version else {}
    response = http.post(f"{fuzz_gateway.base}/a2a", json=body, headers=headers)
    assert response.status_code < 500, response.text
    if response.status_code == 200 and isinstance(response.json(), dict):
        error = response.json().get("error")
        # An internal error would mean the junk got past validation into our code.
        assert error is None or error.get("code") != -32603, response.text
    _alive(fuzz_gateway, http)


@FUZZ
@given(
    st.sampled_from(["/a2a/rest/message:send", "/a2a/rest/tasks", "/a2a/rest/tasks/x:cancel"]),
    json_values,
)
def test_a2a_rest_binding_never_fails_on_junk(
    fuzz_gateway: GatewayProcess, http: httpx.Client, path: str, body: Any
) -> None:
    method = "GET" if path.endswith("/tasks") else "POST"
    response = http.request(
        method, f"{fuzz_gateway.base}{path}", json=body, headers={"A2A-Version": "1.0"}
    )
    assert response.status_code < 500, response.text
    _alive(fuzz_gateway, http)
