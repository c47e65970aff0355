"""Loading tenant policy files, and keeping them current while the gateway runs.

    policy = load_policy_file(Path("config/policies/default.yaml"))   # or ConfigError
    store = PolicyStore.open(Path("config/policies"))                 # every <tenant>.yaml
    store.refresh()                                                   # hot reload
    check_paths(["config/policies"])                                  # `policy check`: problems

Errors name the file, the line and the key, as `gateway.config` does for `gateway.yaml` (whose
YAML helpers this module reuses):

    config/policies/default.yaml:14: tools[add].deny[0].when: not valid CEL at line 1, column 9

Hot reload: `refresh()` re-reads the directory. A changed file is validated before it replaces
anything; a broken one leaves the last good version of that tenant in force, and its error is
kept (`problems()`, for `/readyz` and logs) until the file is fixed or removed. A deleted file
removes the tenant, so its principals are denied from then on. Files are compared by content,
not by timestamp: two writes within one timestamp tick are still seen.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

# Private helpers of gateway.config, reused so both kinds of file report errors the same way.
from gateway.config import (
    TENANT_NAME_RE,
    ConfigError,
    ConfigProblem,
    Location,
    compose_yaml,
    explain_validation,
    format_location,
    locate_node,
    read_text_file,
    suggest,
)
from identity.spiffe_id import SpiffeId, SpiffeIdPattern
from policies.cel import CelBackend, CelCompileError, Condition, compile_condition, get_backend
from policies.model import (
    GROUP_PREFIX,
    MEMBERS_GROUP,
    TenantPolicy,
    ToolRule,
    is_glob,
    literal_length,
)

log = logging.getLogger(__name__)

SUFFIX = ".yaml"
# Per-policy memo (rules per tool name, caller facts, caller-only condition results): bounded,
# since tool names and principals come from outside.
MEMO_LIMIT = 4096


# ---------------------------------------------------------------------------------------------
# the compiled form the evaluator works on


@dataclass(frozen=True)
class Audience:
    """Who a list of references (patterns and groups) admits, resolved at load."""

    patterns: tuple[SpiffeIdPattern, ...]

    def admits(self, spiffe_id: SpiffeId) -> bool:
        return any(p.matches(spiffe_id) for p in self.patterns)

    def describe(self) -> list[str]:
        return [str(p) for p in self.patterns]


@dataclass(frozen=True)
class DenyCheck:
    where: str  # "default.yaml:tools[add].deny[0]"
    condition: Condition | None  # None: always
    reason: str


@dataclass(frozen=True)
class ApprovalCheck:
    where: str
    condition: Condition | None  # None: always
    approvers: Audience
    expires_seconds: float
    allow_self: bool


@dataclass(frozen=True)
class CompiledRule:
    key: str  # the tool name or pattern as written
    where: str  # "default.yaml:tools[add]"
    visible: Audience
    list_explicit: bool
    callers: Audience
    when: Condition | None
    denies: tuple[DenyCheck, ...]
    approval: ApprovalCheck | None
    obligations: dict[str, Any]


@dataclass(eq=False)
class LoadedPolicy:
    """One tenant's policy, validated and compiled."""

    tenant: str
    source: str  # the path as given, for messages
    name: str  # the file name, for rule names ("default.yaml:tools[add]")
    digest: str
    model: TenantPolicy
    members: Audience
    groups: dict[str, Audience]
    rules: tuple[CompiledRule, ...]
    cel: CelBackend = field(repr=False)  # the backend its conditions were compiled for
    # Who administers this tenant (`admins:`; gateway.admin_access checks membership too).
    admins: Audience = field(default_factory=lambda: Audience(()))
    _memo: dict[Any, Any] = field(default_factory=dict, repr=False)

    def rules_for(self, tool: str) -> tuple[CompiledRule, ...]:
        """The rules naming `tool`, most specific first: its exact rule, then matching patterns
        by how many literal characters they have (`word_*` before `*`), then in file order.
        Obligations are taken in this order: the first rule that sets a key wins."""
        return self.memo(("rules", tool), lambda: self._rules_for(tool))

    def _rules_for(self, tool: str) -> tuple[CompiledRule, ...]:
        exact = [r for r in self.rules if not is_glob(r.key) and r.key == tool]
        globs = [r for r in self.rules if is_glob(r.key) and fnmatchcase(tool, r.key)]
        globs.sort(key=lambda r: -literal_length(r.key))  # stable: file order among equals
        return tuple(exact + globs)

    def groups_of(self, spiffe_id: SpiffeId) -> list[str]:
        return [name for name, audience in self.groups.items() if audience.admits(spiffe_id)]

    def memo(self, key: Any, compute: Callable[[], Any]) -> Any:
        try:
            return self._memo[key]
        except KeyError:
            pass
        value = compute()
        if len(self._memo) >= MEMO_LIMIT:
            self._memo.clear()  # crude, but keeps memory bounded whatever callers send
        self._memo[key] = value
        return value


