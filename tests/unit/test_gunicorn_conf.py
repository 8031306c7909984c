"""gunicorn's settings as ours: the mapping, the notes, and the layers' precedence.

Values go through gunicorn's own validators first (as `read` does), so each case is what
a real gunicorn.conf.py or GUNICORN_CMD_ARGS yields.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from gunicorn.config import make_settings

from asgi_supervise.config import gunicorn_conf, sources
from asgi_supervise.config.gunicorn_conf import MAPPING, parse_bind, translate
from asgi_supervise.config.settings import FIELDS

SETTINGS = make_settings()
DEFAULTS = {name: setting.value for name, setting in SETTINGS.items()}
SECTIONS = {name: setting.section for name, setting in SETTINGS.items()}


def gunicorn_values(**given: Any) -> dict[str, Any]:
    """Each value as gunicorn's validator leaves it."""
    return {name: SETTINGS[name].validator(value) for name, value in given.items()}


def mapped(**given: Any) -> gunicorn_conf.Translation:
    return translate(gunicorn_values(**given), "g.py", defaults=DEFAULTS, sections=SECTIONS)


def test_the_mapping_names_real_settings_on_both_sides():
    assert set(MAPPING) <= set(SETTINGS), "not a gunicorn setting"
    assert set(gunicorn_conf.WHY) <= set(SETTINGS)
    for name, convert in MAPPING.items():
        if name in ("bind", "worker_class", "accesslog"):  # covered below, value by value
            continue
        value = DEFAULTS[name] if DEFAULTS[name] not in (None, 0) else 1
        assert set(convert(value)) <= set(FIELDS), name


def test_values_with_an_equivalent_become_ours():
    out = mapped(
        workers="3", bind=["0.0.0.0:9000"], timeout="45", graceful_timeout=20,
        max_requests=1000, max_requests_jitter=50, keepalive=7, backlog=64,
        worker_connections=500, forwarded_allow_ips="10.0.0.1,10.0.0.0/8",
        pidfile="/run/app.pid", loglevel="WARNING", errorlog="/var/log/app.log",
        wsgi_app="main:app", root_path="/api", asgi_lifespan="off", asgi_loop="asyncio",
        websocket_max_message_size=1024, reload=True,
    )  # fmt: skip
    assert out.values == {
        "workers": 3, "host": "0.0.0.0", "port": "9000", "worker_timeout": 45,
        "graceful_timeout": 20, "max_requests": 1000, "max_requests_jitter": 50,
        "timeout_keep_alive": 7, "backlog": 64, "limit_concurrency": 500,
        "forwarded_allow_ips": ["10.0.0.1", "10.0.0.0/8"], "pid_file": "/run/app.pid",
        "log_level": "warning", "log_file": "/var/log/app.log", "app": "main:app",
        "root_path": "/api", "lifespan": "off", "loop": "asyncio", "ws_max_size": 1024,
        "reload": True,
    }  # fmt: skip
    assert out.spelled["port"] == out.spelled["host"] == "bind"
    assert out.spelled["worker_timeout"] == "timeout"
    assert out.notes == []


def test_settings_without_an_equivalent_are_named_once_each():
    def on_starting(server):
        pass

    out = mapped(
        on_starting=on_starting, umask="0o22", worker_class="sync", timeout=0, keepalive=0,
        preload_app=True, daemon=False, proxy_protocol="off", max_requests=0,
    )  # fmt: skip
    assert out.notes == [
        "g.py: on_starting (a server hook) has no equivalent here: ignored",
        "g.py: umask=18 has no equivalent here: ignored",
        "g.py: worker_class='sync' (workers run the ASGI app on Uvicorn event loops) has no "
        "equivalent here: ignored",
        "g.py: timeout=0 (0: never kill a silent worker) has no equivalent here: ignored",
        "g.py: keepalive=0 (0: no keep-alive) has no equivalent here: ignored",
    ]  # daemon=False and proxy_protocol="off" are gunicorn's defaults: they ask for nothing
    # gunicorn's 0: no recycling; preload_app is the fork server's --preload
    assert out.values == {"max_requests": None, "preload": True}


@pytest.mark.parametrize(
    ("worker_class", "values", "noted"),
    [
        ("uvicorn.workers.UvicornWorker", {}, False),
        ("uvicorn_worker.UvicornWorker", {}, False),
        ("uvicorn.workers.UvicornH11Worker", {"http": "h11"}, False),
        ("asgi", {}, False),
        ("gthread", {}, True),
    ],
)
def test_uvicorn_worker_classes_are_what_runs_here(worker_class, values, noted):
    out = mapped(worker_class=worker_class)
    assert (out.values, bool(out.notes)) == (values, noted)


@pytest.mark.parametrize(
    ("accesslog", "access_log", "noted"), [(None, False, False), ("-", True, False),
                                           ("/var/log/access.log", True, True)]
)  # fmt: skip
def test_accesslog_turns_access_lines_on_or_off(accesslog, access_log, noted):
    out = mapped(accesslog=accesslog)
    assert out.values == {"access_log": access_log}
    if noted:  # a file of their own is not kept: said so
        assert out.notes == [
            "g.py: accesslog='/var/log/access.log': access-log is on, but access lines go "
            "where the other logs go (stderr or --log-file), not to a file of their own"
        ]
    else:
        assert out.notes == []


@pytest.mark.parametrize(
    ("bind", "expected"),
    [
        ("127.0.0.1:8080", {"host": "127.0.0.1", "port": "8080"}),
        ("[::1]:8080", {"host": "::1", "port": "8080"}),
        ("0.0.0.0", {"host": "0.0.0.0"}),
        (":9000", {"port": "9000"}),
        ("unix:/run/app.sock", {"uds": "/run/app.sock"}),
        ("fd://3", {"fd": 3}),
    ],
)
def test_bind_sets_the_address_settings(bind, expected):
    assert mapped(bind=bind).values == expected


