"""The settings as data (`config/values.py`) and the child that reads them
(`config/reader.py`): what a master holds instead of the pydantic model."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap

import pytest

from asgi_supervise.config import sources
from asgi_supervise.config.settings import Settings, as_values
from asgi_supervise.config.values import ConfigError
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


def _fresh(code: str, *args: str) -> str:
    """`code` in a fresh interpreter, with one thread as a master has (a test runner's
    process has others: the reader would rightly not fork there); its stdout."""
    script = "import os, sys\nfrom asgi_supervise.config.reader import *\n" + code
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_child_returns_its_result_or_its_one_line_error():
    out = _fresh(
        """
from asgi_supervise.config.values import ConfigError
def invalid():
    raise ConfigError("workers='many' (conf.toml): expected an integer >= 1")
def outcome(read):
    try:
        return repr(in_child(read))
    except (ConfigError, Ended, RuntimeError) as exc:
        return f"{type(exc).__name__}: {getattr(exc, 'code', exc)}".splitlines()[0]
print(in_child(os.getpid) != os.getpid())
print(outcome(invalid))
print(outcome(lambda: sys.exit(2)))  # argparse's usage error, printed by the child
print(outcome(lambda: 1 / 0))
"""
    )
    assert out.splitlines() == [
        "True",
        "ConfigError: workers='many' (conf.toml): expected an integer >= 1",
        "Ended: 2",
        "RuntimeError: reading the settings failed:",
    ]


def test_a_child_that_dies_is_a_config_error_and_leaves_no_zombie():
    out = _fresh(
        """
import signal
try:
    in_child(lambda: os.kill(os.getpid(), signal.SIGKILL))
except Exception as exc:
    print(exc)
try:
    os.waitpid(-1, os.WNOHANG)
except ChildProcessError:
    print("reaped")
"""
    )
    assert out.splitlines() == [
        "the settings could not be read: their reader ended by signal 9",
        "reaped",
    ]


def test_the_child_reads_while_the_caller_goes_on():
    out = _fresh(
        """
reading = Reading(os.getpid)
print(reading.pid not in (0, os.getpid()), reading.result() == reading.pid)
"""
    )
    assert out == "True True"


def test_with_other_threads_it_reads_in_this_process():
    """A fork would copy another thread's held locks; gunicorn's master has one."""
    out = _fresh(
        """
import textwrap
stop = threading.Event()
other = threading.Thread(target=stop.wait)
other.start()
print(in_child(os.getpid) == os.getpid())
stop.set()
other.join()
import time
deadline = time.monotonic() + 5
while len(os.listdir("/proc/self/task")) > 1 and time.monotonic() < deadline:
    time.sleep(0.001)  # the kernel's thread outlives join() by a moment
print(in_child(os.getpid) == os.getpid())
"""
    )
    assert out.splitlines() == ["True", "False"]


def test_out_of_descriptors_it_reads_in_this_process():
    """No pipe for a child (EMFILE): the read still happens, here."""
    out = _fresh(
        """
import resource
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
held = []
try:
    while True:
        held.append(os.open(os.devnull, os.O_RDONLY))
except OSError:
    pass
print(in_child(os.getpid) == os.getpid())
"""
    )
    assert out == "True"


def test_a_run_command_rereads_the_layers_as_they_are_now(tmp_path):
    conf = tmp_path / "conf.toml"
    conf.write_text("workers = 2\n")
    code = """
conf = sys.argv[1]
command = RunCommand({"app": "testapp:app"}, None, conf)
first = command.reread()
open(conf, "w").write("workers = 5\\n")
second = command.reread()
print(first.settings.workers, second.settings.workers, type(second.settings).__name__)
print(second.origin("workers"), "pydantic" in sys.modules)
"""
    out = _fresh(code, str(conf))
    assert out.splitlines() == ["2 5 Values", f"file: {conf} False"]


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