# ---------------------------------------------------------------------------------------------
# loading one file


def load_policy_file(path: Path, cel: CelBackend | str | None = None) -> LoadedPolicy:
    """Read, validate and compile one `<tenant>.yaml`; raise ConfigError naming file and line.
    `cel`: the CEL backend (None: `policies.cel.default_backend()`)."""
    return parse_policy(read_text_file(path, "policy"), str(path), path.name, cel)


def parse_policy(
    text: str, source: str, name: str | None = None, cel: CelBackend | str | None = None
) -> LoadedPolicy:
    """Validate policy text. `source` names it in errors; `name` is the file name, whose stem
    must be the tenant (None: not checked)."""
    root, data = compose_yaml(text, source)
    try:
        model = TenantPolicy.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(
            explain_validation(exc, root, source, TenantPolicy, key_path=rule_path)
        ) from None
    return _Compiler(model, root, source, name, get_backend(cel)).run()


class _Compiler:
    """What the model alone cannot check: tenant vs file name, group references, CEL."""

    def __init__(
        self, model: TenantPolicy, root: yaml.Node, source: str, name: str | None, cel: CelBackend
    ):
        self.model = model
        self.cel = cel
        self.root = root
        self.source = source
        self.name = name or Path(source).name
        self.check_name = name is not None
        self.problems: list[ConfigProblem] = []
        self.members = Audience(tuple(SpiffeIdPattern.parse(p) for p in model.members))
        self.groups = {
            group: Audience(tuple(SpiffeIdPattern.parse(p) for p in patterns))
            for group, patterns in model.groups.items()
        }

    def run(self) -> LoadedPolicy:
        if self.check_name and self.name != f"{self.model.tenant}{SUFFIX}":
            self.problem(
                ("tenant",),
                f"the file of tenant {self.model.tenant!r} must be named "
                f"{self.model.tenant}{SUFFIX}, not {self.name}",
            )
        rules = tuple(self.rule(key, rule) for key, rule in self.model.tools.items())
        admins = self.audience(("admins",), self.model.admins)
        if self.problems:
            self.problems.sort(key=lambda p: p.line or 0)
            raise ConfigError(self.problems)
        digest = hashlib.sha256(self.model.model_dump_json().encode()).hexdigest()
        return LoadedPolicy(
            tenant=self.model.tenant,
            source=self.source,
            name=self.name,
            digest=digest,
            model=self.model,
            members=self.members,
            groups=self.groups,
            rules=rules,
            cel=self.cel,
            admins=admins,
        )

    def rule(self, key: str, rule: ToolRule) -> CompiledRule:
        loc: Location = ("tools", key)
        where = f"{self.name}:{rule_path(loc)}"
        denies = tuple(
            DenyCheck(
                f"{where}.deny[{i}]",
                self.condition((*loc, "deny", i, "when"), deny.when),
                deny.reason,
            )
            for i, deny in enumerate(rule.deny)
        )
        approval = None
        if rule.approval is not None:
            a = rule.approval
            approval = ApprovalCheck(
                f"{where}.approval",
                self.condition((*loc, "approval", "when"), a.when),
                self.audience((*loc, "approval", "approvers"), a.approvers),
                a.expires_seconds,
                a.allow_self,
            )
        callers = self.audience((*loc, "call"), rule.call)
        visible = callers if rule.list_ is None else self.audience((*loc, "list"), rule.list_)
        obligations = rule.obligations.model_dump(exclude_none=True) if rule.obligations else {}
        return CompiledRule(
            key=key,
            where=where,
            visible=visible,
            list_explicit=rule.list_ is not None,
            callers=callers,
            when=self.condition((*loc, "when"), rule.when),
            denies=denies,
            approval=approval,
            obligations=obligations,
        )

    def audience(self, loc: Location, references: list[str]) -> Audience:
        patterns: list[SpiffeIdPattern] = []
        for index, ref in enumerate(references):
            if not ref.startswith(GROUP_PREFIX):
                patterns.append(SpiffeIdPattern.parse(ref))
                continue
            group = ref[len(GROUP_PREFIX) :]
            if group == MEMBERS_GROUP:
                patterns.extend(self.members.patterns)
            elif group in self.groups:
                patterns.extend(self.groups[group].patterns)
            else:
                known = [MEMBERS_GROUP, *self.groups]
                self.problem(
                    (*loc, index),
                    f"no group {group!r} in this file" + suggest(group, known),
                )
        return Audience(tuple(dict.fromkeys(patterns)))  # without repeats, in order

    def condition(self, loc: Location, text: str | None) -> Condition | None:
        if text is None:
            return None
        try:
            return compile_condition(text, self.cel)
        except CelCompileError as exc:
            self.problem(loc, f"{exc} (in `{_shorten(text)}`)")
            return None

    def problem(self, loc: Location, message: str) -> None:
        line, _ = locate_node(self.root, loc)
        self.problems.append(ConfigProblem(self.source, line, rule_path(loc), message))


