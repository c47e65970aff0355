"""The gateway's configuration (`gateway.yaml`): the model, and a loader whose errors name the
file, the line and the key.

    load_config(Path("config/gateway.yaml")) -> GatewayConfig

Every model refuses unknown keys, so that a misspelt or newer setting is never silently ignored.
Errors are collected from pydantic and placed on the YAML source by walking the composed node
tree (`yaml.compose`) along each error's `loc`:

    config/gateway.yaml:14: tools[1].retry.max_atempts: unknown key (did you mean 'max_attempts'?)

Relative paths in the file (`data_dir`, `identity.bundles`, `policy.dir`) are taken from the
directory of the config file, not from the current directory, so a config means the same thing
wherever `duragate` is started from.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from jsonschema import validators
from jsonschema.exceptions import SchemaError
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from gateway.sidecar.settings import check_component_name, is_local_address
from identity.principal import ANONYMOUS
from identity.spiffe_id import SpiffeId, SpiffeIdError, SpiffeIdPattern, parse_trust_domain

MiB = 1024 * 1024

# MCP 2025-11-25, "Tool names": 1 to 128 characters, case-sensitive, of these characters only.
TOOL_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]{1,128}")
# A tool kind is the name of a module in `adapters/`: keep it an identifier so that a config
# value can never steer an import outside that package.
TOOL_KIND_RE = re.compile(r"[a-z][a-z0-9_]*")
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

Location = tuple[str | int, ...]


# ---------------------------------------------------------------------------------------------
# errors


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong with a config file. `key` is the dotted path (`tools[1].retry`)."""

    source: str
    line: int | None
    key: str | None
    message: str

    def __str__(self) -> str:
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class ConfigError(Exception):
    """The configuration cannot be used. `str()` has one line per problem, in file order."""

    def __init__(self, problems: Sequence[ConfigProblem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    @classmethod
    def at(cls, source: str, line: int | None, key: str | None, message: str) -> ConfigError:
        return cls([ConfigProblem(source, line, key, message)])


def format_location(loc: Location) -> str:
    """`("tools", 1, "retry")` -> `tools[1].retry`."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# ---------------------------------------------------------------------------------------------
# JSON Schema helpers (shared with the registry)


def schema_validator_class(schema: dict[str, Any]) -> Any:
    """The jsonschema validator class for the schema's `$schema` (Draft 2020-12 when absent).

    An unknown `$schema` is an error rather than a silent fallback: it would mean validating
    with rules the author did not write for.
    """
    cls = validators.validator_for(schema, default=None)  # type: ignore[arg-type]
    if cls is None:
        if "$schema" in schema:
            raise ValueError(f"unknown JSON Schema dialect {schema['$schema']!r}")
        cls = validators.Draft202012Validator
    return cls


def check_tool_schema(schema: dict[str, Any]) -> None:
    """Raise ValueError unless `schema` is a valid JSON Schema describing an object.

    MCP requires both `inputSchema` and `outputSchema` to be object schemas.
    """
    cls = schema_validator_class(schema)
    try:
        cls.check_schema(schema)
    except SchemaError as exc:
        where = format_location(tuple(exc.absolute_path)) or "(root)"
        raise ValueError(f"not a valid JSON Schema: {where}: {exc.message}") from None
    if schema.get("type") != "object":
        raise ValueError("must be an object schema (`type: object`), as MCP requires")


# ---------------------------------------------------------------------------------------------
# the model


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    """Take a relative path from the config file's directory (when loading from a file)."""
    value = value.expanduser()
    base = info.context.get("base_dir") if isinstance(info.context, dict) else None
    if base is not None and not value.is_absolute():
        # Absolute and without `..`: the path must not change meaning if the process changes
        # directory, and it reads better in logs.
        value = (Path(base) / value).resolve()
    return value


ConfigPath = Annotated[Path, AfterValidator(_resolve_path)]


def _check_address(value: str, *, unix_ok: bool) -> str:
    if unix_ok and value.startswith("unix://"):
        if not value.startswith("unix:///"):
            raise ValueError(f"{value!r}: a unix socket address is unix:///absolute/path")
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        hint = "HOST:PORT or unix:///path" if unix_ok else "HOST:PORT"
        raise ValueError(f"{value!r} is not {hint}")
    return value


class TlsConfig(_Strict):
    """TLS on the HTTP front door, with X.509-SVIDs: the gateway's own SVID files and whether
    clients must, may or may not present theirs (`optional`: a certificate or a bearer token)."""

    cert: ConfigPath
    key: ConfigPath
    client_certs: Literal["none", "optional", "required"] = "optional"
    # The local trust domain, whose bundle (identity.bundles) verifies client chains in the TLS
    # layer; identity.trust_domain when left out. Federated callers use JWT-SVIDs.
    ca_bundle_domain: str | None = None
    # How often the cert, key and bundle files are checked for a change (one stat each, on a
    # new handshake): a rotated certificate is served without a restart.
    reload_seconds: float = Field(default=5.0, gt=0, le=3600)

    @field_validator("ca_bundle_domain")
    @classmethod
    def _ca_domain(cls, value: str | None) -> str | None:
        return None if value is None else _trust_domain(value)


class ListenConfig(_Strict):
    """Where the gateway's HTTP front doors listen, and with which TLS settings (plain HTTP
    without `tls`)."""

    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=8770, ge=0, le=65535)
    tls: TlsConfig | None = None


# A Dapr app id: what daprd and Kubernetes accept (a DNS label: lower-case letters, digits and
# '-'), and never `||`, daprd's state key separator, nor `duragate`, the gateway's own app.
APP_ID_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def check_app_id(value: str) -> str:
    if not APP_ID_RE.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a Dapr app id: use 1 to 63 lower-case letters, digits or '-', "
            "starting and ending with a letter or digit"
        )
    if value == "duragate":
        raise ValueError(
            "'duragate' is the gateway's own app id: it cannot be the id of another app"
        )
    return value


