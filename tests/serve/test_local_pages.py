"""The loopback guards ``serve`` and ``mindset`` share (memstore_gpt2/local_pages.py)."""

from __future__ import annotations

import pytest

from memstore_gpt2.local_pages import is_loopback_host, is_loopback_origin, split_host


@pytest.mark.parametrize(
    ("host", "expected"),
    [("127.0.0.1:8000", ("127.0.0.1", "8000")), ("LocalHost", ("localhost", None)),
     ("[::1]:9", ("::1", "9")), ("[::1]", ("::1", None)), ("evil.example:80", ("evil.example", "80"))],
)  # fmt: skip
def test_split_host(host, expected):
    assert split_host(host) == expected


def test_a_loopback_host_and_with_a_port_only_that_port():
    assert is_loopback_host("127.0.0.1:8000") and is_loopback_host("[::1]:1")
    assert not is_loopback_host("evil.example") and not is_loopback_host("127.0.0.2:8000")
    assert is_loopback_host("localhost:5000", "5000") and is_loopback_host("localhost", "80")
    assert not is_loopback_host("127.0.0.1:3000", "5000")  # another local server's page


def test_only_this_servers_page_is_a_loopback_origin():
    assert is_loopback_origin("http://127.0.0.1:5000", "5000")
    assert not is_loopback_origin("http://127.0.0.1:3000", "5000")
    assert not is_loopback_origin("https://127.0.0.1:5000", "5000")
    assert not is_loopback_origin("http://evil.example:5000", "5000")
    assert not is_loopback_origin("http://127.0.0.1:port", "5000")
