"""load_config: invalid files give exact one-line problems; valid files resolve fully."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from supervisor.config.load import ConfigError, load_config
from supervisor.config.models import AgentConfig, RedisConfig

CONFIGS = Path(__file__).resolve().parent / "configs"
INVALID = sorted((CONFIGS / "invalid").glob("*.toml"))
ROOT = Path(__file__).resolve().parent.parent


def expected_problems(path: Path, label: str) -> list[str]:
    """The ``# expect:`` lines of a fixture, prefixed with the path as passed."""
    lines = []
    for line in path.read_text().splitlines():
        if line.startswith("# expect: "):
            text = line.removeprefix("# expect: ").replace("{configs}", str(CONFIGS))
            lines.append(f"{label}: {text}")
    return lines


def problems_of(path: str | Path, **kwargs: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, **kwargs)  # type: ignore[arg-type]
    return info.value.problems


def test_there_are_enough_invalid_fixtures() -> None:
    """The issue asks for 20+ invalid config files, each with its expected lines."""
    assert len(INVALID) >= 20
    for path in INVALID:
        assert expected_problems(path, "x"), f"{path.name} has no '# expect:' line"


@pytest.mark.parametrize("path", INVALID, ids=[p.stem for p in INVALID])
def test_invalid_fixture_reports_exact_lines(path: Path) -> None:
    """Each invalid fixture yields exactly its expected one-line problems, in file order."""
    assert problems_of(path) == expected_problems(path, str(path))


def test_problem_lines_use_the_path_as_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative path stays relative in the messages (``fleet.toml: agents[0]...``)."""
    (tmp_path / "fleet.toml").write_text(
        '[[agents]]\nname = "a"\ncommand = ["sh"]\nreplicas = -1\n'
    )
    monkeypatch.chdir(tmp_path)
    assert problems_of("fleet.toml", check_imports=False) == [
        "fleet.toml: agents[0].replicas: must be >= 0"
    ]


def test_missing_file_is_one_line(tmp_path: Path) -> None:
    """A missing file is a single problem, not an OSError."""
    path = tmp_path / "nope.toml"
    assert problems_of(path) == [f"{path}: file not found"]


def test_directory_instead_of_file(tmp_path: Path) -> None:
    """Passing a directory is reported, not raised as IsADirectoryError."""
    assert problems_of(tmp_path) == [f"{tmp_path}: is a directory, expected a TOML file"]


def test_not_utf8(tmp_path: Path) -> None:
    """Binary junk is one readable problem."""
    path = tmp_path / "bin.toml"
    path.write_bytes(b"name = \xff\xfe\n")
    assert problems_of(path) == [f"{path}: not UTF-8 text (byte 7)"]


# -- valid files ------------------------------------------------------------------------------


def test_valid_fixture_resolves_everything() -> None:
    """Defaults are inherited, agent values win, env tables merge, paths are absolute."""
    config = load_config(CONFIGS / "valid.toml")
    assert config.config_dir == CONFIGS
    assert len(config.hash) == 64
    assert config.supervisor.name == "test-sup"
    assert config.supervisor.state_dir == CONFIGS / ".ag1"
    assert config.supervisor.stop_timeout == 3.0
    assert config.http.host == "127.0.0.1" and config.http.port == 0
    assert config.redis.namespace == "T1"
    assert [a.name for a in config.agents] == ["echo", "obj", "sharded-one", "script"]

    echo = config.agent("echo")
    assert echo.kind == "handler"
    assert echo.restart == "on-failure"  # from [defaults]
    assert echo.claim_idle == 120.0
    assert echo.group == "echo"
    assert echo.streams == ["T1:agent:echo:inbox"]  # default inbox uses the namespace
    assert echo.dlq_stream == "T1:dlq:echo"
    assert echo.working_dir == CONFIGS
    assert echo.sweep_interval == 5.0  # the supervisor's
    assert echo.stop_timeout == 10.0  # agent default, not the supervisor's
    assert echo.worker_names() == ["echo/0", "echo/1", "echo/2"]

    assert config.agent("obj").env == {"SHARED": "1", "OWN": "2"}

    sharded = config.agent("sharded-one")
    assert sharded.kind == "command"
    assert sharded.memory_limit == 256 * 1024**2
    assert sharded.watchdog == 10.0
    assert sharded.read_streams == [f"T1:agent:sharded-one:inbox:shard:{i}" for i in range(4)]

    script = config.agent("script")
    assert script.replicas == 0
    assert script.stop_timeout == 1.5
    assert script.group == "scripts"
    assert script.read_streams == ["T1:custom:a", "T1:custom:b"]
    assert script.dlq_stream == "T1:dlq:scripts"
    with pytest.raises(KeyError):
        config.agent("ghost")


def test_minimal_file_uses_documented_defaults(tmp_path: Path) -> None:
    """An empty file is a valid fleet with no agents and every documented default."""
    path = tmp_path / "fleet.toml"
    path.write_text("")
    config = load_config(path, environ={})
    assert config.agents == []
    assert config.redis.url == "redis://127.0.0.1:6379/0"
    assert config.http.listen == "127.0.0.1:8765"
    assert config.supervisor.log_format == "auto"
    assert config.defaults.restart == "always"
    assert config.defaults.backoff_initial == 0.5
    assert config.http.max_body == 64 * 1024
    assert config.supervisor.state_dir == tmp_path / ".ag1"


def test_models_are_frozen() -> None:
    """Loaded configs cannot be mutated behind the plan's back."""
    config = load_config(CONFIGS / "valid.toml", check_imports=False)
    with pytest.raises(ValidationError):
        config.agents[0].replicas = 9  # type: ignore[misc]