class EmbeddedEngineConfig(_Strict):
    """The built-in Dapr-compatible sidecar, on loopback, SQLite in the data directory."""

    kind: Literal["embedded"] = "embedded"
    # SQLite's `synchronous` pragma: FULL survives power loss, NORMAL only process crashes.
    synchronous: Literal["FULL", "NORMAL"] = "FULL"
    # `inprocess`: on the gateway's own event loop; the gateway's worker and workflow client
    # reach it without gRPC (gateway/sidecar/inprocess.py), other processes over gRPC as ever.
    # `process`: a child process that stops with the gateway; `thread`: a thread of the gateway
    # with its own loop (both over loopback gRPC, as with daprd: several times the CPU per call).
    sidecar: Literal["inprocess", "process", "thread"] = "inprocess"
    # Further Dapr apps the sidecar serves, app id -> that app's own gRPC address (loopback
    # HOST:PORT or unix:///path). Workers in other processes or Python environments connect
    # there; workflows reach them with call_activity/call_child_workflow(..., app_id=...).
    apps: dict[str, str] = {}
    # The sidecar's HTTP health address (loopback HOST:PORT); None: a free port. Fix it for apps
    # whose `DaprClient` probes `/v1.0/healthz/outbound` before its first call (a Dapr Agents
    # app): they find it at DAPR_HTTP_ENDPOINT=http://HOST:PORT.
    http_listen: str | None = None
    # State store components besides `statestore` (the gateway's, which holds workflow state),
    # each a key space of its own in the engine's database, for apps of `apps` that name
    # theirs (a Dapr Agents app finds `agent-workflow`, `agent-memory`, `agent-registry`).
    state_stores: list[str] = []

    @field_validator("state_stores")
    @classmethod
    def _state_stores(cls, value: list[str]) -> list[str]:
        for name in value:
            check_component_name(name)
            if name == "statestore":
                raise ValueError("'statestore' is the gateway's own state store: always served")
        if len(set(value)) != len(value):
            raise ValueError("a state store is named twice")
        return value

    @field_validator("http_listen")
    @classmethod
    def _http_listen(cls, value: str | None) -> str | None:
        if value is not None:
            _check_address(value, unix_ok=False)
            if not is_local_address(value):
                raise ValueError(f"{value} is not a loopback address")
        return value

    @field_validator("apps")
    @classmethod
    def _apps(cls, value: dict[str, str]) -> dict[str, str]:
        for app, address in value.items():
            check_app_id(app)
            _check_address(address, unix_ok=True)
            if not is_local_address(address):
                raise ValueError(
                    f"app {app!r}: {address} is not a loopback address; the embedded sidecar "
                    "serves only loopback (or run `duragate sidecar` with an API token)"
                )
        return value


class DaprEngineConfig(_Strict):
    """An external daprd sidecar. Its API token is read from the environment variable named by
    `api_token_env`, never from this file (config files end up in repositories)."""

    kind: Literal["dapr"]
    grpc_address: str
    http_address: str | None = None
    api_token_env: str = "DAPR_API_TOKEN"

    @field_validator("grpc_address")
    @classmethod
    def _grpc(cls, value: str) -> str:
        return _check_address(value, unix_ok=True)

    @field_validator("http_address")
    @classmethod
    def _http(cls, value: str | None) -> str | None:
        if value is None:
            return None
        # The Dapr SDK accepts an endpoint URL as well as host:port.
        bare = re.sub(r"^https?://", "", value).rstrip("/")
        _check_address(bare, unix_ok=False)
        return value

    @field_validator("api_token_env")
    @classmethod
    def _env(cls, value: str) -> str:
        if not ENV_NAME_RE.fullmatch(value):
            raise ValueError(f"{value!r} is not an environment variable name")
        return value


def _engine_kind(value: Any) -> str | None:
    # `kind` may be left out: an engine section without one is the embedded engine.
    if isinstance(value, dict):
        kind = value.get("kind", "embedded")
        return kind if isinstance(kind, str) else repr(kind)
    return getattr(value, "kind", None)


EngineConfig = Annotated[
    Annotated[EmbeddedEngineConfig, Tag("embedded")] | Annotated[DaprEngineConfig, Tag("dapr")],
    Discriminator(_engine_kind),
]


# A tenant name becomes part of task ownership and, later, a policy file name: a conservative
# charset, no leading or trailing '.', '-' or '_' (so never '.' or '..'). Every usual trust domain
# name (`example.org`) fits, which the default rule (tenant = trust domain) relies on.
TENANT_NAME_RE = re.compile(r"[a-z0-9](?:[a-z0-9._-]{0,253}[a-z0-9])?")


def check_tenant_name(value: str) -> str:
    if not TENANT_NAME_RE.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a tenant name: 1 to 255 lowercase letters, digits, '.', '-' or "
            "'_', starting and ending with a letter or digit"
        )
    return value


def _trust_domain(value: str) -> str:
    try:
        return parse_trust_domain(value)
    except SpiffeIdError as exc:
        raise ValueError(str(exc)) from None


