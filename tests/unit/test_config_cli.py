"""Five layers of settings, their sources, secrets, and every kind of bad input, through
the CLI's own `main` in-process: argv, the environment and the working directory are
the ones a user's process would have, and the output and exit code are what they see.

The real binary runs a representative handful of these in tests/e2e/test_config_layers.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from bad_inputs import BAD_INPUTS, IN_PROCESS_ROWS, SUBPROCESS, assert_one_line, prepared

from asgi_supervise.config import sources
from asgi_supervise.config.settings import Settings
from conftest import config_json as _config_json
from conftest import run_main as run_cli
from conftest import setting, write_table

pytestmark = pytest.mark.timeout(30)


def config_json(*args: str, cwd: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    return _config_json(*args, cwd=cwd, env=env, runner=run_cli)


# --- precedence: default < profile < config file < environment < command line --------------

PROFILE_PATH = "conf/custom-profile.toml"  # `--profile path/to/file.toml`
PROFILE_SOURCE = f"profile {PROFILE_PATH}"

# name: (profile, file, env, flag args, expected value at each layer, default)
PRECEDENCE = {
    "workers": (2, 3, "4", ["--workers", "5"], [2, 3, 4, 5], 1),
    "graceful_timeout": (11, 12.5, "13", ["--timeout-graceful-shutdown", "14"],
                         [11, 12.5, 13, 14], 15),
    "host": (
        "10.0.0.1",
        "10.0.0.2",
        "10.0.0.3",
        ["--host", "10.0.0.4"],
        ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"],
        "127.0.0.1",
    ),
    "log_level": ("error", "warning", "debug", ["--log-level", "trace"],
                  ["error", "warning", "debug", "trace"], "info"),
    "metrics": (True, False, "true", ["--no-metrics"], [True, False, True, False], False),
    "forwarded_allow_ips": (
        ["10.0.0.1"],
        ["10.0.0.2", "10.0.0.3"],
        "10.0.0.4, 10.0.0.5",
        ["--forwarded-allow-ips", "10.0.0.6", "--forwarded-allow-ips", "10.0.0.7,10.0.0.8"],
        [["10.0.0.1"], ["10.0.0.2", "10.0.0.3"], ["10.0.0.4", "10.0.0.5"],
         ["10.0.0.6", "10.0.0.7", "10.0.0.8"]],
        ["127.0.0.1"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("file_kind", ["asgi-supervise.toml", "pyproject.toml"])
@pytest.mark.parametrize("name", list(PRECEDENCE))
def test_each_layer_overrides_the_one_below(tmp_path: Path, name: str, file_kind: str):
    """Set the option in all four layers, then take them away from the top, one by one."""
    profile_value, file_value, env_value, flag_args, expected, default = PRECEDENCE[name]
    key = name.replace("_", "-")
    write_table(tmp_path / PROFILE_PATH, {key: profile_value})
    if file_kind == "pyproject.toml":
        write_table(tmp_path / file_kind, {key: file_value}, header="[tool.asgi-supervise]")
        file_source = "file: pyproject.toml [tool.asgi-supervise]"
    else:
        write_table(tmp_path / file_kind, {key: file_value})
        file_source = "file: asgi-supervise.toml"
    env = {"ASGI_SUPERVISE_" + name.upper(): env_value}
    profile_args = ["--profile", PROFILE_PATH]

    def check(args: list[str], environ: dict[str, str], want: Any, source: str) -> None:
        data = config_json(*args, cwd=tmp_path, env=environ)
        assert setting(data, name) == (want, source), (args, environ)

    check([*profile_args, *flag_args], env, expected[3], "flag: command line")
    check(profile_args, env, expected[2], "env: environment")
    check(profile_args, {}, expected[1], file_source)
    (tmp_path / file_kind).unlink()
    check(profile_args, {}, expected[0], PROFILE_SOURCE)
    check([], {}, default, "default")


def test_config_file_choice_order(tmp_path: Path):
    """--config FILE, else asgi-supervise.toml, else [tool.asgi-supervise] in pyproject."""
    write_table(tmp_path / "pyproject.toml", {"backlog": 100}, header="[tool.asgi-supervise]")
    assert setting(config_json(cwd=tmp_path), "backlog") == (
        100,
        "file: pyproject.toml [tool.asgi-supervise]",
    )
    write_table(tmp_path / "asgi-supervise.toml", {"backlog": 200})
    data = config_json(cwd=tmp_path)
    assert setting(data, "backlog") == (200, "file: asgi-supervise.toml")
    write_table(tmp_path / "etc" / "other.toml", {"backlog": 300})
    data = config_json("--config", "etc/other.toml", cwd=tmp_path)
    assert setting(data, "backlog") == (300, "file: etc/other.toml")
    data = config_json(cwd=tmp_path, env={"ASGI_SUPERVISE_CONFIG": "etc/other.toml"})
    assert setting(data, "backlog") == (300, "file: etc/other.toml")


def test_pyproject_without_our_table_is_no_config_file(tmp_path: Path):
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "someone-else"\n')
    data = config_json(cwd=tmp_path)
    assert all(entry["source"] == "default" for entry in data["settings"].values())
    assert data["profile"] is None


def test_web_concurrency_is_below_our_own_variable(tmp_path: Path):
    write_table(tmp_path / "asgi-supervise.toml", {"workers": 2})
    data = config_json(cwd=tmp_path, env={"WEB_CONCURRENCY": "3"})
    assert setting(data, "workers") == (3, "env: environment")  # above the file
    env = {"WEB_CONCURRENCY": "3", "ASGI_SUPERVISE_WORKERS": "4"}
    assert setting(config_json(cwd=tmp_path, env=env), "workers") == (4, "env: environment")
    env = {"WEB_CONCURRENCY": "3", "ASGI_SUPERVISE_WORKERS": "auto"}
    assert setting(config_json(cwd=tmp_path, env=env), "workers") == ("auto", "env: environment")
    data = config_json("--workers", "5", cwd=tmp_path, env=env)
    assert setting(data, "workers") == (5, "flag: command line")


def test_profile_chosen_inside_the_config_file(tmp_path: Path):
    write_table(tmp_path / "asgi-supervise.toml", {"profile": "prod", "max-requests": 500})
    data = config_json(cwd=tmp_path)
    assert data["profile"] == "prod"
    assert setting(data, "max_requests") == (500, "file: asgi-supervise.toml")  # file > profile
    assert setting(data, "max_requests_jitter") == (1000, "profile prod")
    assert setting(data, "log_format") == ("json", "profile prod")
    # The command line and the environment choose the profile above the file's choice.
    data = config_json("--profile", "dev", cwd=tmp_path)
    assert data["profile"] == "dev"
    assert setting(data, "reload") == (True, "profile dev")
    assert setting(data, "max_requests_jitter") == (0, "default")
    data = config_json(cwd=tmp_path, env={"ASGI_SUPERVISE_PROFILE": "container"})
    assert data["profile"] == "container"
    assert setting(data, "host") == ("0.0.0.0", "profile container")


def test_profile_from_a_path(tmp_path: Path):
    write_table(tmp_path / "deploy" / "mine.toml", {"workers": 3, "log-format": "json"})
    data = config_json("--profile", "deploy/mine.toml", cwd=tmp_path)
    assert data["profile"] == "deploy/mine.toml"
    assert setting(data, "workers") == (3, "profile deploy/mine.toml")
    assert setting(data, "log_format") == ("json", "profile deploy/mine.toml")
    absolute = str(tmp_path / "deploy" / "mine.toml")
    data = config_json("--profile", absolute, cwd=tmp_path)
    assert setting(data, "workers") == (3, f"profile {absolute}")


def test_app_from_file_env_or_command_line(tmp_path: Path):
    write_table(tmp_path / "asgi-supervise.toml", {"app": "fromfile:app"})
    assert setting(config_json(cwd=tmp_path), "app") == (
        "fromfile:app",
        "file: asgi-supervise.toml",
    )
    env = {"ASGI_SUPERVISE_APP": "fromenv:app"}
    assert setting(config_json(cwd=tmp_path, env=env), "app") == ("fromenv:app", "env: environment")
    data = config_json("fromflag:app", cwd=tmp_path, env=env)
    assert setting(data, "app") == ("fromflag:app", "flag: command line")


def test_socket_options_do_not_clash_with_a_profile_host(tmp_path: Path):
    """`--profile container --uds ...` serves the profile on a socket; it is not a conflict."""
    sock = str(tmp_path / "app.sock")
    data = config_json("--profile", "container", "--uds", sock, cwd=tmp_path)
    assert setting(data, "uds") == (sock, "flag: command line")
    assert setting(data, "host") == ("0.0.0.0", "profile container")


def test_text_output_names_profile_values_and_sources(tmp_path: Path):
    result = run_cli("config", "--profile", "container", "--port", "9000", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "# profile: container"
    rows = {line.split()[0]: line for line in lines[1:] if not line.startswith("#")}
    assert lines[-1].startswith("# drain: 25s at worst from SIGTERM")
    assert rows["host"].split("=", 1)[1].split("#")[0].strip() == '"0.0.0.0"'
    assert rows["host"].endswith("# profile container")
    assert rows["port"].endswith("# flag: command line")
    assert rows["backlog"].endswith("# default")
    assert len(rows) == len(Settings.model_fields)


# --- secrets ------------------------------------------------------------------------------

SECRETS = ("hunter2", "s3cret", "t0ps3cret")


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_config_redacts_secrets(tmp_path: Path, as_json: bool):
    write_table(
        tmp_path / "asgi-supervise.toml", {"ssl-ciphers": "redis://:t0ps3cret@cache:6379/0"}
    )
    env = {"ASGI_SUPERVISE_SSL_KEYFILE_PASSWORD": "hunter2"}
    args = ["--root-path", "postgres://user:s3cret@db/x"]
    args += ["--headers", "X-Upstream: https://svc:s3cret@example.com/"]
    result = run_cli("config", *(["--json"] if as_json else []), *args, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    for secret in SECRETS:
        assert secret not in result.stdout and secret not in result.stderr
    if as_json:
        data = json.loads(result.stdout)
        assert setting(data, "ssl_keyfile_password") == ("***", "env: environment")
        assert setting(data, "root_path") == ("postgres://user:***@db/x", "flag: command line")
        assert setting(data, "ssl_ciphers") == (
            "redis://:***@cache:6379/0",
            "file: asgi-supervise.toml",
        )
        assert setting(data, "headers")[0] == ["X-Upstream: https://svc:***@example.com/"]
    else:
        rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
        assert '"***"' in rows["ssl-keyfile-password"]
        assert "postgres://user:***@db/x" in rows["root-path"]
        assert "redis://:***@cache:6379/0" in rows["ssl-ciphers"]


def test_errors_do_not_echo_secrets(tmp_path: Path):
    result = run_cli("nosuch_app_mod:app", "--port", "postgres://u:s3cret@db", cwd=tmp_path)
    assert result.returncode == 2
    assert "s3cret" not in result.stderr
    assert "--port='postgres://u:***@db' (command line)" in result.stderr


# --- in-process: the loader reads only the environment it is given ------------------------


def test_load_ignores_the_process_environment_when_given_one(tmp_path, monkeypatch):
    monkeypatch.setenv("ASGI_SUPERVISE_HOST", "10.9.9.9")
    monkeypatch.setenv("ASGI_SUPERVISE_FORWARDED_ALLOW_IPS", "10.0.0.1,10.0.0.2")
    loaded = sources.load({}, environ={}, cwd=tmp_path)
    assert loaded.settings.host == "127.0.0.1"
    assert loaded.origin("host") == "default"
    loaded = sources.load({}, cwd=tmp_path)  # the real environment, through our own layer
    assert loaded.settings.host == "10.9.9.9"
    assert loaded.settings.forwarded_allow_ips == ["10.0.0.1", "10.0.0.2"]
    assert loaded.origin("forwarded_allow_ips") == "env: environment"


def test_settings_never_read_the_process_environment_themselves(monkeypatch):
    """Only sources.load reads the environment (once, with names in errors); the model,
    validated again from a dump, must not pick up ASGI_SUPERVISE_* on its own."""
    monkeypatch.setenv("ASGI_SUPERVISE_FORWARDED_ALLOW_IPS", "10.0.0.1,10.0.0.2")
    monkeypatch.setenv("ASGI_SUPERVISE_WORKERS", "7")
    dump = Settings().model_dump(mode="json")
    again = Settings.model_validate(dump)
    assert again.forwarded_allow_ips == ["127.0.0.1"]
    assert again.workers == 1


def test_env_list_variable_through_the_cli(tmp_path: Path):
    env = {"ASGI_SUPERVISE_FORWARDED_ALLOW_IPS": "10.0.0.1,10.0.0.2"}
    data = config_json(cwd=tmp_path, env=env)
    assert setting(data, "forwarded_allow_ips") == (["10.0.0.1", "10.0.0.2"], "env: environment")


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("FORWARDED_ALLOW_IPS", '["10.0.0.1", "10.0.0.2"]', ["10.0.0.1", "10.0.0.2"]),
        ("FORWARDED_ALLOW_IPS", '["10.0.0.1,10.0.0.2"]', ["10.0.0.1", "10.0.0.2"]),
        ("RELOAD_INCLUDES", '["*.py", "*.toml"]', ["*.py", "*.toml"]),
        ("HEADERS", '["A: 1, 2", "B: 3"]', ["A: 1, 2", "B: 3"]),
        ("HEADERS", "A: 1, 2\nB: 3\n", ["A: 1, 2", "B: 3"]),
        ("HEADERS", "Cache-Control: no-cache, no-store", ["Cache-Control: no-cache, no-store"]),
    ],
    ids=["ips-json", "ips-json-with-commas", "globs-json", "headers-json", "headers-lines",
         "header-one"],
)  # fmt: skip
def test_env_lists_as_json_or_separated(tmp_path: Path, name: str, value: str, expected: Any):
    """Any list variable may be a JSON array; else commas separate items, except in
    ASGI_SUPERVISE_HEADERS, where a header value may hold commas and newlines do."""
    data = config_json(cwd=tmp_path, env={"ASGI_SUPERVISE_" + name: value})
    assert setting(data, name.lower()) == (expected, "env: environment")


def test_header_flags_are_one_header_each(tmp_path: Path):
    args = ["--header", "Cache-Control: no-cache, no-store", "--header", "X-Two: a,b"]
    data = config_json(*args, cwd=tmp_path)
    assert setting(data, "headers") == (
        ["Cache-Control: no-cache, no-store", "X-Two: a,b"],
        "flag: command line",
    )


def test_metrics_address_turns_metrics_on(tmp_path: Path):
    data = config_json("--metrics-port", "9100", cwd=tmp_path)
    assert setting(data, "metrics") == (True, "flag: command line, implied by --metrics-port")
    env = {"ASGI_SUPERVISE_METRICS_HOST": "0.0.0.0"}
    data = config_json("--profile", "dev", cwd=tmp_path, env=env)  # dev says metrics = false
    assert setting(data, "metrics") == (True, "env: environment, implied by "
                                        "ASGI_SUPERVISE_METRICS_HOST")  # fmt: skip
    data = config_json("--profile", "container", cwd=tmp_path)  # a profile's own address
    assert setting(data, "metrics") == (True, "profile container")
    data = config_json("--metrics-port", "9100", "--metrics", cwd=tmp_path)
    assert setting(data, "metrics") == (True, "flag: command line")
    assert setting(config_json(cwd=tmp_path), "metrics") == (False, "default")


# --- bad input: one line, exit 2, names what and where ----------------------------------------


@pytest.mark.parametrize(("args", "env", "files", "expect", "exact"), IN_PROCESS_ROWS)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, env, files, expect, exact):
    with prepared(tmp_path, args, env, files, expect) as (argv, environ, fragments):
        result = run_cli(*argv, cwd=tmp_path, env=environ)
    assert_one_line(result.returncode, result.stdout, result.stderr, fragments, exact)


def test_the_bad_input_table_is_big_enough():
    assert len(BAD_INPUTS) >= 30
    assert len(IN_PROCESS_ROWS) + len(SUBPROCESS) == len(BAD_INPUTS)  # no id misspelt
