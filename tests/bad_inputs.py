"""Bad input of every kind, and what the CLI must say about it: one line naming the
setting, the value and where it came from, exit 2, nothing started.

One table for both runners: tests/unit/test_config_cli.py calls the CLI's `main` in-process
for every row that a process adds nothing to; tests/e2e/test_config_layers.py runs the
`SUBPROCESS` rows through the real binary (argv, environment, exit status, a real app
directory, ports really held).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import APPS, free_port

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


# Through the real binary: one of each kind of source (a flag, an environment variable, a
# file value), an app that cannot be imported, and every row whose app module exists or
# that binds a port, so that a regression letting it pass starts a master in its own
# process, not inside the test run.
SUBPROCESS = {
    "unknown-flag",
    "workers-abc-env",
    "file-workers-float",
    "app-missing-module",
    "log-config-broken",
    "app-missing-attribute",
    "app-from-env-missing-attribute",
    "app-attribute-of-a-package",
    "min-ready-above-auto-plan",
    "port-in-use",
    "port-in-use-env",
    "metrics-port-in-use",
    "metrics-port-in-use-profile",
}
IN_PROCESS_ROWS = [row for row in BAD_INPUTS if row.id not in SUBPROCESS]
SUBPROCESS_ROWS = [row for row in BAD_INPUTS if row.id in SUBPROCESS]


@contextlib.contextmanager
def prepared(
    tmp_path: Path, args: list[str], env: dict[str, str], files: dict[str, Any], expect: tuple
) -> Iterator[tuple[list[str], dict[str, str], list[str]]]:
    """Write the row's files and fill in its ports: `{port}` a free one, `{held}` one held
    listening until the block ends. Yields argv, environment and expected fragments."""
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
        yield argv, {key: fill(value) for key, value in env.items()}, [fill(f) for f in expect]


def assert_one_line(code: int, stdout: str, stderr: str, expect: list[str], exact: bool) -> None:
    """Exit 2, nothing on stdout, one line on stderr holding every expected fragment."""
    output = stdout + stderr
    assert "Traceback" not in output, output
    assert code == 2, output
    assert stdout == ""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    (line,) = lines
    assert line.startswith("asgi-supervise: "), line
    if exact:
        assert line == "asgi-supervise: " + expect[0]
    for fragment in expect:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    assert "booting" not in output and " ready in " not in output