class TenantRule(_Strict):
    """`{match: spiffe://example.org/team-a/**, tenant: team-a}`: callers whose SPIFFE ID
    matches the pattern (`*` one segment, `**` any number) belong to the tenant."""

    match: str
    tenant: str

    @field_validator("match")
    @classmethod
    def _pattern(cls, value: str) -> str:
        try:
            SpiffeIdPattern.parse(value)
        except SpiffeIdError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("tenant")
    @classmethod
    def _tenant(cls, value: str) -> str:
        return check_tenant_name(value)

    @property
    def trust_domain(self) -> str:
        return self.match.removeprefix("spiffe://").partition("/")[0]


# The asymmetric JWS algorithms an OAuth access token may use (RFC 7518 3.3-3.5): never `none`,
# never HS*, whose "key" would be public.
OAUTH_ALGORITHMS = (
    "RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512",
)  # fmt: skip
_TEMPLATE_FIELD_RE = re.compile(r"{([^{}]*)}")


def _https_url(value: str, what: str) -> str:
    """An https URL (http only on loopback, for development): where keys or metadata come from
    must be authenticated, or anyone on the path could hand us their keys."""
    match = re.fullmatch(r"(https?)://(\[[^\]\s]+\]|[^/:?#\[\]\s]+)(:\d+)?([/?#]\S*)?", value)
    if match is None:
        raise ValueError(f"{value!r}: {what} must be an https:// URL")
    scheme, host = match.group(1), match.group(2).strip("[]")
    if scheme == "http" and host not in ("localhost", "127.0.0.1", "::1"):
        raise ValueError(f"{value!r}: {what} must use https (plain http only on loopback)")
    return value


