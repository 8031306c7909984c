"""Settings through the real binary: a layered config read by `asgi-supervise config`, a
server started from a config file or the environment, values that reach uvicorn, and a
representative handful of bad inputs (tests/bad_inputs.py `SUBPROCESS`).

Everything that only checks how settings are layered and validated runs in-process, through
the CLI's own `main`, in tests/unit/test_config_cli.py: the same table of bad inputs, the
same messages and exit codes.
"""

from __future__ import annotations

import http.client
import os
import select
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from bad_inputs import ENCRYPTED_KEY, SUBPROCESS_ROWS, TLS, TLS_CERT, assert_one_line, prepared

from conftest import (
    APPS,
    config_json,
    free_port,
    get,
    run_cli,
    setting,
    try_get,
    wait_until,
    write_table,
)

pytestmark = pytest.mark.timeout(60)


# --- the layers, read by the real binary


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


# --- response headers and a metrics address reach the running server --------------------


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


# --- bad input through the real binary: one line, exit 2, names what and where --------------


@pytest.mark.parametrize(("args", "env", "files", "expect", "exact"), SUBPROCESS_ROWS)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, env, files, expect, exact):
    with prepared(tmp_path, args, env, files, expect) as (argv, environ, fragments):
        result = run_cli(*argv, cwd=tmp_path, env=environ, timeout=20)
    assert_one_line(result.returncode, result.stdout, result.stderr, fragments, exact)
