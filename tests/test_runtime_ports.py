"""Ray tier: a local Ray instance that lepton_ray starts (``ensure_ray``) listens on loopback only.

Every listening socket of the instance's processes (this test process, which started it, and all
its descendants: GCS, raylet, dashboard, agents, workers, Serve's proxy) is checked; sockets of
other processes on the machine (other Ray instances included) are not this instance's.
"""

from __future__ import annotations

import ipaddress
import os

import psutil
import pytest

pytestmark = pytest.mark.ray


def instance_pids() -> set[int]:
    me = psutil.Process(os.getpid())
    return {me.pid} | {p.pid for p in me.children(recursive=True)}


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return (mapped or address).is_loopback


def test_a_local_instance_listens_on_loopback_only(ray_session, serve_port):
    from ray import serve

    # Start Serve's controller and proxy too, on the host lepton_ray's deploy() uses by default.
    serve.start(http_options={"host": "127.0.0.1", "port": serve_port})
    ray_session.get([ray_session.remote(lambda: 1).remote() for _ in range(2)])  # workers up
    pids = instance_pids()
    listening = [
        (c.laddr.ip, c.laddr.port, psutil.Process(c.pid).name())
        for c in psutil.net_connections("inet")
        if c.status == psutil.CONN_LISTEN and c.pid in pids
    ]
    names = {name for _, _, name in listening}
    assert any("gcs_server" in n for n in names) and any("raylet" in n for n in names), listening
    open_to_network = [entry for entry in listening if not is_loopback(entry[0])]
    assert not open_to_network, open_to_network
    node = ray_session._private.worker.global_worker.node
    assert node.node_ip_address == "127.0.0.1"