def test_bind_errors_say_what_was_wrong():
    with pytest.raises(gunicorn_conf.GunicornConfigError, match="one master serves one listener"):
        mapped(bind=["127.0.0.1:1", "[::1]:1"])
    with pytest.raises(gunicorn_conf.GunicornConfigError, match=r"g.py: bind=.*port 0-65535"):
        mapped(bind="127.0.0.1:http")
    with pytest.raises(ValueError, match="use --fd N"):  # the command line has --fd
        parse_bind("fd://3")


# --- reading and the layers ---------------------------------------------------------------


def load(tmp_path: Path, flags: dict[str, Any] | None = None, **environ: str) -> sources.Loaded:
    return sources.load(flags or {}, environ=environ, cwd=tmp_path)


def test_precedence_of_every_layer(tmp_path: Path):
    """profile < project file < WEB_CONCURRENCY < gunicorn file < GUNICORN_CMD_ARGS <
    ASGI_SUPERVISE_* < command line, taken away from the top one by one."""
    (tmp_path / "profile.toml").write_text("workers = 2\n")
    (tmp_path / "g.py").write_text("workers = 5\n")
    (tmp_path / "asgi-supervise.toml").write_text(
        f'profile = "{tmp_path / "profile.toml"}"\nworkers = 3\ngunicorn-config = "g.py"\n'
    )
    env = {"WEB_CONCURRENCY": "4", "GUNICORN_CMD_ARGS": "-w 6", "ASGI_SUPERVISE_WORKERS": "7"}

    def workers(flags: dict[str, Any] | None = None, **environ: str) -> tuple[Any, str]:
        loaded = load(tmp_path, flags, **environ)
        return loaded.settings.workers, loaded.origin("workers")

    assert workers({"workers": "8"}, **env) == (8, "flag: command line")
    assert workers(**env) == (7, "env: environment")
    del env["ASGI_SUPERVISE_WORKERS"]
    assert workers(**env) == (6, "env: GUNICORN_CMD_ARGS")
    del env["GUNICORN_CMD_ARGS"]
    assert workers(**env) == (5, "file: g.py")
    (tmp_path / "g.py").write_text("")
    assert workers(**env) == (4, "env: environment")
    assert workers() == (3, "file: asgi-supervise.toml")
    (tmp_path / "asgi-supervise.toml").write_text(f'profile = "{tmp_path / "profile.toml"}"\n')
    assert workers()[0] == 2


def test_which_gunicorn_file_is_read(tmp_path: Path):
    """--gunicorn-config above GUNICORN_CMD_ARGS, else the variable's own --config, else
    one named below it; never an implicit ./gunicorn.conf.py."""
    for name, workers in (("gunicorn.conf.py", 2), ("a.py", 3), ("b.py", 4), ("c.py", 5)):
        (tmp_path / name).write_text(f"workers = {workers}\n")
    (tmp_path / "asgi-supervise.toml").write_text('gunicorn-config = "c.py"\n')
    loaded = load(tmp_path, {"gunicorn_config": "a.py"}, GUNICORN_CMD_ARGS="-c b.py")
    assert (loaded.settings.workers, loaded.origin("workers")) == (3, "file: a.py")
    loaded = load(tmp_path, GUNICORN_CMD_ARGS="-c b.py")
    assert (loaded.settings.workers, loaded.origin("workers")) == (4, "file: b.py")
    assert loaded.origin("gunicorn_config") == "env: GUNICORN_CMD_ARGS"
    assert (load(tmp_path).settings.workers, load(tmp_path).origin("workers")) == (5, "file: c.py")
    (tmp_path / "asgi-supervise.toml").unlink()
    assert load(tmp_path, GUNICORN_CMD_ARGS="").origin("workers") == "default"


def test_the_variables_bind_replaces_the_files(tmp_path: Path):
    (tmp_path / "g.py").write_text("bind = '0.0.0.0:9000'\n")
    loaded = load(tmp_path, {"gunicorn_config": "g.py"}, GUNICORN_CMD_ARGS="-b unix:/tmp/a.sock")
    s = loaded.settings
    assert (s.uds, s.host, s.port) == ("/tmp/a.sock", "127.0.0.1", 8000)
    assert loaded.origin("uds") == "env: GUNICORN_CMD_ARGS"


@pytest.mark.parametrize(
    ("content", "cmd_args", "message"),
    [
        (
            "workers = = 2\n",
            None,
            "--gunicorn-config='g.py' (command line): line 1: invalid syntax",
        ),
        ("x = 1\nworkers = y\n", None, "line 2: NameError: name 'y' is not defined"),
        ("workers = 'many'\n", None, "workers='many': gunicorn rejects it"),
        ("workers = 0\n", None, "workers=0 (g.py): expected an integer >= 1"),
        ("", "--frobnicate 3", "GUNICORN_CMD_ARGS: unrecognized arguments: --frobnicate"),
        ("", "--workers '3", "GUNICORN_CMD_ARGS: No closing quotation"),
        ("", "-w 0", "--workers=0 (GUNICORN_CMD_ARGS): expected an integer >= 1"),
    ],
)
def test_bad_gunicorn_input_is_a_config_error(tmp_path, content, cmd_args, message):
    (tmp_path / "g.py").write_text(content)
    environ = {} if cmd_args is None else {"GUNICORN_CMD_ARGS": cmd_args}
    with pytest.raises(sources.ConfigError) as raised:
        load(tmp_path, {"gunicorn_config": "g.py"}, **environ)
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)