class OAuthIssuerConfig(_Strict):
    """One OAuth 2.1 authorization server whose JWT access tokens are accepted (IDE users):
    where its keys are, which audience (RFC 8707 resource) a token must name, and how its `sub`
    becomes a principal and a tenant."""

    issuer: str
    # The JWK Set: a URL, a file, or neither (then found in the issuer's RFC 8414 / OpenID
    # metadata at start).
    jwks_uri: str | None = None
    jwks_file: ConfigPath | None = None
    # The `aud` a token must include; identity.resource when left out.
    audience: str | list[str] | None = None
    # `{sub}` (encoded to fit a SPIFFE path segment) and `{trust_domain}` (identity.trust_domain).
    subject_template: str = "spiffe://{trust_domain}/user/{sub}"
    # Exact `sub` -> SPIFFE ID, before the template.
    subjects: dict[str, str] = Field(default_factory=dict)
    # The tenant of every user of this issuer; identity.tenants rules when left out.
    tenant: str | None = None
    algorithms: list[str] = Field(default_factory=lambda: list(OAUTH_ALGORITHMS))
    # How long a fetched JWK Set is used before it is fetched again; an unknown `kid` refetches
    # sooner (at most once per `jwks_min_refetch_seconds`).
    jwks_refresh_seconds: float = Field(default=300.0, ge=1, le=86400)
    jwks_min_refetch_seconds: float = Field(default=10.0, ge=0, le=3600)
    leeway_seconds: float = Field(default=30.0, ge=0, le=300)

    @field_validator("issuer")
    @classmethod
    def _issuer(cls, value: str) -> str:
        return _https_url(value, "the issuer")

    @field_validator("jwks_uri")
    @classmethod
    def _jwks_uri(cls, value: str | None) -> str | None:
        return None if value is None else _https_url(value, "jwks_uri")

    @field_validator("audience")
    @classmethod
    def _audience(cls, value: str | list[str] | None) -> str | list[str] | None:
        values = [value] if isinstance(value, str) else value
        if values is not None and (not values or not all(values)):
            raise ValueError("the audience must be a non-empty string or list of them")
        return value

    @field_validator("subject_template")
    @classmethod
    def _template(cls, value: str) -> str:
        fields = _TEMPLATE_FIELD_RE.findall(value)
        unknown = sorted(set(fields) - {"sub", "trust_domain"})
        if unknown:
            raise ValueError(f"unknown field(s) {unknown} (use {{sub}} and {{trust_domain}})")
        if "sub" not in fields:
            raise ValueError("the template must contain {sub}: else every user is one principal")
        return value

    @field_validator("subjects")
    @classmethod
    def _subjects(cls, value: dict[str, str]) -> dict[str, str]:
        for sub, spiffe_id in value.items():
            try:
                value[sub] = str(SpiffeId.parse(spiffe_id))
            except SpiffeIdError as exc:
                raise ValueError(f"subjects[{sub!r}]: {exc}") from None
        return value

    @field_validator("tenant")
    @classmethod
    def _tenant(cls, value: str | None) -> str | None:
        return None if value is None else check_tenant_name(value)

    @field_validator("algorithms")
    @classmethod
    def _algorithms(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one algorithm is required")
        for alg in value:
            if alg not in OAUTH_ALGORITHMS:
                raise ValueError(
                    f"{alg!r} is not allowed: access tokens are verified with asymmetric keys "
                    f"only ({', '.join(OAUTH_ALGORITHMS)})"
                )
        return value

    @model_validator(mode="after")
    def _one_key_source(self) -> OAuthIssuerConfig:
        if self.jwks_uri is not None and self.jwks_file is not None:
            raise ValueError("give jwks_uri or jwks_file, not both")
        return self


class OwnIdentityConfig(_Strict):
    """The gateway's own SVID for its outbound calls (`identity.own`): from files, from the
    development CA, or from a SPIFFE Workload API agent."""

    source: Literal["files", "dev_ca", "workload_api"]
    # files: the SVID's certificate chain and key (PEM), the trust bundle (PEM or SPIFFE), and
    # optionally a JWT-SVID file; re-read when they change.
    cert: ConfigPath | None = None
    key: ConfigPath | None = None
    bundle: ConfigPath | None = None
    jwt_svid_file: ConfigPath | None = None
    reload_seconds: float = Field(default=5.0, gt=0, le=3600)
    # dev_ca: the CA directory (default <data_dir>/identity/ca).
    ca_dir: ConfigPath | None = None
    # workload_api: the agent's endpoint (default: $SPIFFE_ENDPOINT_SOCKET).
    endpoint: str | None = None
    # Which SVID: dev_ca issues this ID (default spiffe://<td>/duragate); workload_api picks
    # the SVID with this ID and/or hint (default: the first, as the standard says).
    spiffe_id: str | None = None
    hint: str | None = None

    @field_validator("spiffe_id")
    @classmethod
    def _spiffe_id(cls, value: str | None) -> str | None:
        try:
            return None if value is None else str(SpiffeId.parse(value))
        except SpiffeIdError as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _fields_of_the_source(self) -> OwnIdentityConfig:
        if self.source == "files":
            missing = [n for n in ("cert", "key", "bundle") if getattr(self, n) is None]
            if missing:
                raise ValueError(f"source files needs {', '.join(missing)}")
        if self.endpoint is not None and not re.match(r"(unix|tcp)://?", self.endpoint):
            raise ValueError(f"endpoint {self.endpoint!r}: use unix:///path or tcp://IP:port")
        return self


class IdentityConfig(_Strict):
    """Who may call: trust bundles for JWT-SVID bearer tokens, the audience they must name, how
    a caller's SPIFFE ID maps to a tenant, and whether anonymous callers are let in."""

    # The gateway's own trust domain (its SVIDs, its local users); optional until mTLS.
    trust_domain: str | None = None
    # One bundle file (SPIFFE JSON or PEM) per trust domain, never merged: a token is checked
    # against the bundle of its subject's trust domain only.
    bundles: dict[str, ConfigPath] = Field(default_factory=dict)
    # A JWT-SVID's `aud` must include (one of) this.
    audience: str | list[str] = "duragate"
    # First match wins; no match means tenant = the caller's trust domain, unless
    # `require_tenant_rule`, which refuses (403) a caller that no rule names.
    tenants: list[TenantRule] = Field(default_factory=list)
    require_tenant_rule: bool = False
    # Security by default: a caller that proves no identity is refused unless this is true.
    allow_anonymous: bool = False
    anonymous_principal: str = ANONYMOUS.id
    anonymous_tenant: str = ANONYMOUS.tenant
    # How long a verified token is remembered (never past its `exp`); 0 verifies every request.
    token_cache_seconds: float = Field(default=30.0, ge=0, le=3600)
    # How often the bundle files are checked for a change (one stat each), at most the bundles'
    # own refresh hint: a rotated bundle is used without a restart.
    bundle_refresh_seconds: float = Field(default=5.0, gt=0, le=86400)
    # OAuth 2.1 resource server: JWT access tokens of these issuers (people behind IDE clients),
    # and this gateway's resource identifier (RFC 8707 / RFC 9728), e.g. https://gw.example/mcp.
    oauth: list[OAuthIssuerConfig] = Field(default_factory=list)
    resource: str | None = None
    # The caller over stdio: spiffe://<trust_domain or duragate.local>/local/<user> by default.
    local_principal: str | None = None
    local_tenant: str = "default"
    # The gateway's own SVID for outbound calls (identity/own.py); none by default.
    own: OwnIdentityConfig | None = None

    @field_validator("trust_domain")
    @classmethod
    def _own_domain(cls, value: str | None) -> str | None:
        return None if value is None else _trust_domain(value)

    @field_validator("bundles")
    @classmethod
    def _bundle_domains(cls, value: dict[str, Path]) -> dict[str, Path]:
        for domain in value:
            try:
                _trust_domain(domain)
            except ValueError as exc:
                raise ValueError(f"bundle key {domain!r}: {exc}") from None
        return value

    @field_validator("audience")
    @classmethod
    def _audience(cls, value: str | list[str]) -> str | list[str]:
        values = [value] if isinstance(value, str) else value
        if not values or not all(values):
            raise ValueError("the audience must be a non-empty string or list of them")
        return value

    @field_validator("anonymous_principal")
    @classmethod
    def _anonymous_id(cls, value: str) -> str:
        try:
            return str(SpiffeId.parse(value))
        except SpiffeIdError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("anonymous_tenant")
    @classmethod
    def _anonymous_tenant(cls, value: str) -> str:
        return check_tenant_name(value)

    @field_validator("local_principal")
    @classmethod
    def _local_id(cls, value: str | None) -> str | None:
        try:
            return None if value is None else str(SpiffeId.parse(value))
        except SpiffeIdError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("local_tenant")
    @classmethod
    def _local_tenant(cls, value: str) -> str:
        return check_tenant_name(value)

    @field_validator("resource")
    @classmethod
    def _resource(cls, value: str | None) -> str | None:
        if value is not None and "#" in value:
            raise ValueError("a resource identifier has no fragment (RFC 8707 2)")
        return None if value is None else _https_url(value, "the resource")

    @model_validator(mode="after")
    def _oauth_issuers(self) -> IdentityConfig:
        templates: dict[str, str] = {}
        for index, issuer in enumerate(self.oauth):
            where = f"oauth[{index}] ({issuer.issuer})"
            if issuer.audience is None and self.resource is None:
                raise ValueError(
                    f"{where}: no audience: set its audience or identity.resource (the URL "
                    "clients use, which tokens must name in aud)"
                )
            if "{trust_domain}" in issuer.subject_template and self.trust_domain is None:
                raise ValueError(
                    f"{where}: subject_template uses {{trust_domain}}: set identity.trust_domain"
                )
            if issuer.subject_template in templates:
                raise ValueError(
                    f"{where}: the same subject_template as {templates[issuer.subject_template]} "
                    "would make the same sub of two issuers one principal; give each issuer a "
                    "template of its own (e.g. spiffe://{trust_domain}/user/<name>/{sub})"
                )
            templates[issuer.subject_template] = where
        issuers = [i.issuer for i in self.oauth]
        for _first, repeat in duplicate_names(issuers):
            raise ValueError(f"oauth[{repeat}]: issuer {issuers[repeat]!r} is listed twice")
        return self

    @field_validator("tenants")
    @classmethod
    def _rules_name_known_domains(
        cls, value: list[TenantRule], info: ValidationInfo
    ) -> list[TenantRule]:
        # A rule for a trust domain we hold no bundle for can never match: most likely a typo,
        # which would silently hand those callers the default tenant instead.
        known = set(info.data.get("bundles") or ())
        own = info.data.get("trust_domain")
        if own:
            known.add(own)
        for index, rule in enumerate(value):
            if rule.trust_domain not in known:
                listed = ", ".join(sorted(known)) or "none"
                raise ValueError(
                    f"rule #{index} ({rule.match}) can never match: no bundle for trust domain "
                    f"{rule.trust_domain!r} (identity.bundles has: {listed})"
                )
        return value

    @property
    def audiences(self) -> frozenset[str]:
        return frozenset([self.audience] if isinstance(self.audience, str) else self.audience)


class PolicyConfig(_Strict):
    # The directory of tenant policy files (a later issue).
    dir: ConfigPath | None = None
    # The CEL library of policy conditions (policies/cel.py); unset: $DURAGATE_CEL_BACKEND,
    # else cel-expr-python.
    cel: Literal["cel-expr-python", "cel-python"] | None = None


class AuditConfig(_Strict):
    # The audit log (gateway/audit.py): a JSON-lines file, or "-" for stdout; unset:
    # audit.jsonl in the data directory.
    path: Literal["-"] | ConfigPath | None = None
    # Records waiting for the writer; beyond this they are dropped (and counted), not waited for.
    max_pending: int = Field(default=10_000, ge=1)


class ObservabilityConfig(_Strict):
    """Metrics at `/metrics` (gateway/metrics.py). Traces are set up from the standard
    `OTEL_*` environment variables, not here (gateway/telemetry.py)."""

    metrics: bool = True
    # Who may read /metrics: loopback callers only, any authenticated (not anonymous) caller,
    # or anyone who can reach the listener. Metrics name tenants and tools.
    metrics_access: Literal["loopback", "authenticated", "public"] = "loopback"


class AdminConfig(_Strict):
    """Who may use the admin API (`/admin/api`) and the dashboard (`/ui`) for every tenant:
    SPIFFE ID patterns (`*` one segment, `**` any number). Tenant policy files name the admins
    of one tenant (`admins:`). The anonymous principal counts only on a loopback listener."""

    principals: list[str] = Field(default_factory=list)

    @field_validator("principals")
    @classmethod
    def _patterns(cls, value: list[str]) -> list[str]:
        for pattern in value:
            try:
                SpiffeIdPattern.parse(pattern)
            except SpiffeIdError as exc:
                raise ValueError(str(exc)) from None
        return value


class LimitsConfig(_Strict):
    max_body_bytes: int = Field(default=MiB, ge=1024)
    # How long a plain (non-task) call is waited for before it must finish or become a task.
    max_wait_seconds: float = Field(default=60.0, gt=0)


class RetryConfig(_Strict):
    """Retries of a failed tool activity (the shape of Dapr's workflow RetryPolicy)."""

    max_attempts: int = Field(default=1, ge=1)
    first_interval_seconds: float = Field(default=1.0, gt=0)
    backoff_coefficient: float = Field(default=2.0, ge=1)
    max_interval_seconds: float = Field(default=60.0, gt=0)

    @model_validator(mode="after")
    def _intervals(self) -> RetryConfig:
        if self.max_interval_seconds < self.first_interval_seconds:
            raise ValueError(
                f"max_interval_seconds ({self.max_interval_seconds}) is shorter than "
                f"first_interval_seconds ({self.first_interval_seconds})"
            )
        return self


TaskSupport = Literal["forbidden", "optional", "required"]

# Tool kinds whose calls run as a Dapr workflow of the tool's `app_id` (a child workflow of the
# call), not as an activity: the gateway loads them through their adapter even though they have
# an app, and no worker runs them.
WORKFLOW_KINDS = frozenset({"dapr_agent"})


class ToolConfig(_Strict):
    """One tool. `kind` picks the adapter module (`adapters/<kind>.py`), `target` is what that
    adapter loads (for `python`: `package.module:function`)."""

    name: str
    description: str | None = None
    kind: str
    target: str = Field(min_length=1)
    input_schema: dict[str, Any] | None = None
    output_schema: dict[str, Any] | None = None
    timeout_seconds: float = Field(default=60.0, gt=0)
    retry: RetryConfig = Field(default_factory=RetryConfig)
    task_support: TaskSupport = "optional"
    # Kind-specific settings, checked by the tool's adapter when it loads the tool.
    options: dict[str, Any] = {}
    # The Dapr app whose workers run this tool (`duragate worker --app-id ...`, in a process and
    # Python environment of their own). The gateway then never loads the target: the tool's
    # description and input schema come from this config.
    app_id: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not TOOL_NAME_RE.fullmatch(value):
            raise ValueError(
                f"{value!r} is not a valid tool name: use 1 to 128 letters, digits, '_', '-' or '.'"
            )
        return value

    @field_validator("kind")
    @classmethod
    def _kind(cls, value: str) -> str:
        if not TOOL_KIND_RE.fullmatch(value):
            raise ValueError(f"{value!r} is not a tool kind (lower-case letters, digits, '_')")
        return value

    @field_validator("input_schema", "output_schema")
    @classmethod
    def _schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            check_tool_schema(value)
        return value

    @field_validator("app_id")
    @classmethod
    def _app_id(cls, value: str | None) -> str | None:
        return None if value is None else check_app_id(value)

    @model_validator(mode="after")
    def _worker_spec(self) -> ToolConfig:
        # The gateway lists a worker's tool without loading it: what it would have derived
        # from the target must be written here. (A workflow kind's adapter runs in the
        # gateway, whatever its app: it derives them itself.)
        if self.app_id is not None and self.kind not in WORKFLOW_KINDS:
            missing = [k for k in ("description", "input_schema") if getattr(self, k) is None]
            if missing:
                raise ValueError(
                    f"tool {self.name!r} runs in worker app {self.app_id!r}, so the gateway does "
                    f"not load its target: set its {' and '.join(missing)} in the config"
                )
        return self


# Tool kinds that are agents in their own right: each becomes an A2A agent of its own when
# `a2a.tools_as_agents` is `agent_like` (the default).
AGENT_LIKE_KINDS = frozenset({"agent", "dapr_agent", "crewai", "langgraph", "a2a"})
AGENT_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


class A2AAgentConfig(_Strict):
    """An A2A agent made of a group of tools: each tool is one of its skills."""

    name: str
    description: str | None = None
    tools: list[str] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not AGENT_NAME_RE.fullmatch(value):
            raise ValueError(
                f"{value!r} is not a valid agent name: use 1 to 63 lower-case letters, digits, "
                "'_' or '-', starting with a letter or digit (it is a URL path segment)"
            )
        return value


class A2APushConfig(_Strict):
    """Push notifications to A2A clients' webhooks."""

    # Push URLs must be http(s) and, unless their host is listed here, must not resolve to a
    # loopback, private, link-local or otherwise internal address (no requests into the
    # gateway's own network on a caller's behalf).
    allowed_hosts: list[str] = Field(default_factory=list)
    max_attempts: int = Field(default=8, ge=1, le=100)
    first_retry_seconds: float = Field(default=0.5, gt=0)
    max_retry_seconds: float = Field(default=60.0, gt=0)
    timeout_seconds: float = Field(default=10.0, gt=0)
    max_configs_per_task: int = Field(default=10, ge=1, le=1000)


class A2AConfig(_Strict):
    """The A2A front door (agent cards, JSON-RPC and HTTP+JSON bindings)."""

    enabled: bool = True
    # none | agent_like (each tool of an agent-like kind is an agent) | all (every tool is).
    tools_as_agents: Literal["none", "agent_like", "all"] = "agent_like"
    agents: list[A2AAgentConfig] = Field(default_factory=list)
    # A blocking SendMessage waits at most this long, then answers with the task as it is
    # (the caller polls, subscribes or gets a push).
    blocking_wait_seconds: float = Field(default=60.0, gt=0)
    push: A2APushConfig = Field(default_factory=A2APushConfig)

    @model_validator(mode="after")
    def _unique_agents(self) -> A2AConfig:
        for first, repeat in duplicate_names([a.name for a in self.agents]):
            raise ValueError(
                f"agents[{repeat}].name: {self.agents[repeat].name!r} is defined twice "
                f"(first at agents[{first}])"
            )
        return self


def duplicate_names(names: Sequence[Any]) -> list[tuple[int, int]]:
    """(index of first, index of repeat) for each repeated name."""
    first: dict[Any, int] = {}
    repeats = []
    for index, name in enumerate(names):
        if isinstance(name, str) and name in first:
            repeats.append((first[name], index))
        elif isinstance(name, str):
            first[name] = index
    return repeats


class GatewayConfig(_Strict):
    """The whole of `gateway.yaml`."""

    listen: ListenConfig = Field(default_factory=ListenConfig)
    data_dir: ConfigPath | None = None
    engine: EngineConfig = Field(default_factory=EmbeddedEngineConfig)
    identity: IdentityConfig = Field(default_factory=IdentityConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    observability: ObservabilityConfig = Field(default_factory=ObservabilityConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    a2a: A2AConfig = Field(default_factory=A2AConfig)
    tools: list[ToolConfig] = Field(default_factory=list)

    # Where this config came from, to name file and line in errors found after loading (a tool
    # whose target does not import, for instance).
    _source: str | None = PrivateAttr(default=None)
    _root: yaml.Node | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, data: Any) -> Any:
        # `identity:` with every setting commented out is None in YAML: mean "the defaults".
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not (v is None and k in cls.model_fields)}
        return data

    @model_validator(mode="after")
    def _unique_tool_names(self) -> GatewayConfig:
        for first, repeat in duplicate_names([t.name for t in self.tools]):
            raise ValueError(
                f"tools[{repeat}].name: {self.tools[repeat].name!r} is defined twice "
                f"(first at tools[{first}])"
            )
        return self

    @property
    def source(self) -> str | None:
        """The config file as it was named when loaded, or None when built in code."""
        return self._source

    def line_of(self, loc: Location) -> int | None:
        """The 1-based line in the config file of the key at `loc`, if known."""
        if self._root is None:
            return None
        return locate_node(self._root, loc)[0]

    def tool_app_problems(self) -> list[ConfigProblem]:
        """Tools whose `app_id` the embedded sidecar does not serve (their calls would wait
        forever). daprd knows its apps itself: with `engine.kind: dapr` there are none."""
        engine = self.engine
        if not isinstance(engine, EmbeddedEngineConfig):
            return []
        problems = []
        for index, tool in enumerate(self.tools):
            if tool.app_id is not None and tool.app_id not in engine.apps:
                known = ", ".join(sorted(engine.apps)) or "none"
                message = (
                    f"tool {tool.name!r} runs in app {tool.app_id!r}, which engine.apps does "
                    f"not name (configured apps: {known}); add `{tool.app_id}: 127.0.0.1:PORT` "
                    "under engine.apps"
                )
                problems.append(self.problem(("tools", index, "app_id"), message))
        return problems

    def problem(self, loc: Location, message: str) -> ConfigProblem:
        """A problem found after loading (by the registry, say), placed on the config file."""
        return ConfigProblem(
            self._source or "<config>", self.line_of(loc), format_location(loc) or None, message
        )


# ---------------------------------------------------------------------------------------------
# loading


def read_text_file(path: Path, what: str) -> str:
    """The text of a configuration file (`what`: "config", "policy", ...), or a ConfigError
    saying why it cannot be read."""
    source = str(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError.at(source, None, None, f"no such {what} file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError.at(source, None, None, f"not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError.at(source, None, None, f"cannot read: {reason}") from None


def load_config(path: Path) -> GatewayConfig:
    """Read and validate a config file; relative paths in it are taken from its directory."""
    return parse_config(read_text_file(path, "config"), str(path), path.parent)


def parse_config(text: str, source: str, base_dir: Path) -> GatewayConfig:
    """Validate config text. `source` names it in errors; `base_dir` anchors relative paths."""
    root, data = compose_yaml(text, source)
    problems = []
    tools = data.get("tools")
    if isinstance(tools, list):
        names = [t.get("name") if isinstance(t, dict) else None for t in tools]
        for first, repeat in duplicate_names(names):
            line = locate_node(root, ("tools", first, "name"))[0]
            problems.append(
                _problem(
                    root,
                    source,
                    ("tools", repeat, "name"),
                    f"{names[repeat]!r} is defined twice (first at line {line})",
                )
            )
    if problems:
        raise ConfigError(problems)
    try:
        config = GatewayConfig.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise ConfigError(explain_validation(exc, root, source, GatewayConfig)) from None
    config._source = source
    config._root = root
    app_problems = config.tool_app_problems()
    if app_problems:
        raise ConfigError(app_problems)
    return config


def compose_yaml(text: str, source: str) -> tuple[yaml.Node, dict[Any, Any]]:
    """Parse once: the node tree (for line numbers) and the Python data built from it."""
    try:
        # The reader checks the characters as it is built: a control character fails here.
        loader = yaml.SafeLoader(text)
    except yaml.YAMLError as exc:
        raise ConfigError.at(source, None, None, f"not valid YAML: {exc}") from None
    try:
        root = loader.get_single_node()
        if root is None:
            raise ConfigError.at(source, 1, None, "the file is empty: it must be a mapping")
        if not isinstance(root, yaml.MappingNode):
            what = "a list" if isinstance(root, yaml.SequenceNode) else "a single value"
            raise ConfigError.at(
                source, _line(root), None, f"the top level must be a mapping of keys, not {what}"
            )
        # Before constructing: construction flattens `<<:` merges into the nodes, which would
        # make a merged key and its override look like duplicates.
        duplicates = _duplicate_keys(root, source)
        if duplicates:
            raise ConfigError(duplicates)
        data = loader.construct_document(root)
    except yaml.MarkedYAMLError as exc:
        raise ConfigError.at(source, *_yaml_problem(exc)) from None
    except yaml.YAMLError as exc:  # reader errors (bad bytes) carry no mark
        raise ConfigError.at(source, None, None, f"not valid YAML: {exc}") from None
    finally:
        loader.dispose()
    return root, data


def _yaml_problem(exc: yaml.MarkedYAMLError) -> tuple[int | None, None, str]:
    """(line, key, message) for a YAML syntax error: where it was noticed, and what was open."""
    mark = exc.problem_mark or exc.context_mark
    message = f"not valid YAML: {exc.problem or exc.context or 'syntax error'}"
    if exc.problem and exc.context:
        message += f" ({exc.context}"
        if exc.context_mark is not None and exc.context_mark is not mark:
            message += f" at line {exc.context_mark.line + 1}"
        message += ")"
    return (mark.line + 1 if mark is not None else None), None, message


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def _duplicate_keys(root: yaml.Node, source: str) -> list[ConfigProblem]:
    """PyYAML keeps the last of two equal keys without a word; refuse them instead."""
    problems: list[ConfigProblem] = []
    # Aliases share nodes (and `&a [*a]` is a cycle): look at each node once.
    visited: set[int] = set()

    def walk(node: yaml.Node, loc: Location) -> None:
        if id(node) in visited:
            return
        visited.add(id(node))
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value != "<<":
                    if key.value in seen:
                        problems.append(
                            ConfigProblem(
                                source,
                                _line(key),
                                format_location((*loc, key.value)),
                                f"duplicate key (first at line {seen[key.value]})",
                            )
                        )
                    else:
                        seen[key.value] = _line(key)
                walk(value, (*loc, key.value) if isinstance(key, yaml.ScalarNode) else loc)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                walk(item, (*loc, index))

    walk(root, ())
    return problems


def _lookup(node: yaml.MappingNode, key: str | int) -> tuple[yaml.Node, yaml.Node] | None:
    # Construction has flattened `<<:` merges into the mapping, merged keys first: the last
    # match is the value that was used.
    found = None
    for key_node, value_node in node.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.value == str(key):
            found = key_node, value_node
    return found


def locate_node(root: yaml.Node, loc: Location) -> tuple[int, bool]:
    """The line of the deepest node on `loc`, and whether all of `loc` was found.

    A key's line is the line of the key itself; when the key is missing, the line of the
    mapping that should hold it (the line of its own key, or of its `-` list item).
    """
    node: yaml.Node | None = root
    line = _line(root)
    for part in loc:
        if isinstance(node, yaml.MappingNode) and (found := _lookup(node, part)):
            line, node = _line(found[0]), found[1]
        elif (
            isinstance(node, yaml.SequenceNode)
            and isinstance(part, int)
            and 0 <= part < len(node.value)
        ):
            node = node.value[part]
            line = _line(node)
        else:
            return line, False
    return line, True


def unwrap_type(tp: Any) -> Any:
    """Strip `Annotated[...]` and `X | None`."""
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            members = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(members) != 1:
                return tp
            tp = members[0]
        else:
            return tp


def _union_member(tp: Any, tag: str) -> type[BaseModel] | None:
    """The member of a tagged union whose `kind` is `tag` (pydantic puts the tag in `loc`)."""
    if typing.get_origin(tp) not in (typing.Union, types.UnionType):
        return None
    for member in typing.get_args(tp):
        model = unwrap_type(member)
        if isinstance(model, type) and issubclass(model, BaseModel):
            kind = model.model_fields.get("kind")
            if kind is not None and tag in typing.get_args(kind.annotation):
                return model
    return None


def _model_path(loc: Location, model: type[BaseModel]) -> tuple[Location, type[BaseModel] | None]:
    """Follow `loc` through the types of `model`: the location as the file spells it (without
    the tags pydantic adds for tagged unions, or its `[key]` marks on bad dict keys), and the
    model that holds the last key."""
    tp: Any = model
    clean: list[str | int] = []
    parent: type[BaseModel] | None = None
    for part in loc:
        if part == "[key]":
            continue  # a bad dict key: the key itself is the place
        tp = unwrap_type(tp)
        if isinstance(part, str) and (member := _union_member(tp, part)) is not None:
            tp = member
            continue
        clean.append(part)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            parent = tp
            fields = {f.alias or n: f for n, f in tp.model_fields.items()}
            field = fields.get(str(part))
            tp = field.annotation if field is not None else None
        else:
            parent = None
            args = typing.get_args(tp)
            tp = args[-1] if args else None
    return tuple(clean), parent


def suggest(word: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _problem(root: yaml.Node, source: str, loc: Location, message: str) -> ConfigProblem:
    line, _ = locate_node(root, loc)
    return ConfigProblem(source, line, format_location(loc) or None, message)


def explain_validation(
    exc: ValidationError,
    root: yaml.Node,
    source: str,
    model: type[BaseModel],
    key_path: Callable[[Location], str] = format_location,
) -> list[ConfigProblem]:
    """pydantic's errors for `model`, each placed on the file at its line, with `key_path`
    spelling the key (gateway.yaml and policy files share this)."""
    problems = []
    for error in exc.errors():
        loc, parent = _model_path(tuple(error["loc"]), model)
        kind, value = error["type"], error.get("input")
        if kind == "extra_forbidden":
            fields = [f.alias or n for n, f in parent.model_fields.items()] if parent else []
            message = "unknown key" + suggest(str(loc[-1]), fields)
        elif kind == "missing":
            message = "required key is missing"
        elif kind == "union_tag_invalid" and isinstance(value, dict):
            loc = (*loc, "kind")
            tags = [t.strip("'") for t in error.get("ctx", {}).get("expected_tags", "").split(", ")]
            message = f"unknown kind {value.get('kind')!r}; known kinds: {', '.join(tags)}"
            message += suggest(str(value.get("kind")), tags)
        elif kind == "union_tag_not_found":
            message = "must be a mapping with a `kind` key"
        elif kind == "value_error":
            message = error["msg"].removeprefix("Value error, ")
        else:
            message = error["msg"][:1].lower() + error["msg"][1:]
            if isinstance(value, str | int | float | bool) or value is None:
                message += f" (got {value!r})"
        line, _ = locate_node(root, loc)
        problems.append(ConfigProblem(source, line, key_path(loc) or None, message))
    problems.sort(key=lambda p: p.line or 0)
    return problems
