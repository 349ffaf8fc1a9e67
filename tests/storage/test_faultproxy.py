"""The fault proxy itself, from a sync test (it runs its own loop in a thread)."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from tests.faultproxy import FaultProxy


def test_proxy_forwards_and_injects(s3_server: str) -> None:
    port = int(s3_server.rsplit(":", 1)[1])
    with FaultProxy("127.0.0.1", port) as proxy:
        with urllib.request.urlopen(proxy.url + "/", timeout=5) as resp:
            assert resp.status == 200
        proxy.fail_next(2, 503)
        for _ in range(2):
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(proxy.url + "/", timeout=5)
            assert info.value.code == 503
        proxy.down()
        with pytest.raises(OSError):
            urllib.request.urlopen(proxy.url + "/", timeout=5)
        proxy.clear()
        with urllib.request.urlopen(proxy.url + "/", timeout=5) as resp:
            assert resp.status == 200
        assert proxy.injected["http_503"] == 2 and proxy.injected["refused"] >= 1
        assert len(proxy.requests) == 4
