"""Helpers for the hospital-site tests: certificates, keys, tiny image folders, site YAMLs.

Everything is generated inside the test's temporary folder (``cryptography`` for the TLS
certificates and the OpenSSH ECDSA node key, Pillow for the images).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from PIL import Image

from consilia.common.child_env import child_env


def free_port() -> int:
    """Return a TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def make_certs(folder: Path, common_name: str = "Consilia test CA") -> dict[str, Path]:
    """Write ``ca.crt``, ``server.crt`` and ``server.key`` (SAN 127.0.0.1, localhost)."""
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name)).issuer_name(_name(common_name))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("coordinator")).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": folder / "ca.crt", "cert": folder / "server.crt", "key": folder / "server.key"}
    paths["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return paths


def make_node_key(path: Path, mode: int = 0o600) -> Path:
    """Write an OpenSSH ECDSA P-384 private key (and ``.pub``) as ``ssh-keygen`` would."""
    path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()))
    os.chmod(path, mode)
    pub = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    path.with_name(path.name + ".pub").write_bytes(pub + b" site\n")
    return path


def make_image_folder(root: Path, classes: dict[str, int], size: int = 12, seed: int = 0) -> Path:
    """Write ``root/<class>/img_<i>.png`` grey images (class-dependent brightness)."""
    rng = np.random.default_rng(seed)
    for k, (name, count) in enumerate(classes.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            base = 40 + 120 * k
            pixels = np.clip(rng.normal(base, 20, (size, size)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(folder / f"img_{i}.png")
    return root


def write_site(folder: Path, coordinator: str = "127.0.0.1:1", **overrides) -> Path:
    """Write a working site setup (key, CA, images) and its YAML; return the YAML path.

    ``overrides`` replace top-level sections of the YAML (``policy=...``, ``runtime=...``).
    """
    folder.mkdir(parents=True, exist_ok=True)
    certs = make_certs(folder / "certs")
    make_node_key(folder / "keys" / "site.key")
    make_image_folder(folder / "images", {"normal": 6, "pneumonia": 6})
    data = {
        "name": "hospital-a",
        "coordinator": {
            "address": coordinator,
            "ca_certificate": str(certs["ca"].relative_to(folder)),
            "auth_key": "keys/site.key",
            "connect_timeout_s": 2,
        },
        "data": {"kind": "image_folder", "root": "images"},
        "state_dir": "state",
        "runtime": {"runtime_port": free_port()},
    }
    data.update(overrides)
    path = folder / "site.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class TLSServer:
    """A TLS server on 127.0.0.1 that completes handshakes (stands in for the coordinator)."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(str(cert), str(key))
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.handshakes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            try:
                conn.settimeout(2)
                with self.context.wrap_socket(conn, server_side=True):
                    self.handshakes += 1
            except (ssl.SSLError, OSError):
                pass

    def __enter__(self) -> TLSServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


# ---------------------------------------------------------------------------------------
# A real local federation: SuperLink (TLS + node auth) and probe runs
# ---------------------------------------------------------------------------------------

PROBE_SERVER = '''"""Probe ServerApp: send Consilia instructions, record replies."""
import json
import time

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from consilia.client.trainer import build_task_model
from consilia.common.config import RunConfig
from consilia.common.serde import arrays_from_model
from consilia.common.instructions import RoundInstruction

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    cap = float(cfg["grid-poll-s"])
    if cap < 3.0:  # Flower's HttpGrid polls replies every 3 s: measure the sites, not that
        import types

        import flwr.superlink.grid.http_grid as http_grid

        http_grid.time = types.SimpleNamespace(
            time=time.time, sleep=lambda s: time.sleep(min(s, cap)))
    run = RunConfig.model_validate_json(str(cfg["run-json"]))
    deadline = time.time() + float(cfg["wait-s"])
    while len(nodes := list(grid.get_node_ids())) < int(cfg["sites"]):
        if time.time() > deadline:
            break
        time.sleep(0.2)
    model = build_task_model(run.model.name, dict(run.model.kwargs), run.task)
    arrays = arrays_from_model(model)
    out = {"nodes": len(nodes), "rounds": []}
    kinds = [MessageType.TRAIN] + ([MessageType.EVALUATE] if cfg["evaluate"] else [])
    for rnd in range(1, run.strategy.rounds + 1):
        for kind in kinds:
            config = RoundInstruction.base_config(run)
            config["server-round"] = rnd
            msgs = [Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=n,
                            message_type=kind, group_id=str(rnd)) for n in nodes]
            start = time.time()
            replies = list(grid.send_and_receive(msgs, timeout=float(cfg["timeout-s"])))
            entry = {"round": rnd, "type": kind, "seconds": time.time() - start, "replies": []}
            for rep in replies:
                if rep.has_error():
                    entry["replies"].append({"error": rep.error.reason})
                else:
                    entry["replies"].append({"metrics": dict(rep.content["metrics"])})
                    if kind == MessageType.TRAIN:
                        arrays = rep.content["arrays"]
            out["rounds"].append(entry)
    with open(str(cfg["out"]), "w") as handle:
        json.dump(out, handle, indent=1)
'''


def write_probe_app(
    folder: Path, run_json: str, out: Path, *, version: str = "0.1.0",
    clientapp: str = "consilia.client.app:app", sites: int = 1, evaluate: bool = False,
    extra_files: dict[str, str] | None = None, wait_s: float = 60, timeout_s: float = 120,
    grid_poll_s: float = 3.0,
) -> Path:
    """Write a Flower app whose ServerApp probes the sites with Consilia instructions."""
    import tomli_w

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "probe_server.py").write_text(PROBE_SERVER)
    for name, text in (extra_files or {}).items():
        (folder / name).write_text(text)
    project = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": "consilia-run", "version": version, "dependencies": []},
        "tool": {
            "hatch": {"build": {"targets": {"wheel": {"packages": ["."]}}}},
            "flwr": {"app": {
                "publisher": "consilia",
                "components": {"serverapp": "probe_server:app", "clientapp": clientapp},
                "config": {"run-json": run_json, "out": str(out), "sites": sites,
                           "evaluate": evaluate, "wait-s": float(wait_s),
                           "timeout-s": float(timeout_s), "grid-poll-s": float(grid_poll_s)},
            }},
        },
    }
    (folder / "pyproject.toml").write_text(tomli_w.dumps(project))
    return folder


def tiny_run_json(rounds: int = 1, **dp) -> str:
    """A tiny Consilia run (cnn, 16 px grey, two classes) as JSON."""
    from consilia.common.config import RunConfig

    data = {
        "name": "probe", "seed": 1,
        "model": {"name": "cnn"},
        "train": {"local_epochs": 1, "batch_size": 4},
        "strategy": {"rounds": rounds},
        "task": {"class_names": ["normal", "pneumonia"], "in_channels": 1, "image_size": 16},
    }
    if dp:
        data["dp"] = dp
    return RunConfig.model_validate(data).model_dump_json()


class LocalSuperLink:
    """``flower-superlink`` with TLS and node authentication on 127.0.0.1, plus ``flwr`` calls."""

    def __init__(self, folder: Path, certs: dict[str, Path]) -> None:
        self.folder = folder
        self.certs = certs
        self.port = free_port()
        self.home = folder / "flwr-home"
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            "[superlink]\ndefault = \"local\"\n\n[superlink.local]\n"
            f"address = \"127.0.0.1:{self.port}\"\nroot-certificates = \"{certs['ca']}\"\n"
        )
        self.env = child_env(FLWR_HOME=str(self.home), FLWR_TELEMETRY_ENABLED="0")
        self.bin = Path(sys.executable).parent
        self.process = None

    def start(self, timeout_s: float = 60) -> LocalSuperLink:
        log = (self.folder / "superlink.log").open("w")
        self.process = subprocess.Popen(
            [str(self.bin / "flower-superlink"),
             "--ssl-ca-certfile", str(self.certs["ca"]),
             "--ssl-certfile", str(self.certs["cert"]),
             "--ssl-keyfile", str(self.certs["key"]),
             "--enable-supernode-auth", "--disable-runtime-dependency-installation",
             "--database", str(self.folder / "superlink.db"),
             "--host", "127.0.0.1", "--port", str(self.port)],
            env=self.env, stdout=log, stderr=subprocess.STDOUT,
        )
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.process.poll() is not None:
                text = (self.folder / "superlink.log").read_text()
                raise RuntimeError(f"superlink exited: {text}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.3)
        raise RuntimeError("superlink did not start")

    def flwr(self, *args: str, timeout_s: float = 120) -> str:
        res = subprocess.run([str(self.bin / "flwr"), *args], env=self.env, capture_output=True,
                             text=True, timeout=timeout_s, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args)} failed: {res.stdout}\n{res.stderr}")
        return res.stdout

    def register(self, public_key: Path, name: str) -> None:
        self.flwr("supernode", "register", str(public_key), "local", "--name", name)

    def submit(self, app_dir: Path) -> int:
        out = self.flwr("run", str(app_dir), "local", "--format", "json")
        return int(json.loads(out[out.index("{"):])["run-id"])

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except Exception:  # noqa: BLE001
                self.process.kill()
                self.process.wait()
