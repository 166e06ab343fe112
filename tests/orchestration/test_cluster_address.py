"""cluster.address is checked with a plain TCP connect before ray.init: fast, clear failures, no Ray started."""
from __future__ import annotations

import socket
import time

import pytest

from lpt_core.config import ConfigError
from orchestration.cluster.ray_connection import ClusterError, _host_port, check_reachable


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nobody listens on it once the socket is closed


def test_closed_port_fails_fast_naming_the_address() -> None:
    address, timeout = f"127.0.0.1:{closed_port()}", 3.0
    start = time.monotonic()
    with pytest.raises(ClusterError) as info:
        check_reachable(address, timeout)
    assert time.monotonic() - start < timeout + 2  # no ray.init-style retry loop
    assert f"cluster.address='{address}'" in str(info.value) and "ray start --head" in str(info.value)


def test_ray_client_address_is_checked_too() -> None:
    with pytest.raises(ClusterError, match=r"ray://127\.0\.0\.1"):
        check_reachable(f"ray://127.0.0.1:{closed_port()}", 3.0)


@pytest.mark.parametrize("address", ["127.0.0.1:notaport", "ray://head:port", "head:6379:1"])
def test_malformed_address_is_a_config_error(address: str) -> None:
    with pytest.raises(ConfigError, match="expected host:port or ray://host:port"):
        check_reachable(address, 1.0)


def test_listening_head_passes() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        check_reachable(f"127.0.0.1:{port}", 3.0)
        check_reachable(f"ray://127.0.0.1:{port}", 3.0)


def test_default_ports() -> None:
    assert _host_port("head") == ("head", 6379)
    assert _host_port("head:1234") == ("head", 1234)
    assert _host_port("ray://head") == ("head", 10001)
