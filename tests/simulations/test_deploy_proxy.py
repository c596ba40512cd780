"""The coordinator's nginx reverse proxy, for real: sites get the fleet API, only operators control.

SuperLink (``fl-server start``, TLS + site keys) on 127.0.0.1; nginx in front of it with the
configuration ``fl-server proxy-config`` renders from ``deploy/nginx/``; operator address
127.0.0.1, a "stranger" connecting from 127.0.0.2. Needs the ``nginx`` binary (Debian package
``nginx``/``nginx-light``): the test fails when CI=true and nginx is missing, else it skips.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys

import pytest
from flwr.proto.control_pb2 import ListNodesRequest  # pylint: disable=no-name-in-module

from consilia.simulations.local_federation import LocalFederation, free_port, wait_for

pytestmark = pytest.mark.slow

PROTOBUF = "application/protobuf"
OPERATOR, STRANGER = "127.0.0.1", "127.0.0.2"


@pytest.fixture(scope="module")
def nginx_binary() -> str:
    path = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx")
                                     else None)
    if path is None:
        message = "nginx not installed (apt-get install nginx-light)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def proxied(nginx_binary, tmp_path_factory):
    root = tmp_path_factory.mktemp("proxy")
    fed = LocalFederation(root, ["site-a"], env={"OMP_NUM_THREADS": "1"})
    fed.generate_certs()
    nginx = None
    try:
        fed.start_coordinator()
        fed.register_sites()
        port = free_port()
        fed.fl_server("proxy-config", "--operators", f"{OPERATOR}/32", "--certs",
                      str(fed.certs), "--listen", f"127.0.0.1:{port}", "--superlink-address",
                      fed.address, "--superlink-tls-name", "localhost",
                      "--out", str(root / "nginx"))
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (root / "tmp" / sub).mkdir(parents=True, exist_ok=True)
        temp = " ".join(f"{kind}_temp_path {root}/tmp/{sub};" for kind, sub in (
            ("client_body", "body"), ("proxy", "proxy"), ("fastcgi", "fastcgi"),
            ("uwsgi", "uwsgi"), ("scgi", "scgi")))
        user = "user root;\n" if os.geteuid() == 0 else ""
        (root / "nginx.conf").write_text(
            f"{user}worker_processes 1;\npid {root}/nginx.pid;\n"
            f"error_log {root}/nginx-error.log info;\nevents {{ worker_connections 64; }}\n"
            f"http {{ access_log {root}/nginx-access.log; {temp}\n"
            f"  include {root}/nginx/consilia-coordinator.conf; }}\n")
        nginx = subprocess.Popen([nginx_binary, "-c", str(root / "nginx.conf"), "-p", str(root),
                                  "-g", "daemon off;"], stdout=subprocess.DEVNULL,
                                 stderr=(root / "nginx.out").open("w"))

        def _listening() -> bool:
            if nginx.poll() is not None:
                raise RuntimeError((root / "nginx.out").read_text())
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True
            except OSError:
                return False

        wait_for(_listening, 30, "nginx to listen", poll_s=0.2)
        yield fed, port
    finally:
        if nginx is not None and nginx.poll() is None:
            nginx.send_signal(signal.SIGQUIT)
            try:
                nginx.wait(timeout=10)
            except subprocess.TimeoutExpired:
                nginx.kill()
        fed.stop()


def _request(fed: LocalFederation, port: int, source: str, path: str, body: bytes = b"",
             method: str = "POST") -> tuple[int, bytes]:
    context = ssl.create_default_context(cafile=str(fed.certs / "ca.crt"))
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=20,
                                       source_address=(source, 0))
    try:
        conn.request(method, path, body=body, headers={"Content-Type": PROTOBUF})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_control_api_refused_from_non_operator_address(proxied):
    fed, port = proxied
    body = ListNodesRequest().SerializeToString()
    status, text = _request(fed, port, STRANGER, "/v1/control/list-nodes", body)
    assert status == 403
    assert b"control API answers only operator addresses" in text
    status, _ = _request(fed, port, OPERATOR, "/v1/control/list-nodes", body)
    assert status == 200  # the same call from the operator's address passes


def test_runtime_api_and_docs_never_pass_the_proxy(proxied):
    fed, port = proxied
    for path, method in (("/v1/runtime/acquire-task", "POST"), ("/docs", "GET"),
                         ("/openapi.json", "GET"), ("/v1/fleet/../control/list-nodes", "POST")):
        status, _ = _request(fed, port, OPERATOR if path.startswith("/v1/run") else STRANGER,
                             path, method=method)
        assert status in (403, 400), (path, status)


def test_fleet_api_reaches_the_superlink_from_anywhere(proxied):
    fed, port = proxied
    status, text = _request(fed, port, STRANGER, "/v1/fleet/get-run", b"")
    # answered by the SuperLink (which still demands a registered site key), not the proxy
    assert status != 403 and b"consilia coordinator proxy" not in text


def test_operator_cli_and_a_real_site_work_through_the_proxy(proxied, tmp_path):
    fed, port = proxied
    # the operator's own state dir pointed at the proxy (a remote operator workstation)
    cmd = [sys.executable, "-m", "consilia.server.control.cli", "--state-dir",
           str(tmp_path / "remote-operator"), "sites", "--json", "--superlink",
           f"127.0.0.1:{port}", "--ca", str(fed.certs / "ca.crt")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=fed._env())
    assert res.returncode == 0, res.stderr
    assert [row["status"] for row in json.loads(res.stdout)] == ["registered"]
    empty = tmp_path / "data"
    empty.mkdir()
    (empty / "labels.csv").write_text("path,label\n")
    fed.write_site_config("site-a", empty, address=f"127.0.0.1:{port}")
    fed.start_site("site-a")
    fed.wait_online(["site-a"], timeout_s=180)  # fleet API + node auth through nginx
    log = (fed.root / "nginx-access.log").read_text()
    assert "/v1/fleet/activate-node" in log
