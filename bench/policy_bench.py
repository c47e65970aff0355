"""Policy benchmark: what one decision costs, for a realistic tenant file, under each CEL backend.

The file has 20 tools with 5 conditional rules each (a `when` on the arguments, three deny
rules and an approval rule, all over `args`), group references in `call`, obligations, and a
`"*"` rule whose caller-only deny applies to every tool. Measured in this process:
- `decide` p50/p99 in µs for an allowed call (every condition evaluated: the worst case), an
  approved one, and one refused by its first deny rule;
- the dispatcher's path per call: `may_list` then `check_call`;
- one condition alone, with the variables already bound and with binding included, and through
  cel-python's own `InterpretedRunner` (which rebuilds its activation every time);
- the time to load and compile the file;
- admission (`policies.limits`): admit, bind to a task and release, with rate, concurrency and
  budget limits all set, alone and after the decision as `Dispatcher.submit` does it.
Every measurement is taken once per CEL backend (`policies.cel.BACKENDS`) in the same run, and
`ratio_to_target` divides each backend's p50 (decision plus admission) by the target. The
issue's target is at most 500 µs p50 per decision including admission. Prints one JSON
document; `--out FILE` also writes it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import celpy

from identity.principal import Principal
from policies.cel import (
    BACKENDS,
    CEL_PYTHON,
    DEFAULT_BACKEND,
    Bindings,
    compile_condition,
    evaluate,
)
from policies.evaluator import PolicyEngine
from policies.limits import Admission
from policies.loader import PolicyStore, parse_policy

TARGET_P50_US = 500.0
TOOLS = 20
CALLER = Principal(id="spiffe://acme.test/agents/billing/worker", tenant="acme", via="mtls")


def policy_text(tools: int = TOOLS) -> str:
    lines = [
        "tenant: acme",
        "members: [spiffe://acme.test/**]",
        "groups:",
        "  ops: [spiffe://acme.test/people/ops/*]",
        "  billing: [spiffe://acme.test/agents/billing/*]",
        "  approvers: [spiffe://acme.test/people/boss]",
        "tools:",
        '  "*":',
        "    deny:",
        "      - when: \"caller.path.startsWith('/quarantine/')\"",
        "        reason: quarantined",
        "    obligations: {audit: standard, timeout_seconds: 60}",
    ]
    for i in range(tools):
        lines += [
            f"  tool_{i:02d}:",
            "    call: [group:billing, group:ops]",
            f"    when: \"args.amount <= {10_000 + i} && args.currency in ['EUR', 'USD']\"",
            "    deny:",
            "      - when: \"args.account.startsWith('frozen-')\"",
            "        reason: frozen account",
            '      - when: "has(args.note) && size(args.note) > 500"',
            "        reason: note too long",
            '      - when: "args.items.exists(item, item.qty > 100)"',
            "        reason: bulk order",
            "    approval:",
            f'      when: "args.amount > {1_000 + i}"',
            "      approvers: [group:approvers]",
            "      expires_seconds: 3600",
            "    obligations:",
            f"      timeout_seconds: {5 + i}",
            "      retry: {max_attempts: 3}",
            "      rate: {calls: 100, per_seconds: 60}",
            "      redact: [args.account]",
        ]
    return "\n".join(lines) + "\n"


def arguments(rng: random.Random, amount: tuple[int, int]) -> dict[str, Any]:
    return {
        "amount": rng.randint(*amount),
        "currency": rng.choice(["EUR", "USD"]),
        "account": f"acct-{rng.randint(0, 99999):05d}",
        "items": [{"sku": f"s{j}", "qty": rng.randint(1, 50)} for j in range(rng.randint(1, 4))],
    }


def timed(n: int, call: Callable[[int], Any]) -> list[float]:
    """Durations in seconds of `n` calls, after 50 warm-up calls; GC off while timing."""
    for i in range(50):
        call(i)
    samples = []
    gc.collect()
    gc.disable()
    try:
        for i in range(n):
            start = time.perf_counter()
            call(i)
            samples.append(time.perf_counter() - start)
    finally:
        gc.enable()
    return samples


def micro(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6, 1)

    return {
        "p50_us": pick(0.50),
        "p90_us": pick(0.90),
        "p99_us": pick(0.99),
        "mean_us": round(statistics.fmean(ordered) * 1e6, 1),
        "n": len(ordered),
    }


def run(n: int, seed: int, backends: tuple[str, ...] = BACKENDS) -> dict[str, Any]:
    per_backend = {cel: run_backend(n, seed, cel) for cel in backends}
    ratio = {
        cel: round(doc["decide"]["dispatch_decision_and_admission"]["p50_us"] / TARGET_P50_US, 4)
        for cel, doc in per_backend.items()
    }
    return {
        "bench": "policy",
        "python": platform.python_version(),
        "cel_python": _version("cel-python"),
        "cel_expr_python": _version("cel-expr-python"),
        "cpus": os.cpu_count(),
        "default_backend": DEFAULT_BACKEND,
        "target_p50_us": TARGET_P50_US,
        # p50 of (may_list + decision + admission) / target: below 1 meets the target.
        "ratio_to_target": ratio,
        "backends": per_backend,
        # Only calls whose tool has a `budget` obligation pay this (two state-store round trips
        # to the embedded sidecar, in a worker thread); the others never touch the store.
        "durable_budget_admission": durable_budget_cost(min(n, 500)),
    }


def durable_budget_cost(n: int) -> dict[str, Any]:
    """`Admission.acquire` with a budget kept in a real embedded sidecar's state store."""
    import asyncio

    from gateway.sidecar.server import SidecarThread
    from gateway.sidecar.settings import SidecarSettings
    from policies.budgets import DaprBudgets

    with tempfile.TemporaryDirectory() as tmp:
        sidecar = SidecarThread(
            SidecarSettings(db_path=Path(tmp) / "s.db", grpc_listen="127.0.0.1:0", http_listen=None)
        )
        sidecar.start()
        budgets = DaprBudgets(sidecar.grpc_address)
        admission = Admission(budgets=budgets)
        budget = {"budget": {"calls": 10**9, "per_seconds": 86400}}
        loop = asyncio.new_event_loop()
        try:

            def acquire(i: int) -> None:
                loop.run_until_complete(
                    admission.acquire(CALLER.tenant, CALLER.id, "tool_00", budget)
                )

            samples = timed(n, acquire)
        finally:
            loop.close()
            budgets.close()
            sidecar.stop()
    return {**micro(samples), "engine": "embedded sidecar, in this process (a thread)"}


