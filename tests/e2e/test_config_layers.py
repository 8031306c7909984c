"""Five layers of settings, their sources, secrets, and every kind of bad input.

Everything user-facing runs through the real CLI (`run_cli`) in a scratch directory, so
the config-file discovery, the environment and argparse are the ones users get.
"""

from __future__ import annotations

import http.client
import json
import os
import select
import socket
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from asgi_supervise.config import sources
from asgi_supervise.config.settings import Settings
from conftest import APPS, free_port, get, run_cli, try_get, wait_until

pytestmark = pytest.mark.timeout(60)


def toml_value(value: Any) -> str:
    """Enough TOML for these tests: JSON spells str, int, float, bool and lists alike."""
    return json.dumps(value)


def write_table(path: Path, values: dict[str, Any], header: str = "") -> None:
    lines = [header] if header else []
    lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def config_json(*args: str, cwd: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    result = run_cli("config", "--json", *args, cwd=cwd, env=env)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return json.loads(result.stdout)


def setting(data: dict[str, Any], name: str) -> tuple[Any, str]:
    entry = data["settings"][name]
    return entry["value"], entry["source"]


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


def test_flag_beats_env_beats_file_beats_builtin_profile(tmp_path: Path):
    """The built-in container profile sets host, drain and log format; each layer above wins."""
    write_table(tmp_path / "asgi-supervise.toml", {"host": "10.1.1.1", "drain-delay": 2})
    env = {"ASGI_SUPERVISE_DRAIN_DELAY": "3", "ASGI_SUPERVISE_LOG_FORMAT": "text"}
    data = config_json("--profile", "container", "--drain-delay", "4", cwd=tmp_path, env=env)
    assert data["profile"] == "container"
    assert setting(data, "host") == ("10.1.1.1", "file: asgi-supervise.toml")
    assert setting(data, "drain_delay") == (4.0, "flag: command line")
    assert setting(data, "log_format") == ("text", "env: environment")
    assert setting(data, "graceful_timeout") == (10.0, "profile container")
    assert setting(data, "port") == (8000, "default")


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


@pytest.mark.parametrize("where", ["config file", "environment"])
def test_server_starts_with_app_from_file_or_env(supervisor, tmp_path: Path, where: str):
    """No APP argument: the master finds it in asgi-supervise.toml or ASGI_SUPERVISE_APP."""
    home = tmp_path / "home"
    env = {}
    if where == "config file":
        write_table(home / "asgi-supervise.toml", {"app": "testapp:app", "app-dir": str(APPS)})
    else:
        home.mkdir()
        env = {"ASGI_SUPERVISE_APP": "testapp:app", "ASGI_SUPERVISE_APP_DIR": str(APPS)}
    server = supervisor(cwd=home, env=env)
    server.wait_ready(1, timeout=30)
    status, body = server.get("/pid")
    assert status == 200
    assert int(body) in server.worker_pids()


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


def test_config_output_to_a_closed_pipe_is_not_an_error(tmp_path: Path):
    """`asgi-supervise config | head -1` must not end in a BrokenPipeError traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASGI_SUPERVISE_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "asgi_supervise", "config"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the first line is written
    try:
        stderr = proc.stderr.read().decode()
        assert proc.wait(30) == 0, stderr
    finally:
        proc.stderr.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr


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


def test_header_with_commas_reaches_responses(supervisor):
    env = {"ASGI_SUPERVISE_HEADERS": "X-From-Env: 1, 2\nX-Also: 3"}
    server = supervisor("testapp:app", env=env)
    server.wait_ready(1)
    headers = response_headers(server.port)
    assert headers["x-from-env"] == "1, 2" and headers["x-also"] == "3"
    server = supervisor("testapp:app", "--header", "Cache-Control: no-cache, no-store")
    server.wait_ready(1)
    assert response_headers(server.port)["cache-control"] == "no-cache, no-store"


def response_headers(port: int) -> dict[str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        response.read()
        return {k.lower(): v for k, v in response.getheaders()}
    finally:
        conn.close()


# --- a metrics address means metrics -----------------------------------------------------


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


def test_metrics_port_alone_serves_metrics(supervisor, tmp_path: Path):
    mport = free_port()
    server = supervisor("testapp:app", "--metrics-port", str(mport))
    server.wait_ready(1)
    wait_until(lambda: try_get(mport, "/livez"), 10, lambda: "/livez\n" + server.log())
    assert get(mport, "/livez")[0] == 200


# --- values reach uvicorn as given --------------------------------------------------------


def test_keep_alive_below_one_second_is_not_zero(supervisor):
    """--timeout-keep-alive 0.5 keeps an idle connection open 0.3 s and closes it after."""
    server = supervisor("testapp:app", "--timeout-keep-alive", "0.5")
    server.wait_ready(1)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    with sock:
        request = b"GET /pid HTTP/1.1\r\nHost: x\r\n\r\n"
        sock.sendall(request)
        first = read_response(sock)
        assert first.startswith(b"HTTP/1.1 200")
        readable, _, _ = select.select([sock], [], [], 0.3)  # a close would wake this early
        assert not readable, "the server closed an idle keep-alive connection early"
        sock.sendall(request)
        second = read_response(sock)
        assert second.startswith(b"HTTP/1.1 200"), second
        assert second.split(b"\r\n\r\n", 1)[1] == first.split(b"\r\n\r\n", 1)[1]
        wait_until(lambda: select.select([sock], [], [], 0.05)[0], 5, "the keep-alive close")
        assert sock.recv(1) == b""  # closed by the server, not a stray byte


def read_response(sock: socket.socket) -> bytes:
    """One response with a Content-Length body, read off a kept-alive connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"connection closed mid-response: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(4096)
    return head + b"\r\n\r\n" + body


def test_tls_with_an_encrypted_key_serves_https(supervisor, tmp_path: Path):
    env = {"ASGI_SUPERVISE_SSL_KEYFILE_PASSWORD": "correct-horse"}
    server = supervisor("testapp:app", *TLS_CERT, "--ssl-keyfile", ENCRYPTED_KEY, env=env)
    context = ssl.create_default_context(cafile=f"{TLS}/cert.pem")

    def https_pid() -> str | None:
        conn = http.client.HTTPSConnection("127.0.0.1", server.port, timeout=2, context=context)
        try:
            conn.request("GET", "/pid")
            return conn.getresponse().read().decode()
        except OSError:
            return None
        finally:
            conn.close()

    pid = wait_until(https_pid, 15, lambda: "an https answer\n" + server.log())
    assert int(pid) in server.worker_pids()


# --- bad input: one line, exit 2, names what and where ----------------------------------------

# A well-formed app that does not exist: if a case wrongly passed validation, the run would
# stop at the app check (a different message, so the case fails) instead of binding anything.
APP = "nosuch_app_mod:app"


def case(
    case_id: str,
    args: list[str],
    *expect: str,
    env: dict[str, str] | None = None,
    files: dict[str, str | bytes] | None = None,
    exact: bool = False,
) -> Any:
    return pytest.param(args, env or {}, files or {}, expect, exact, id=case_id)


PORT = "{port}"
HELD = "{held}"  # a port the test holds: `{held}` in args, env, files and expectations
RUN = [APP, "--port", PORT]
TLS = str(APPS / "tls")  # a self-signed pair, another key, and the first key encrypted
TLS_CERT = ["--ssl-certfile", f"{TLS}/cert.pem"]
TLS_PAIR = [*TLS_CERT, "--ssl-keyfile", f"{TLS}/key.pem"]
ENCRYPTED_KEY = f"{TLS}/key-encrypted.pem"  # password: correct-horse

BAD_INPUTS = [
    # --- files named by options must exist and load
    case("log-config-missing", [*RUN, "--log-config", "nowhere.json"],
         "--log-config='nowhere.json' (command line): no such file", exact=True),
    case("ssl-keyfile-missing", [*RUN, "--ssl-keyfile", "k.pem", "--ssl-certfile", "c.pem"],
         "--ssl-keyfile='k.pem' (command line): no such file"),
    case("env-file-missing-env", RUN, "ASGI_SUPERVISE_ENV_FILE='.env.prod' (environment)",
         "no such file", env={"ASGI_SUPERVISE_ENV_FILE": ".env.prod"}),
    case("log-config-broken", ["okapp:app", "--port", PORT, "--log-config", "log.json"],
         "--log-config log.json: cannot set up logging",
         files={"okapp.py": "app = None\n", "log.json": '{"version": 1, "handlers": 7}'}),
    case("interface-bad", [*RUN, "--interface", "cgi"], "--interface='cgi' (command line)"),
    # --- types and ranges on the command line
    case("workers-abc-flag", [*RUN, "--workers", "abc"],
         "--workers='abc' (command line): expected an integer >= 1 or 'auto'"),
    case("workers-zero", [*RUN, "--workers", "0"], "--workers='0' (command line)", ">= 1"),
    case("workers-float", [*RUN, "--workers", "1.5"], "--workers='1.5' (command line)"),
    case("port-70000", [APP, "--port", "70000"],
         "--port='70000' (command line): expected an integer >= 0 and <= 65535"),
    case("port-not-a-number", [APP, "--port", "http"], "--port='http' (command line)"),
    case("backlog-zero", [*RUN, "--backlog", "0"], "--backlog='0' (command line)", ">= 1"),
    case("loop-foo", [*RUN, "--loop", "foo"],
         "--loop='foo' (command line): expected one of 'auto', 'asyncio', 'uvloop', 'none'"),
    case("log-level-loud", [*RUN, "--log-level", "loud"],
         "--log-level='loud' (command line): expected one of 'critical', 'error', 'warning'"),
    case("log-format-xml", [*RUN, "--log-format", "xml"], "--log-format='xml' (command line)",
         "'text', 'json'"),
    case("lifespan-maybe", [*RUN, "--lifespan", "maybe"], "--lifespan='maybe' (command line)"),
    case("graceful-timeout-negative", [*RUN, "--graceful-timeout", "-1"],
         "--graceful-timeout='-1' (command line): expected a number >= 0"),
    case("graceful-timeout-alias-negative", [*RUN, "--timeout-graceful-shutdown", "-5"],
         "--graceful-timeout='-5' (command line): expected a number >= 0"),
    case("drain-delay-negative", [*RUN, "--drain-delay", "-0.5"],
         "--drain-delay='-0.5' (command line)", ">= 0"),
    case("worker-timeout-zero", [*RUN, "--worker-timeout", "0"],
         "--worker-timeout='0' (command line): expected a number > 0"),
    case("keep-alive-zero", [*RUN, "--timeout-keep-alive", "0"],
         "--timeout-keep-alive='0' (command line)", "> 0"),
    case("ready-timeout-abc", [*RUN, "--ready-timeout", "abc"],
         "--ready-timeout='abc' (command line)", "a number"),
    case("max-requests-zero", [*RUN, "--max-requests", "0"], "--max-requests='0' (command line)"),
    case("metrics-port-65536", [*RUN, "--metrics-port", "65536"],
         "--metrics-port='65536' (command line)", "<= 65535"),
    case("worker-memory-negative", [*RUN, "--max-worker-memory", "-5"],
         "--max-worker-memory='-5' (command line)"),
    # --- options that do not go together
    case("uds-with-port", [APP, "--uds", "/tmp/x.sock", "--port", "8123"],
         "--uds='/tmp/x.sock' (command line) conflicts with --port='8123' (command line)"),
    case("fd-with-host", [APP, "--fd", "3", "--host", "0.0.0.0"],
         "--fd='3' (command line) conflicts with --host='0.0.0.0' (command line)"),
    case("uds-with-fd", [APP, "--uds", "/tmp/x.sock", "--fd", "3"],
         "--uds and --fd are mutually exclusive",
         "--uds='/tmp/x.sock' (command line)", "--fd='3' (command line)"),
    case("fd-env-with-uds-flag", [APP, "--uds", "/tmp/x.sock"],
         "--uds and --fd are mutually exclusive", "ASGI_SUPERVISE_FD='3' (environment)",
         env={"ASGI_SUPERVISE_FD": "3"}),
    case("ssl-key-without-cert", [*RUN, "--ssl-keyfile", "key.pem"],
         "TLS needs both ssl_keyfile and ssl_certfile",
         "--ssl-keyfile='key.pem' (command line)", "ssl_certfile not set",
         files={"key.pem": "not really a key\n"}),
    case("max-below-min-workers", [*RUN, "--min-workers", "4", "--max-workers", "2"],
         "max_workers (2) is below min_workers (4)",
         "--max-workers='2' (command line)", "--min-workers='4' (command line)"),
    case("max-in-file-below-min-flag", [*RUN, "--min-workers", "4"],
         "max-workers=2 (asgi-supervise.toml)", "--min-workers='4' (command line)",
         files={"asgi-supervise.toml": "max-workers = 2\n"}),
    # --- argparse
    case("unknown-flag", [*RUN, "--wokers", "3"],
         "unrecognized arguments: --wokers", "(command line)", "did you mean --workers?"),
    case("unknown-flag-equals", [*RUN, "--gracefull-timeout=5"],
         "--gracefull-timeout=5", "(command line)", "did you mean --graceful-timeout?"),
    case("flag-without-value", [*RUN, "--workers"],
         "argument -w/--workers: expected one argument (command line)"),
    case("bool-flag-with-value", [*RUN, "--metrics=yes"],
         "--metrics", "'yes'", "(command line)"),
    case("abbreviated-flag", [*RUN, "--grace", "5"], "unrecognized arguments: --grace"),
    # --- profiles and config files named on the command line
    case("unknown-profile", [*RUN, "--profile", "prdo"],
         "--profile='prdo' (command line): unknown profile 'prdo'", "did you mean 'prod'?"),
    case("missing-profile-file", [*RUN, "--profile", "conf/nope.toml"],
         "--profile='conf/nope.toml' (command line): profile file conf/nope.toml does not exist"),
    case("missing-config-file", [*RUN, "--config", "nope.toml"],
         "--config='nope.toml' (command line): config file nope.toml does not exist"),
    case("config-is-a-directory", [*RUN, "--config", "adir"],
         "cannot read config file", "adir", files={"adir/keep.toml": ""}),
    # --- the app
    case("app-without-attribute", ["testapp", "--port", PORT],
         "APP='testapp' (command line): not in the form module:attribute (e.g. main:app)",
         exact=True),
    case("app-bad-module-path", ["my-app:app", "--port", PORT],
         "APP='my-app:app' (command line): 'my-app' is not a valid module path", exact=True),
    case("app-missing-module", [*RUN],
         f"APP='{APP}' (command line): no module named 'nosuch_app_mod' (looked in . and "
         "sys.path)", exact=True),
    case("app-from-file-missing-module", ["--port", PORT],
         "app='ghost_module:app' (asgi-supervise.toml): no module named 'ghost_module'",
         files={"asgi-supervise.toml": 'app = "ghost_module:app"\n'}),
    case("app-missing-attribute", ["testapp:nosuch", "--port", PORT, "--app-dir", str(APPS)],
         "APP='testapp:nosuch' (command line): module 'testapp' has no attribute 'nosuch'",
         exact=True),
    case("app-from-env-missing-attribute", ["--port", PORT],
         "ASGI_SUPERVISE_APP='okapp:ap' (environment): module 'okapp' has no attribute 'ap'",
         env={"ASGI_SUPERVISE_APP": "okapp:ap"},
         files={"okapp.py": "import os\nif os.environ:\n    app = None\n"}),
    case("app-attribute-of-a-package", ["pkg:nosuch", "--port", PORT],
         "APP='pkg:nosuch' (command line): module 'pkg' has no attribute 'nosuch'",
         files={"pkg/__init__.py": "from pkg.sub import app\n", "pkg/sub.py": "app = 1\n"}),
    case("no-app-at-all", ["--port", PORT], "no app to serve", "ASGI_SUPERVISE_APP"),
    # --- environment
    case("workers-abc-env", [*RUN],
         "ASGI_SUPERVISE_WORKERS='abc' (environment): expected an integer >= 1 or 'auto'",
         env={"ASGI_SUPERVISE_WORKERS": "abc"}, exact=True),
    case("web-concurrency-zero", [*RUN], "WEB_CONCURRENCY='0' (environment)",
         env={"WEB_CONCURRENCY": "0"}),
    case("unknown-env-var", [*RUN],
         "unknown environment variable ASGI_SUPERVISE_WOKERS",
         "did you mean 'ASGI_SUPERVISE_WORKERS'?", env={"ASGI_SUPERVISE_WOKERS": "3"}),
    case("env-port-70000", [APP], "ASGI_SUPERVISE_PORT='70000' (environment)", "<= 65535",
         env={"ASGI_SUPERVISE_PORT": "70000"}),
    case("env-bool-maybe", [*RUN],
         "ASGI_SUPERVISE_METRICS='maybe' (environment): expected true or false",
         env={"ASGI_SUPERVISE_METRICS": "maybe"}),
    case("env-log-level-loud", [*RUN], "ASGI_SUPERVISE_LOG_LEVEL='loud' (environment)",
         env={"ASGI_SUPERVISE_LOG_LEVEL": "loud"}),
    case("env-negative-timeout", [*RUN],
         "ASGI_SUPERVISE_GRACEFUL_TIMEOUT='-1' (environment): expected a number >= 0",
         env={"ASGI_SUPERVISE_GRACEFUL_TIMEOUT": "-1"}),
    case("env-unknown-profile", [*RUN],
         "ASGI_SUPERVISE_PROFILE='prdo' (environment): unknown profile 'prdo'",
         "did you mean 'prod'?", env={"ASGI_SUPERVISE_PROFILE": "prdo"}),
    case("env-missing-config", [*RUN],
         "ASGI_SUPERVISE_CONFIG='gone.toml' (environment): config file gone.toml does not exist",
         env={"ASGI_SUPERVISE_CONFIG": "gone.toml"}),
    # --- config files and profile files
    case("unknown-key-in-config", [*RUN],
         "unknown setting 'wokers' in asgi-supervise.toml; did you mean 'workers'?",
         files={"asgi-supervise.toml": "wokers = 3\n"}, exact=True),
    case("unknown-key-in-pyproject", [*RUN],
         "unknown setting 'gracefull-timeout' in pyproject.toml [tool.asgi-supervise]",
         "did you mean 'graceful-timeout'?",
         files={"pyproject.toml": "[tool.asgi-supervise]\ngracefull-timeout = 5\n"}),
    case("unknown-key-in-profile-file", [*RUN, "--profile", "conf/p.toml"],
         "unknown setting 'hots' in profile conf/p.toml; did you mean 'host'?",
         files={"conf/p.toml": 'hots = "0.0.0.0"\n'}),
    case("bad-value-in-profile-file", [*RUN, "--profile", "conf/p.toml"],
         "loop='foo' (profile conf/p.toml): expected one of",
         files={"conf/p.toml": 'loop = "foo"\n'}),
    case("malformed-toml", [*RUN], "asgi-supervise.toml is not valid TOML", "line 1",
         files={"asgi-supervise.toml": "workers = \n"}),
    case("malformed-toml-explicit", [*RUN, "--config", "c.toml"],
         "config file", "c.toml is not valid TOML", "line 2",
         files={"c.toml": 'host = "0.0.0.0"\nhost = "::"\n'}),
    case("malformed-pyproject", [*RUN], "pyproject.toml is not valid TOML",
         files={"pyproject.toml": "[tool.asgi-supervise\n"}),
    case("not-utf8-toml", [*RUN], "asgi-supervise.toml is not valid TOML", "UTF-8",
         files={"asgi-supervise.toml": b"\xff\xfe = 1\n"}),
    case("file-workers-float", [*RUN],
         "workers=2.5 (asgi-supervise.toml): expected an integer >= 1 or 'auto'",
         files={"asgi-supervise.toml": "workers = 2.5\n"}),
    case("file-host-int", [*RUN], "host=5 (asgi-supervise.toml): expected a string",
         files={"asgi-supervise.toml": "host = 5\n"}),
    case("file-negative-timeout", [*RUN], "graceful-timeout=-5 (asgi-supervise.toml)", ">= 0",
         files={"asgi-supervise.toml": "graceful-timeout = -5\n"}),
    case("pyproject-port-70000", [APP], "port=70000 (pyproject.toml [tool.asgi-supervise])",
         files={"pyproject.toml": "[tool.asgi-supervise]\nport = 70000\n"}),
    case("file-list-of-ints", [*RUN], "forwarded-allow-ips=[1, 2] (asgi-supervise.toml)",
         "expected a list", files={"asgi-supervise.toml": "forwarded-allow-ips = [1, 2]\n"}),
    case("file-unknown-profile", [*RUN],
         "profile='prdo' (asgi-supervise.toml): unknown profile 'prdo'", "did you mean 'prod'?",
         files={"asgi-supervise.toml": 'profile = "prdo"\n'}),
    case("file-profile-not-a-name", [*RUN],
         "profile=3 (asgi-supervise.toml): expected a profile name",
         files={"asgi-supervise.toml": "profile = 3\n"}),
    case("file-workers-true", [*RUN],
         "workers=True (asgi-supervise.toml): expected an integer >= 1 or 'auto'",
         files={"asgi-supervise.toml": "workers = true\n"}),
    case("file-timeout-false", [*RUN],
         "graceful-timeout=False (asgi-supervise.toml): expected a number",
         files={"asgi-supervise.toml": "graceful-timeout = false\n"}),
    case("pyproject-table-not-a-table", [*RUN],
         "pyproject.toml: [tool.asgi-supervise] must be a table, got 'x'",
         files={"pyproject.toml": "[tool]\nasgi-supervise = 'x'\n"}),
    case("empty-profile", [*RUN, "--profile", ""],
         "--profile='' (command line): expected a name or a file", exact=True),
    case("empty-config", [*RUN, "--config", ""],
         "--config='' (command line): expected a name or a file", exact=True),
    # --- response headers: a value may hold commas; a header needs a name and a colon
    case("header-without-colon", [*RUN, "--header", "NoColon"],
         "--header=['NoColon'] (command line): 'NoColon' is not 'Name: value'", exact=True),
    case("header-bad-name", [*RUN, "--header", "Bad Name: x"],
         "--header=['Bad Name: x'] (command line)", "is not 'Name: value'"),
    case("header-env-second-line-bad", [*RUN],
         "ASGI_SUPERVISE_HEADERS=['X-A: 1, 2', 'nocolon'] (environment)",
         "'nocolon' is not 'Name: value'", env={"ASGI_SUPERVISE_HEADERS": "X-A: 1, 2\nnocolon"}),
    case("header-env-json-not-strings", [*RUN],
         "ASGI_SUPERVISE_HEADERS='[1]' (environment): expected a JSON array of strings",
         env={"ASGI_SUPERVISE_HEADERS": "[1]"}, exact=True),
    case("list-env-bad-json", [*RUN],
         "ASGI_SUPERVISE_FORWARDED_ALLOW_IPS='[10.0.0.1' (environment)",
         "not a JSON array of strings", env={"ASGI_SUPERVISE_FORWARDED_ALLOW_IPS": "[10.0.0.1"}),
    # --- TLS material is loaded in the master, as uvicorn will in every worker
    case("tls-junk-files", [*RUN, "--ssl-keyfile", "junk.pem", "--ssl-certfile", "junk.pem"],
         "--ssl-certfile='junk.pem' (command line): no certificate in PEM format",
         files={"junk.pem": "junk\n"}),
    case("tls-junk-key", [*RUN, *TLS_CERT, "--ssl-keyfile", "junk.pem"],
         "--ssl-keyfile='junk.pem' (command line): no private key in PEM format",
         files={"junk.pem": "junk\n"}),
    case("tls-key-of-another-cert", [*RUN, *TLS_CERT, "--ssl-keyfile", f"{TLS}/other-key.pem"],
         f"--ssl-keyfile='{TLS}/other-key.pem' (command line): the key does not belong to the "
         f"certificate; got --ssl-certfile='{TLS}/cert.pem' (command line)", exact=True),
    case("tls-encrypted-key-no-password", [*RUN, *TLS_CERT, "--ssl-keyfile", ENCRYPTED_KEY],
         f"--ssl-keyfile='{ENCRYPTED_KEY}' (command line): the key is encrypted",
         "--ssl-keyfile-password"),
    case("tls-wrong-password", [*RUN, *TLS_CERT, "--ssl-keyfile", ENCRYPTED_KEY],
         "ASGI_SUPERVISE_SSL_KEYFILE_PASSWORD='***' (environment): does not decrypt the key",
         f"--ssl-keyfile='{ENCRYPTED_KEY}' (command line)",
         env={"ASGI_SUPERVISE_SSL_KEYFILE_PASSWORD": "wrong-horse"}),
    case("tls-ciphers-junk", [*RUN, *TLS_PAIR, "--ssl-ciphers", "junk"],
         "--ssl-ciphers='junk' (command line): no cipher of this OpenSSL matches", exact=True),
    case("tls-cert-reqs-7", [*RUN, *TLS_PAIR, "--ssl-cert-reqs", "7"],
         "--ssl-cert-reqs='7' (command line): expected an integer >= 0 and <= 2", exact=True),
    case("tls-version-99", [*RUN, *TLS_PAIR, "--ssl-version", "99"],
         "--ssl-version='99' (command line): not a TLS protocol"),
    case("tls-ca-certs-junk", [*RUN, *TLS_PAIR, "--ssl-ca-certs", "junk.pem"],
         "--ssl-ca-certs='junk.pem' (command line): no CA certificates in it",
         files={"junk.pem": "junk\n"}),
    # --- values uvicorn or the kernel would take badly
    case("http-not-installed", [*RUN, "--http", "zttp"],
         "--http='zttp' (command line): expected one of 'auto', 'h11'",
         "'zttp' needs the zttp package"),
    case("http2-without-zttp", [*RUN, "--http2"], "HTTP/2 needs --http zttp",
         "--http2=True (command line)", "http='auto' (default)"),
    case("backlog-overflow", [*RUN, "--backlog", "99999999999"],
         "--backlog='99999999999' (command line): expected an integer >= 1 and <= 65535",
         exact=True),
    case("reload-dir-missing", [*RUN, "--reload", "--reload-dir", "/nonexistent"],
         "--reload-dir=['/nonexistent'] (command line): no such directory: /nonexistent",
         exact=True),
    case("timeout-worker-healthcheck-is-not-ours", [*RUN, "--timeout-worker-healthcheck", "5"],
         "unrecognized arguments: --timeout-worker-healthcheck", "--worker-timeout"),
    # --- settings that cannot all hold
    case("min-ready-above-workers", [*RUN, "--workers", "2", "--min-ready", "5"],
         "--min-ready='5' (command line): above the 2 worker(s)",
         "got --workers='2' (command line)"),
    case("min-ready-above-max-workers", [*RUN, "--max-workers", "2"],
         "min-ready=3 (asgi-supervise.toml): above --max-workers 2",
         "got --max-workers='2' (command line)",
         files={"asgi-supervise.toml": 'workers = "auto"\nmin-ready = 3\n'}),
    case("min-ready-above-auto-plan", ["testapp:app", "--port", PORT, "--app-dir", str(APPS),
                                       "--workers", "auto", "--min-ready", "100000"],
         "--min-ready='100000' (command line): above the", "workers --workers auto sized"),
    case("db-reserved-above-max", [*RUN, "--db-max-connections", "10"],
         "ASGI_SUPERVISE_DB_RESERVED_CONNECTIONS='20' (environment): leaves none of the 10",
         "--db-max-connections='10' (command line)",
         env={"ASGI_SUPERVISE_DB_RESERVED_CONNECTIONS": "20"}),
    case("metrics-port-with-no-metrics", [*RUN, "--metrics-port", "9100"],
         "metrics=False (asgi-supervise.toml) contradicts --metrics-port='9100' (command line)",
         files={"asgi-supervise.toml": "metrics = false\n"}),
    # --- addresses in use: HELD is a port this test holds open
    case("port-in-use", ["testapp:app", "--app-dir", str(APPS), "--port", HELD],
         "--port='{held}' (command line): cannot bind 127.0.0.1:{held}: address already in use",
         exact=True),
    case("port-in-use-env", ["testapp:app", "--app-dir", str(APPS)],
         "ASGI_SUPERVISE_PORT='{held}' (environment): cannot bind",
         env={"ASGI_SUPERVISE_PORT": HELD}),
    case("metrics-port-in-use", ["testapp:app", "--app-dir", str(APPS), "--port", PORT,
                                 "--metrics-port", HELD],
         "--metrics-port='{held}' (command line): cannot serve metrics and health on "
         "127.0.0.1:{held}: address already in use", exact=True),
    case("metrics-port-in-use-profile", ["testapp:app", "--app-dir", str(APPS), "--port", PORT,
                                         "--profile", "conf/p.toml"],
         "metrics-port={held} (profile conf/p.toml): cannot serve metrics and health on",
         files={"conf/p.toml": "metrics = true\nmetrics-port = {held}\n"}),
]  # fmt: skip


@pytest.mark.parametrize(("args", "env", "files", "expect", "exact"), BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, env, files, expect, exact):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]

        def fill(text: str) -> str:
            return text.replace(HELD, str(port))

        for name, content in files.items():
            path = tmp_path / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(fill(content))
        argv = [str(free_port()) if arg == PORT else fill(arg) for arg in args]
        env = {key: fill(value) for key, value in env.items()}
        expect = [fill(fragment) for fragment in expect]
        result = run_cli(*argv, cwd=tmp_path, env=env, timeout=20)
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert result.returncode == 2, output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    (line,) = lines
    assert line.startswith("asgi-supervise: "), line
    if exact:
        assert line == "asgi-supervise: " + expect[0]
    for fragment in expect:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    assert "booting" not in output and " ready in " not in output


def test_the_bad_input_table_is_big_enough():
    assert len(BAD_INPUTS) >= 30
