"""What a reload applies and what it keeps (no processes)."""

from __future__ import annotations

from asgi_supervise.config import sources
from asgi_supervise.master.liveconfig import reconcile


def test_restart_only_settings_keep_their_running_value_and_source(tmp_path):
    running = sources.load({}, environ={}, cwd=tmp_path)
    (tmp_path / "asgi-supervise.toml").write_text(
        'workers = 3\nhost = "0.0.0.0"\nlog_format = "json"\nssl_keyfile_password = "s3cret"\n'
    )
    change = reconcile(running, sources.load({}, environ={}, cwd=tmp_path))
    s = change.settings
    assert (s.workers, s.log_format, s.host) == (3, "json", "127.0.0.1")
    assert change.loaded.origin("host") == "default"
    assert change.loaded.origin("workers") == "file: asgi-supervise.toml"
    assert change.kept == ["host '127.0.0.1' -> '0.0.0.0' (file: asgi-supervise.toml)"]
    assert "workers 1 -> 3 (file: asgi-supervise.toml)" in change.applied
    assert not any("s3cret" in line for line in change.applied)
    assert change.changed("log_format") and not change.changed("log_level")