def rule_path(loc: Location) -> str:
    """`("tools", "add", "deny", 0)` -> `tools[add].deny[0]`: tool keys are bracketed because
    they may contain dots (`db.query`) and glob characters."""
    if len(loc) >= 2 and loc[0] == "tools":
        rest = format_location(loc[2:])
        head = f"tools[{loc[1]}]"
        return head + ("" if not rest else rest if rest.startswith("[") else f".{rest}")
    return format_location(loc)


def _shorten(text: str, limit: int = 60) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------
# `policy check`


def check_paths(paths: Iterable[str | Path], cel: CelBackend | str | None = None) -> list[str]:
    """Validate policy files and directories of them; one line per problem (none: all good)."""
    lines: list[str] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            files = _policy_files(path)
            if not files:
                lines.append(f"{path}: no *{SUFFIX} policy files in this directory")
        elif path.exists():
            files = [path]
        else:
            lines.append(f"{path}: no such file or directory")
            continue
        for file in files:
            try:
                load_policy_file(file, cel)
            except ConfigError as exc:
                lines.extend(str(p) for p in exc.problems)
    return lines


def _policy_files(directory: Path) -> list[Path]:
    # Hidden files are editors' swap and temporary files, not policies.
    return sorted(
        p
        for p in directory.iterdir()
        if p.name.endswith(SUFFIX) and not p.name.startswith(".") and p.is_file()
    )


# ---------------------------------------------------------------------------------------------
# the store, with hot reload


@dataclass
class RefreshReport:
    loaded: list[str] = field(default_factory=list)  # tenants (re)loaded
    removed: list[str] = field(default_factory=list)  # tenants whose file is gone
    failed: dict[str, str] = field(default_factory=dict)  # file name -> error (old one kept)

    @property
    def changed(self) -> bool:
        return bool(self.loaded or self.removed)