def test_agent_built_directly_gets_derived_defaults() -> None:
    """Tests elsewhere can build an AgentConfig by hand: group and inbox are derived."""
    agent = AgentConfig(name="x", handler="m:f")
    assert agent.group == "x"
    assert agent.streams == ["AG1:agent:x:inbox"]
    assert agent.dlq_stream == "AG1:dlq:x"
    assert agent.working_dir is None


def test_import_check_can_be_skipped(tmp_path: Path) -> None:
    """check_imports=False accepts a handler that does not exist (daemon reload paths)."""
    path = tmp_path / "fleet.toml"
    path.write_text('[[agents]]\nname = "a"\nhandler = "nowhere:handle"\n')
    assert load_config(path, check_imports=False).agent("a").handler == "nowhere:handle"
    assert problems_of(path) == [
        f"{path}: agents[0].handler: cannot import 'nowhere': "
        "ModuleNotFoundError: No module named 'nowhere'"
    ]


def test_import_check_does_not_pollute_this_process(tmp_path: Path) -> None:
    """Handler modules are imported in a child interpreter, never in the caller."""
    import sys

    (tmp_path / "only_in_child_mod.py").write_text("async def handle(e):\n    return None\n")
    path = tmp_path / "fleet.toml"
    path.write_text('[[agents]]\nname = "a"\nhandler = "only_in_child_mod:handle"\n')
    load_config(path)
    assert "only_in_child_mod" not in sys.modules
    assert str(tmp_path) not in sys.path


def test_import_uses_agent_env(tmp_path: Path) -> None:
    """The handler is imported with the agent's env, as the worker will run it."""
    (tmp_path / "needs_env.py").write_text(
        "import os\nassert os.environ.get('NEEDED') == 'yes', 'NEEDED unset'\n"
        "async def handle(e):\n    return None\n"
    )
    path = tmp_path / "fleet.toml"
    path.write_text(
        '[[agents]]\nname = "a"\nhandler = "needs_env:handle"\nenv = { NEEDED = "yes" }\n'
        '[[agents]]\nname = "b"\nhandler = "needs_env:handle"\n'
    )
    assert problems_of(path) == [
        f"{path}: agents[1].handler: cannot import 'needs_env': AssertionError: NEEDED unset"
    ]


def test_command_relative_to_working_dir(tmp_path: Path) -> None:
    """A command with a slash is resolved against working_dir; it must be executable."""
    (tmp_path / "run.sh").write_text("#!/bin/sh\n")
    path = tmp_path / "fleet.toml"
    path.write_text('[[agents]]\nname = "a"\ncommand = ["./run.sh"]\n')
    assert problems_of(path) == [
        f"{path}: agents[0].command: program './run.sh' is not an executable file "
        f"({tmp_path}/run.sh)"
    ]
    (tmp_path / "run.sh").chmod(0o755)
    assert load_config(path).agent("a").command == ["./run.sh"]


