"""Proxy headers in real workers: applied from the allowed addresses only."""

from __future__ import annotations

import http.client
from typing import Any


def client_seen(port: int, headers: dict[str, str]) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/client", headers=headers)
        response = conn.getresponse()
        assert response.status == 200
        return response.read().decode()
    finally:
        conn.close()


FORWARDED = {"X-Forwarded-For": "198.51.100.7", "X-Forwarded-Proto": "https"}


def test_workers_apply_proxy_headers_from_allowed_addresses_only(supervisor: Any) -> None:
    default = supervisor("testapp:app", "--workers", "1")
    elsewhere = supervisor("testapp:app", "--workers", "1", "--forwarded-allow-ips", "10.0.0.1")
    off = supervisor("testapp:app", "--workers", "1", "--no-proxy-headers")
    for server in (default, elsewhere, off):
        server.wait_ready()
    assert client_seen(default.port, FORWARDED) == "https 198.51.100.7"  # 127.0.0.1 trusted
    assert client_seen(default.port, {}) == "http 127.0.0.1"
    assert client_seen(elsewhere.port, FORWARDED) == "http 127.0.0.1"
    assert client_seen(off.port, FORWARDED) == "http 127.0.0.1"
