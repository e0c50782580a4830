"""Checks that need more than one agent or the outside world.

Duplicate names, ``after`` references and cycles, two agents splitting one
stream's group, missing working directories, commands not on PATH, and handlers
that cannot be imported or are not async callables. Handlers are imported in a
child interpreter (one per working directory and env) with a deadline, so a
broken or hanging agent module can neither pollute nor hang ``check`` or the
daemon.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from supervisor.config.cluster import cluster_warnings
from supervisor.config.errors import Loc
from supervisor.config.models import AgentConfig
from supervisor.config.patterns import overlap_warnings

Problem = tuple[Loc, str]

IMPORT_TIMEOUT = 30.0

# Runs in a child interpreter: reads {"dir": ..., "handlers": [[key, spec], ...]} on
# stdin, answers {key: error-or-null} as JSON on the original stdout (the agent
# modules' own prints are sent to stderr so they cannot corrupt the answer).
_IMPORT_PROBE = r"""
import importlib, inspect, json, os, sys
answer = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
request = json.load(sys.stdin)
sys.path.insert(0, request["dir"])

def first_line(exc):
    text = str(exc).strip().splitlines()
    return type(exc).__name__ + (": " + text[0] if text else "")

def is_async(obj):
    if inspect.iscoroutinefunction(obj):
        return True
    call = getattr(type(obj), "__call__", None)
    return not inspect.isroutine(obj) and inspect.iscoroutinefunction(call)

results = {}
for key, spec in request["handlers"]:
    module_name, _, attr = spec.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except BaseException as exc:
        results[key] = "cannot import %r: %s" % (module_name, first_line(exc))
        continue
    try:
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        results[key] = "module %r has no attribute %r" % (module_name, attr)
        continue
    if is_async(obj):
        results[key] = None
    elif callable(obj):
        results[key] = "%r is not an async callable (define it with 'async def')" % spec
    else:
        results[key] = "%r is not callable (type %s)" % (spec, type(obj).__name__)
json.dump(results, answer)
answer.flush()
"""


def check_agents(
    agents: dict[int, AgentConfig], known_names: set[str], *, check_imports: bool
) -> list[Problem]:
    """Every cross-agent and outside-world problem of the validated ``agents``.

    ``agents`` maps the index in the file to the agent (agents that failed
    validation are absent); ``known_names`` holds every name written in the
    file, so a broken agent does not also make each ``after`` naming it fail.
    """
    problems: list[Problem] = []
    problems += _duplicate_names(agents)
    problems += _after_references(agents, known_names)
    problems += _shared_groups(agents)
    runnable = {}
    for index, agent in agents.items():
        problem = _working_dir_problem(index, agent)
        if problem is not None:
            problems.append(problem)
        else:
            runnable[index] = agent
    problems += _command_problems(runnable)
    if check_imports:
        problems += _handler_problems(runnable)
    return sorted(problems, key=lambda p: _sort_key(p[0]))


def check_fleet_size(agents: dict[int, AgentConfig], max_workers: int) -> list[Problem]:
    """The sum of every agent's replicas against ``[supervisor] max_workers``."""
    total = sum(agent.replicas for agent in agents.values())
    if total <= max_workers:
        return []
    return [
        (
            ("supervisor", "max_workers"),
            f"the agents ask for {total} workers, more than max_workers ({max_workers}); "
            "lower replicas or raise max_workers",
        )
    ]


def check_agent_warnings(agents: dict[int, AgentConfig]) -> list[Problem]:
    """Legal but probably unintended settings: reported, never fatal.

    ``after`` naming an agent with ``replicas = 0`` counts as satisfied at once
    (the daemon must not wait forever), so the ordering it asks for does nothing;
    stream patterns of two agents overlapping in one group split entries.
    """
    zero = {a.name for a in agents.values() if a.replicas == 0}
    warnings: list[Problem] = overlap_warnings(agents)
    for index, agent in sorted(agents.items()):
        for other in agent.after:
            if other in zero and other != agent.name:
                warnings.append(
                    (
                        ("agents", index, "after"),
                        f"{other!r} has replicas = 0, so waiting for it does nothing",
                    )
                )
    return warnings + cluster_warnings(agents)


def _sort_key(loc: Loc) -> tuple[str, int]:
    return (str(loc[0]), loc[1] if len(loc) > 1 and isinstance(loc[1], int) else -1)


def _duplicate_names(agents: dict[int, AgentConfig]) -> list[Problem]:
    first: dict[str, int] = {}
    problems: list[Problem] = []
    for index, agent in sorted(agents.items()):
        if agent.name in first:
            problems.append(
                (
                    ("agents", index, "name"),
                    f"duplicate agent name {agent.name!r} (also agents[{first[agent.name]}])",
                )
            )
        else:
            first[agent.name] = index
    return problems


def _after_references(agents: dict[int, AgentConfig], known_names: set[str]) -> list[Problem]:
    problems: list[Problem] = []
    for index, agent in sorted(agents.items()):
        for other in agent.after:
            if other == agent.name:
                problems.append((("agents", index, "after"), "an agent cannot wait for itself"))
            elif other not in known_names:
                problems.append((("agents", index, "after"), f"unknown agent {other!r}"))
    cycle = find_cycle({a.name: [n for n in a.after if n != a.name] for a in agents.values()})
    if cycle:
        index = next(i for i, a in sorted(agents.items()) if a.name == cycle[0])
        problems.append((("agents", index, "after"), "cycle: " + " -> ".join(cycle)))
    return problems


