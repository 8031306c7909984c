"""The settings as data (`config/values.py`) and the child that reads them
(`config/reader.py`): what a master holds instead of the pydantic model."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import threading

import psutil
import pytest

from asgi_supervise.config import sources
from asgi_supervise.config.reader import Ended, Reading, RunCommand, in_child
from asgi_supervise.config.settings import Settings, as_values
from asgi_supervise.config.values import ConfigError, Loaded, Values
from asgi_supervise.master.liveconfig import reconcile

pytestmark = pytest.mark.timeout(30)


def test_values_read_like_the_model_and_survive_a_pipe():
    model = Settings.model_validate({"workers": 3, "ssl_keyfile_password": "s3cret"})
    values = as_values(model)
    assert (values.workers, values.host, values.reload_dirs) == (3, "127.0.0.1", [])
    assert values.model_dump() == model.model_dump(mode="json")
    assert values.names == tuple(Settings.model_fields)
    again = pickle.loads(pickle.dumps(values))
    assert again == values and again.hidden("ssl_keyfile_password") == "***"
    assert "s3cret" not in repr(values)
    with pytest.raises(AttributeError):
        values.workers = 4
    with pytest.raises(AttributeError, match="no setting 'wokers'"):
        values.model_copy(update={"wokers": 4})
    four = values.model_copy(update={"workers": 4})
    assert (four.workers, values.workers) == (4, 3)
    dumped = values.model_dump()
    dumped["reload_dirs"].append("src")  # a copy: the values stay as they were
    assert values.reload_dirs == []


def test_loaded_says_where_each_value_came_from(tmp_path):
    (tmp_path / "asgi-supervise.toml").write_text('workers = 2\ndb_url_note = "x"\n')
    with pytest.raises(ConfigError, match="unknown setting 'db_url_note'"):
        sources.load({}, environ={}, cwd=tmp_path)
    (tmp_path / "asgi-supervise.toml").write_text("workers = 2\n")
    loaded = sources.load({"port": 8123}, environ={"ASGI_SUPERVISE_HOST": "::1"}, cwd=tmp_path)
    assert loaded.origin("workers") == "file: asgi-supervise.toml"
    assert loaded.origin("host") == "env: environment" and loaded.origin("uds") == "default"
    assert loaded.describe("port") == "--port=8123 (command line)"
    assert loaded.describe("uds") == "uds not set"
    assert loaded.describe("backlog") == "backlog=2048 (default)"
    document = pickle.loads(pickle.dumps(loaded)).document()
    assert document["settings"]["workers"] == {"value": 2, "source": "file: asgi-supervise.toml"}
    assert document["drain"]["worst_case_s"] == loaded.document()["drain"]["worst_case_s"]


def test_a_kept_setting_keeps_its_running_spelling_for_messages(tmp_path):
    running = sources.load({"port": 8123}, environ={}, cwd=tmp_path)
    change = reconcile(running, sources.load({"port": 9000}, environ={}, cwd=tmp_path))
    assert change.settings.port == 8123
    assert change.loaded.describe("port") == "--port=8123 (command line)"
    assert change.kept == ["port 8123 -> 9000 (flag: command line)"]


def test_the_child_returns_its_result_or_its_one_line_error():
    assert in_child(lambda: ("pid", os.getpid()))[1] != os.getpid()

    def invalid() -> Loaded:
        raise ConfigError("workers='many' (conf.toml): expected an integer >= 1")

    with pytest.raises(ConfigError, match=r"^workers='many' \(conf.toml\)"):
        in_child(invalid)
    with pytest.raises(Ended) as ended:
        in_child(lambda: sys.exit(2))  # argparse's usage error, printed by the child
    assert ended.value.code == 2
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        in_child(lambda: 1 / 0)


def test_a_child_that_dies_is_a_config_error_and_leaves_no_zombie():
    before = {child.pid for child in psutil.Process().children()}
    with pytest.raises(ConfigError, match="ended by signal 9"):
        in_child(lambda: os.kill(os.getpid(), signal.SIGKILL))
    assert {child.pid for child in psutil.Process().children()} == before  # reaped


def test_the_child_reads_while_the_caller_goes_on():
    reading = Reading(os.getpid)
    assert reading.pid != os.getpid() and reading.pid > 0
    assert reading.result() == reading.pid


def test_with_other_threads_it_reads_in_this_process():
    """A fork would copy another thread's held locks; gunicorn's master has one."""
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        assert in_child(os.getpid) == os.getpid()
    finally:
        stop.set()
        other.join()


def test_out_of_descriptors_it_reads_in_this_process():
    """No pipe for a child (EMFILE): the read still happens, here."""
    code = (
        "import os, resource\n"
        "from asgi_supervise.config.reader import in_child\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))\n"
        "held = []\n"
        "try:\n"
        "    while True:\n"
        "        held.append(os.open(os.devnull, os.O_RDONLY))\n"
        "except OSError:\n"
        "    pass\n"
        "print(in_child(os.getpid) == os.getpid())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20)
    assert (done.returncode, done.stdout.strip()) == (0, "True"), done.stderr


def test_a_run_command_rereads_the_layers_as_they_are_now(tmp_path):
    conf = tmp_path / "conf.toml"
    conf.write_text("workers = 2\n")
    command = RunCommand({"app": "testapp:app"}, None, str(conf))
    assert command.reread().settings.workers == 2
    conf.write_text("workers = 5\n")
    loaded = command.reread()
    assert isinstance(loaded.settings, Values) and loaded.settings.workers == 5
    assert loaded.origin("workers") == f"file: {conf}"


def test_the_master_side_imports_no_pydantic():
    """What a master imports to run: its start, the arbiter, the reader (a fresh process)."""
    code = (
        "import sys\n"
        "import asgi_supervise.launch, asgi_supervise.master.start\n"
        "import asgi_supervise.master.arbiter, asgi_supervise.config.reader\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pydantic', 'pydantic_core')"
        " or m in ('asgi_supervise.cli', 'asgi_supervise.config.settings')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