def run_backend(n: int, seed: int, cel: str) -> dict[str, Any]:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        (directory / "acme.yaml").write_text(policy_text())
        start = time.perf_counter()
        store = PolicyStore.open(directory, cel=cel)
        first_load_ms = (time.perf_counter() - start) * 1000  # includes the library's start-up
        text = policy_text()
        start = time.perf_counter()
        parse_policy(text, "acme.yaml", "acme.yaml", cel)
        reload_ms = (time.perf_counter() - start) * 1000
    engine = PolicyEngine(store)
    names = [f"tool_{i:02d}" for i in range(TOOLS)]
    scenarios: dict[str, tuple[tuple[int, int], dict[str, Any], str]] = {
        # (amount range, extra arguments, expected effect)
        "allow": ((1, 1000), {}, "allow"),
        "approve": ((2000, 9000), {}, "approve"),
        "deny_first_rule": ((1, 1000), {"account": "frozen-1"}, "deny"),
    }
    results: dict[str, Any] = {}
    for label, (amounts, extra, effect) in scenarios.items():
        calls = [({**arguments(rng, amounts), **extra}, rng.choice(names)) for _ in range(n)]
        for args, tool in calls[:20]:  # the scenario is what it says it is
            got = engine.decide(CALLER, tool, args).effect
            assert got == effect, (label, got, engine.decide(CALLER, tool, args))

        def decide(i: int, calls: list[tuple[dict[str, Any], str]] = calls) -> Any:
            args, tool = calls[i % len(calls)]
            return engine.decide(CALLER, tool, args)

        results[label] = micro(timed(n, decide))

    dispatch_calls = [(arguments(rng, (1, 1000)), rng.choice(names)) for _ in range(n)]

    def dispatch_path(i: int) -> Any:
        args, tool = dispatch_calls[i % len(dispatch_calls)]
        engine.may_list(CALLER, tool)
        return engine.check_call(CALLER, tool, args)

    results["dispatch_may_list_and_check_call"] = micro(timed(n, dispatch_path))
    results["may_list"] = micro(timed(n, lambda i: engine.may_list(CALLER, names[i % TOOLS])))
    results.update(admission_costs(n, engine, dispatch_calls))

    per_eval = condition_costs(n, rng, cel)
    p50 = results["allow"]["p50_us"]
    with_admission = results["dispatch_decision_and_admission"]["p50_us"]
    return {
        "backend": cel,
        "file": {
            "tools": TOOLS,
            "conditions_per_tool": 5,
            "first_load_ms": round(first_load_ms, 1),
            "reload_ms": round(reload_ms, 1),
        },
        "decide": results,
        "condition": per_eval,
        "allow_p50_within_target": p50 <= TARGET_P50_US,
        "decision_and_admission_p50_within_target": with_admission <= TARGET_P50_US,
        "note": (
            "allow is the worst case: all 5 conditions of the tool are evaluated; "
            "dispatch_decision_and_admission adds may_list and all three limits to it"
        ),
    }