def test_command_uses_agent_path(tmp_path: Path) -> None:
    """The agent's own PATH decides whether a bare program name is found."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    tool = bindir / "my-tool"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    path = tmp_path / "fleet.toml"
    path.write_text(
        f'[[agents]]\nname = "a"\ncommand = ["my-tool"]\nenv = {{ PATH = "{bindir}" }}\n'
    )
    assert load_config(path).agent("a").command == ["my-tool"]


# -- environment overrides ----------------------------------------------------------------


def test_env_overrides_sections_and_agents_by_name() -> None:
    """AG1_<SECTION>__<KEY> and AG1_AGENTS__<NAME>__<KEY> override the file."""
    config = load_config(
        CONFIGS / "valid.toml",
        environ={
            "AG1_REDIS__URL": "redis://cache.internal:6400/1",
            "AG1_HTTP__LISTEN": "0.0.0.0:9000",
            "AG1_SUPERVISOR__NAME": "from-env",
            "AG1_DEFAULTS__RESTART": "never",
            "AG1_AGENTS__SHARDED_ONE__REPLICAS": "5",
            "ag1_agents__echo__stop_timeout": "250ms",  # case-insensitive
            "AG1_AGENTS__ECHO__SUCCESS_EXIT_CODES": "[0, 3]",  # JSON for lists
            "AG1_AGENTS__OBJ__ENV__Mixed_Case": "kept",
            "AG1_CONFIG": "ignored.toml",  # not a section: belongs to the CLI
            "AG1_AGENT": "echo",  # worker env, not an override
        },
    )
    assert config.redis.url == "redis://cache.internal:6400/1"
    assert config.http.port == 9000
    assert config.supervisor.name == "from-env"
    assert config.agent("echo").restart == "never"
    assert config.agent("sharded-one").replicas == 5
    assert config.agent("echo").stop_timeout == 0.25
    assert config.agent("echo").success_exit_codes == [0, 3]
    assert config.agent("obj").env == {"SHARED": "1", "OWN": "2", "Mixed_Case": "kept"}


def test_env_values_are_validated_and_named() -> None:
    """A bad env value is reported with the variable's name and the field path."""
    problems = problems_of(
        CONFIGS / "valid.toml",
        environ={
            "AG1_AGENTS__ECHO__REPLICAS": "-1",
            "AG1_HTTP__LISTEN": "nowhere",
            "AG1_REDIS__URLL": "redis://x",
            "AG1_DEFAULTS__WATCHDOG": "10",
            "AG1_AGENTS__GHOST__REPLICAS": "2",
            "AG1_AGENTS__ECHO__COMMAND": "[broken",
        },
        check_imports=False,
    )
    assert problems == [
        "AG1_AGENTS__ECHO__COMMAND: invalid JSON value: Expecting value at column 2",
        "AG1_AGENTS__GHOST__REPLICAS: no agent matches 'GHOST' (agents, as written in "
        "variables: ECHO, OBJ, SCRIPT, SHARDED_ONE)",
        "AG1_REDIS__URLL: redis.urll: unknown key (did you mean 'url'?)",
        "AG1_HTTP__LISTEN: http.listen: invalid listen address 'nowhere': expected "
        "host:port, e.g. '127.0.0.1:8765' or '[::1]:8765'",
        "AG1_DEFAULTS__WATCHDOG: defaults.watchdog: invalid duration '10': missing unit, "
        "e.g. '10s'",
        "AG1_AGENTS__ECHO__REPLICAS: agents[0].replicas: must be >= 0",
    ]


def test_password_only_from_environment_and_never_shown() -> None:
    """AG1_REDIS__PASSWORD wins over REDIS_PASSWORD; effective_url inserts it; repr hides it."""
    config = load_config(
        CONFIGS / "valid.toml",
        environ={"AG1_REDIS__PASSWORD": "s3cr3t/x", "REDIS_PASSWORD": "other"},
        check_imports=False,
    )
    assert config.redis.password is not None
    assert config.redis.effective_url() == "redis://:s3cr3t%2Fx@127.0.0.1:6390/2"
    assert "s3cr3t" not in repr(config)
    assert "s3cr3t" not in config.redis.redacted_url()
    assert config.redis.redacted_url() == "redis://:***@127.0.0.1:6390/2"

    plain = load_config(
        CONFIGS / "valid.toml", environ={"REDIS_PASSWORD": "other"}, check_imports=False
    )
    assert plain.redis.effective_url() == "redis://:other@127.0.0.1:6390/2"


def test_password_inside_env_url_is_moved_out_of_the_url() -> None:
    """A URL with credentials from the environment keeps the user, hides the password."""
    config = load_config(
        CONFIGS / "valid.toml",
        environ={"AG1_REDIS__URL": "redis://app:pw@db.internal:6390/0"},
        check_imports=False,
    )
    assert config.redis.url == "redis://app@db.internal:6390/0"
    assert config.redis.effective_url() == "redis://app:pw@db.internal:6390/0"
    assert "pw" not in repr(config.redis).replace("password", "")