def find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    """One dependency cycle as ``[a, b, ..., a]``, or None. Deterministic (sorted walk)."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in graph.get(node, []):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _shared_groups(agents: dict[int, AgentConfig]) -> list[Problem]:
    """Two agents reading one stream in one group would silently split its entries."""
    owner: dict[tuple[str, str], int] = {}
    problems: list[Problem] = []
    for index, agent in sorted(agents.items()):
        for stream in agent.read_streams:
            key = (agent.group, stream)
            if key in owner and agents[owner[key]].name != agent.name:
                other = agents[owner[key]]
                problems.append(
                    (
                        ("agents", index, "group"),
                        f"group {agent.group!r} on stream {stream!r} is also used by agent "
                        f"{other.name!r} (agents[{owner[key]}]); they would split its entries",
                    )
                )
                break
            owner.setdefault(key, index)
    return problems


def _working_dir_problem(index: int, agent: AgentConfig) -> Problem | None:
    if agent.working_dir is None or agent.working_dir.is_dir():
        return None
    shown = os.path.normpath(agent.working_dir)
    return (("agents", index, "working_dir"), f"directory {shown!r} not found")


def _command_problems(agents: dict[int, AgentConfig]) -> list[Problem]:
    problems: list[Problem] = []
    for index, agent in sorted(agents.items()):
        if agent.command is None:
            continue
        message = command_problem(agent.command[0], agent)
        if message:
            problems.append((("agents", index, "command"), message))
    return problems


def command_problem(program: str, agent: AgentConfig) -> str | None:
    """Why ``program`` cannot be started for ``agent``, or None when it can."""
    if "/" in program:
        path = Path(program).expanduser()
        if not path.is_absolute() and agent.working_dir is not None:
            path = agent.working_dir / path
        shown = os.path.normpath(path)
        if not path.exists():
            return f"program {program!r} not found ({shown})"
        if not path.is_file() or not os.access(path, os.X_OK):
            return f"program {program!r} is not an executable file ({shown})"
        return None
    search = agent.env.get("PATH", os.environ.get("PATH", os.defpath))
    if shutil.which(program, path=search) is None:
        return f"program {program!r} not found on PATH"
    return None


def _handler_problems(agents: dict[int, AgentConfig]) -> list[Problem]:
    """Import every handler: one child interpreter per (working_dir, env), all in parallel."""
    batches: dict[tuple[str, tuple[tuple[str, str], ...]], list[tuple[int, str]]] = {}
    for index, agent in sorted(agents.items()):
        if agent.handler is None:
            continue
        workdir = str(agent.working_dir or Path.cwd())
        key = (workdir, tuple(sorted(agent.env.items())))
        batches.setdefault(key, []).append((index, agent.handler))
    jobs = [(workdir, dict(env), handlers) for (workdir, env), handlers in batches.items()]
    answers = _probe_all(jobs)
    return [
        (("agents", index, "handler"), message)
        for index, message in sorted(answers.items())
        if message is not None
    ]


_Job = tuple[str, dict[str, str], list[tuple[int, str]]]


def _probe_all(jobs: list[_Job]) -> dict[int, str | None]:
    """Run the probes concurrently; a crashed batch is retried one handler at a time
    so the culprit (``os._exit`` at import, a segfault) is named, not its neighbours."""
    started = [(job, _start_probe(job)) for job in jobs]
    results: dict[int, str | None] = {}
    retry: list[_Job] = []
    for (workdir, env, handlers), (proc, request) in started:
        answers, failure = _finish_probe(proc, request)
        if answers is not None:
            results.update({index: answers.get(str(index)) for index, _ in handlers})
        elif failure is not None and len(handlers) > 1:
            retry.extend((workdir, env, [handler]) for handler in handlers)
        else:
            results.update(dict.fromkeys((index for index, _ in handlers), failure))
    if retry:
        results.update(_probe_all(retry))
    return results


def _start_probe(job: _Job) -> tuple[subprocess.Popen[bytes], bytes]:
    workdir, env, handlers = job
    request = {"dir": workdir, "handlers": [[str(index), spec] for index, spec in handlers]}
    proc = subprocess.Popen(
        [sys.executable, "-c", _IMPORT_PROBE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=workdir,
        env={**os.environ, **env},
        start_new_session=True,  # own process group: a timeout kills what it spawned too
    )
    return proc, json.dumps(request).encode()


def _finish_probe(
    proc: subprocess.Popen[bytes], request: bytes
) -> tuple[dict[str, str | None] | None, str | None]:
    """``(answers, None)`` on success, ``(None, reason)`` on a crash or timeout."""
    try:
        out, err = proc.communicate(request, timeout=IMPORT_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return None, f"import check timed out after {IMPORT_TIMEOUT:g}s"
    with contextlib.suppress(ValueError):
        answers = json.loads(out)
        if isinstance(answers, dict):
            return answers, None
    lines = err.decode(errors="replace").strip().splitlines()
    last = lines[-1] if lines else f"exit code {proc.returncode}"
    return None, f"import check failed: {last}"