def admission_costs(
    n: int, engine: PolicyEngine, calls: list[tuple[dict[str, Any], str]]
) -> dict[str, Any]:
    """Admission per call. Simulated time moves 1 s per call, so the file's rate limit (100
    calls per 60 s per tool, 20 tools in turn) admits every call: this measures the admitted
    path, the common one, not refusals."""
    ticks = iter(range(10**9))
    admission = Admission(clock=lambda: float(next(ticks)))
    every = {
        "rate": {"calls": 100, "per_seconds": 60},
        "concurrency": {"max": 10},
        "budget": {"calls": 10**9, "per_seconds": 86400},
    }

    def admit_alone(i: int) -> None:
        tool = calls[i % len(calls)][1]
        ticket = admission.admit(CALLER.tenant, CALLER.id, tool, every, hold_seconds=120)
        admission.bind(f"task-{i}", ticket)
        admission.release(f"task-{i}")

    def decide_and_admit(i: int) -> None:
        args, tool = calls[i % len(calls)]
        engine.may_list(CALLER, tool)
        obligations = {**(engine.check_call(CALLER, tool, args) or {}), **every}
        ticket = admission.admit(CALLER.tenant, CALLER.id, tool, obligations, hold_seconds=120)
        admission.bind(f"call-{i}", ticket)
        admission.release(f"call-{i}")

    return {
        "admission_rate_concurrency_budget": micro(timed(n, admit_alone)),
        "dispatch_decision_and_admission": micro(timed(n, decide_and_admit)),
    }


def condition_costs(n: int, rng: random.Random, cel: str) -> dict[str, Any]:
    simple = compile_condition("args.amount <= 10000 && args.currency in ['EUR', 'USD']", cel)
    macro = compile_condition("args.items.exists(item, item.qty > 100)", cel)
    caller = {"id": CALLER.id, "groups": ["billing"], "chain": []}
    fixed = Bindings(caller, "tool_00", arguments(rng, (1, 1000)))
    fixed.activation(simple.backend)
    out = {
        "simple_bound_once": micro(timed(n, lambda i: evaluate(simple, fixed))),
        "macro_bound_once": micro(timed(n, lambda i: evaluate(macro, fixed))),
        "simple_with_binding": micro(
            timed(
                n,
                lambda i: evaluate(simple, Bindings(caller, "t", {"amount": i, "currency": "EUR"})),
            )
        ),
    }
    if cel != CEL_PYTHON:
        return out
    # cel-python's own runner on the same expression: what the shared activation saves.
    env = celpy.Environment()
    program = env.program(env.compile(simple.source))
    activation = {"args": celpy.json_to_cel({"amount": 5, "currency": "EUR"})}
    out["simple_celpy_runner"] = micro(timed(n, lambda i: program.evaluate(activation)))
    return out


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="decisions per scenario")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--cel", action="append", choices=BACKENDS, help="only this backend (repeatable)"
    )
    args = parser.parse_args(argv)
    doc = run(args.n, args.seed, tuple(args.cel or BACKENDS))
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