def test_embedded_effective_url_needs_the_running_server() -> None:
    """For url = "embedded" the caller supplies the started server's URL."""
    redis = RedisConfig(url="embedded")
    assert redis.embedded
    with pytest.raises(ValueError):
        redis.effective_url()
    assert redis.effective_url("redis://127.0.0.1:41000/0") == "redis://127.0.0.1:41000/0"


def test_http_token_only_from_environment(tmp_path: Path) -> None:
    """The control token is a secret: refused in the file, read from AG1_HTTP__TOKEN."""
    path = tmp_path / "fleet.toml"
    path.write_text('[http]\ntoken = "abc"\n')
    assert problems_of(path) == [
        f"{path}: http.token: secrets are not allowed in the file; set AG1_HTTP__TOKEN or "
        "AG1_CONTROL_TOKEN in the environment"
    ]
    path.write_text('[http]\nlisten = "0.0.0.0:8765"\n')
    config = load_config(path, environ={"AG1_HTTP__TOKEN": "abc"})
    assert config.http.token is not None and config.http.token.get_secret_value() == "abc"
    assert not config.http.loopback_only
    fallback = load_config(path, environ={"AG1_CONTROL_TOKEN": "def"})
    assert fallback.http.token is not None and fallback.http.token.get_secret_value() == "def"


# -- the shipped example ------------------------------------------------------------------------


def test_example_file_is_valid() -> None:
    """fleet.example.toml loads; it runs the example fleet on an embedded Redis."""
    examples_ready = (ROOT / "examples" / "echo.py").exists()
    config = load_config(ROOT / "fleet.example.toml", environ={}, check_imports=examples_ready)
    assert config.redis.embedded
    assert {a.name: a.replicas for a in config.agents} == {
        "echo": 2,
        "summarizer": 2,
        "planner": 1,
        "flaky": 1,
        "shell-agent": 1,
    }
    assert config.agent("planner").after == ["summarizer"]
    assert config.agent("flaky").max_deliveries == 3
    assert config.agent("shell-agent").command == ["sh", "examples/shell_agent.sh"]
    assert all(a.working_dir == ROOT for a in config.agents)
    if not examples_ready:
        pytest.skip("examples/echo.py not written yet: handler imports not checked")


def test_handler_import_that_hangs_is_cut_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A module that never finishes importing is killed at the deadline and reported."""
    from supervisor.config import checks as config_checks

    monkeypatch.setattr(config_checks, "IMPORT_TIMEOUT", 1.0)
    (tmp_path / "hangs.py").write_text("import time\ntime.sleep(60)\n")
    path = tmp_path / "fleet.toml"
    path.write_text('[[agents]]\nname = "a"\nhandler = "hangs:handle"\n')
    assert problems_of(path) == [f"{path}: agents[0].handler: import check timed out after 1s"]


def test_crashing_import_blames_only_its_agent(tmp_path: Path) -> None:
    """A module that kills the interpreter at import does not fail its batch neighbours."""
    (tmp_path / "dies.py").write_text("import os\nos._exit(3)\n")
    (tmp_path / "fine.py").write_text("async def handle(e):\n    return None\n")
    path = tmp_path / "fleet.toml"
    path.write_text(
        '[[agents]]\nname = "a"\nhandler = "fine:handle"\n'
        '[[agents]]\nname = "b"\nhandler = "dies:handle"\n'
    )
    assert problems_of(path) == [f"{path}: agents[1].handler: import check failed: exit code 3"]


def test_password_in_unix_socket_query_is_refused(tmp_path: Path) -> None:
    """unix:// URLs carry credentials in the query; those are secrets too."""
    path = tmp_path / "fleet.toml"
    path.write_text('[redis]\nurl = "unix:///run/redis.sock?db=1&password=x"\n')
    assert problems_of(path) == [
        f"{path}: redis.url: contains a password; remove it and set AG1_REDIS__PASSWORD or "
        "REDIS_PASSWORD in the environment"
    ]
    path.write_text('[redis]\nurl = "unix:///run/redis.sock?db=1"\n')
    config = load_config(path, environ={"REDIS_PASSWORD": "p w"})
    assert config.redis.effective_url() == "unix:///run/redis.sock?db=1&password=p%20w"