class PolicyStore:
    """The policies in force, one per tenant, from a directory of `<tenant>.yaml` files.

    Readers (`get`) never block: `refresh` builds a new table and swaps it in whole."""

    def __init__(self, directory: Path, cel: CelBackend | str | None = None) -> None:
        self.directory = directory
        self.cel = get_backend(cel)  # resolved once: every file of the store uses one backend
        self._policies: dict[str, LoadedPolicy] = {}
        self._digests: dict[str, str] = {}  # file name -> digest of the text last read
        self._errors: dict[str, ConfigError] = {}  # file name -> why its last change failed
        self._lock = threading.Lock()  # one refresh at a time
        self.generation = 0  # bumped whenever the policies in force change
        self.reload_failures = 0  # for a metric: how many changed files were refused

    @classmethod
    def open(
        cls, directory: Path, *, strict: bool = True, cel: CelBackend | str | None = None
    ) -> PolicyStore:
        """Load every file; with `strict`, any broken file is an error (for start-up)."""
        store = cls(directory, cel)
        store.refresh()
        if strict and store._errors:
            raise ConfigError([p for e in store._errors.values() for p in e.problems])
        return store

    def get(self, tenant: str) -> LoadedPolicy | None:
        return self._policies.get(tenant)

    def tenants(self) -> list[str]:
        return sorted(self._policies)

    def file_errors(self) -> dict[str, list[str]]:
        """Why each refused file's last change failed, one line per problem, by file name
        ("" for the directory itself); for the admin API's policy status."""
        errors = dict(self._errors)
        return {name: [str(p) for p in errors[name].problems] for name in sorted(errors)}

    def problems(self) -> list[str]:
        """Current errors, one line each (file:line: key: message), for `/readyz` and logs."""
        return [str(p) for name in sorted(self._errors) for p in self._errors[name].problems]

    def refresh(self) -> RefreshReport:
        with self._lock:
            return self._refresh()

    def _refresh(self) -> RefreshReport:
        report = RefreshReport()
        policies = dict(self._policies)
        try:
            files = {p.name: p for p in _policy_files(self.directory)}
            self._errors.pop("", None)
        except OSError as exc:
            # Fail closed: with no readable directory, no tenant keeps any access.
            files = {}
            error = ConfigError.at(str(self.directory), None, None, f"cannot read: {exc}")
            if "" not in self._errors:
                log.error("policy directory: %s", error)
            self._errors[""] = error
        for name in sorted(set(self._digests) - set(files)):
            self._forget(name, policies, report)
        for name, path in sorted(files.items()):
            try:
                text = path.read_bytes()
            except FileNotFoundError:  # deleted since the listing
                self._forget(name, policies, report)
                continue
            except OSError as exc:
                self._fail(name, ConfigError.at(str(path), None, None, f"cannot read: {exc}"))
                report.failed[name] = str(self._errors[name])
                continue
            digest = hashlib.sha256(text).hexdigest()
            if self._digests.get(name) == digest:
                continue  # unchanged (if it was broken, its error stands)
            self._digests[name] = digest
            try:
                policy = parse_policy(_decode(text, str(path)), str(path), name, self.cel)
            except ConfigError as exc:
                self._fail(name, exc)
                report.failed[name] = str(exc)
                continue
            self._errors.pop(name, None)
            policies[policy.tenant] = policy
            report.loaded.append(policy.tenant)
            log.info("policy of tenant %s loaded from %s", policy.tenant, path)
        if report.changed:
            self._policies = policies  # one assignment: readers see the old or the new table
            self.generation += 1
        return report

    def _forget(self, name: str, policies: dict[str, LoadedPolicy], report: RefreshReport) -> None:
        self._digests.pop(name, None)
        self._errors.pop(name, None)
        tenant = name.removesuffix(SUFFIX)
        if policies.pop(tenant, None) is not None:
            report.removed.append(tenant)
            log.warning("policy file %s is gone: tenant %s has no access now", name, tenant)

    def _fail(self, name: str, error: ConfigError) -> None:
        self._errors[name] = error
        self.reload_failures += 1
        kept = "the last good version stays in force" if self.get(_stem(name)) else "not loaded"
        log.error("policy file %s refused (%s):\n%s", name, kept, error)


def _stem(name: str) -> str:
    return name.removesuffix(SUFFIX)


def _decode(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError.at(source, None, None, f"not UTF-8 text ({exc.reason})") from None


def valid_tenant(name: str) -> bool:
    return TENANT_NAME_RE.fullmatch(name) is not None
