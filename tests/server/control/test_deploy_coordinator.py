"""Coordinator side of the deployment, without processes: fl-server pieces and deploy/ files."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from consilia.common.config import ConfigError, RunConfig
from consilia.server.control import cli
from consilia.server.control.flwr_cli import (
    Connection,
    FlowerOperator,
    OperatorError,
    write_connection,
)
from consilia.server.control.proxy import (
    ProxyConfigError,
    operators_allow_file,
    render_proxy_config,
)
from consilia.server.control.run_launcher import (
    check_test_set,
    format_round,
    load_run_config,
    prepare_run_dir,
    readable_reason,
)
from consilia.server.control.site_registry import SiteRegistry, SiteRegistryError, read_public_key
from consilia.server.control.superlink import (
    CoordinatorCerts,
    SuperLinkError,
    SuperLinkSettings,
    superlink_command,
)

REPO = Path(__file__).resolve().parents[3]
DEPLOY = REPO / "deploy"
TASK = {"class_names": ["normal", "pneumonia"], "in_channels": 1, "image_size": 16}


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    subprocess.run(["bash", str(DEPLOY / "gen-certs.sh"), "-o", str(out), "--dns",
                    "fl.example.org", "--ip", "10.1.2.3", "--site", "site-a", "--site",
                    "site-b"], check=True, capture_output=True)
    return out


# -- certificates -------------------------------------------------------------------------------
def test_gen_certs_writes_ca_server_cert_with_sans_and_site_keys(certs):
    text = subprocess.run(["openssl", "x509", "-in", str(certs / "coordinator.crt"), "-noout",
                           "-ext", "subjectAltName,extendedKeyUsage"],
                          check=True, capture_output=True, text=True).stdout
    for san in ("DNS:localhost", "IP Address:127.0.0.1", "DNS:fl.example.org",
                "IP Address:10.1.2.3"):
        assert san in text
    assert "TLS Web Server Authentication" in text
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(certs / "ca.crt"),
                             str(certs / "coordinator.crt")], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    for site in ("site-a", "site-b"):
        key = certs / "sites" / site / "supernode.key"
        assert key.stat().st_mode & 0o077 == 0  # private key readable by its owner only
        assert (key.parent / "supernode.key.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
        assert (key.parent / "ca.crt").read_bytes() == (certs / "ca.crt").read_bytes()
    assert (certs / "ca.key").stat().st_mode & 0o077 == 0


def test_gen_certs_keeps_existing_files_and_adds_new_sites(certs):
    before = (certs / "coordinator.crt").read_bytes()
    subprocess.run(["bash", str(DEPLOY / "gen-certs.sh"), "-o", str(certs), "--site", "site-c"],
                   check=True, capture_output=True)
    assert (certs / "coordinator.crt").read_bytes() == before
    assert (certs / "sites" / "site-c" / "supernode.key.pub").is_file()


def test_gen_certs_rejects_bad_site_name(tmp_path):
    res = subprocess.run(["bash", str(DEPLOY / "gen-certs.sh"), "-o", str(tmp_path), "--site",
                          "../evil"], capture_output=True, text=True)
    assert res.returncode == 2 and "site name" in res.stderr


# -- SuperLink command ------------------------------------------------------------------------
def test_start_registers_the_known_sites_again_with_their_stored_keys(certs, tmp_path):
    from consilia.server.control.cli import restore_registered_sites
    from consilia.server.control.flwr_cli import OperatorError

    registry = SiteRegistry(tmp_path / "sites.json")
    line, fingerprint = read_public_key(certs / "sites" / "site-a" / "supernode.key.pub")
    registry.add("site-a", 11, fingerprint, line)
    registry.add("old-site", 12, "SHA256:x")  # registered before keys were stored
    _, fp_b = read_public_key(certs / "sites" / "site-b" / "supernode.key.pub")
    registry.add("site-b", 13, fp_b, "ecdsa-sha2-nistp384 AAAA")

    class FakeOperator:
        seen: list[tuple[str, str]] = []

        def register_node(self, key: Path, name: str) -> int:
            self.seen.append((name, key.read_text().strip()))
            if name == "site-b":
                raise OperatorError("key rejected")
            return 101

    lines = restore_registered_sites(registry, FakeOperator())
    assert FakeOperator.seen[0] == ("site-a", line)
    assert lines[0] == "registered 1 site(s) again: site-a"
    assert "no stored key for old-site" in lines[1]
    assert "site-b (key rejected)" in lines[2]
    ids = {e.name: e.node_id for e in registry.load()}
    assert ids == {"site-a": 101, "old-site": 12, "site-b": 13}


def test_superlink_command_has_tls_node_auth_and_no_runtime_installs(certs, tmp_path):
    settings = SuperLinkSettings(state_dir=tmp_path, certs=CoordinatorCerts.from_dir(certs),
                                 host="127.0.0.1", port=9999)
    cmd = superlink_command(settings)
    assert "--enable-supernode-auth" in cmd
    assert "--disable-runtime-dependency-installation" in cmd
    assert "--insecure" not in cmd
    for flag, name in (("--ssl-ca-certfile", "ca.crt"), ("--ssl-certfile", "coordinator.crt"),
                       ("--ssl-keyfile", "coordinator.key")):
        assert Path(cmd[cmd.index(flag) + 1]).name == name
    assert cmd[cmd.index("--database") + 1] == ":flwr-in-memory:"  # the default
    sqlite = SuperLinkSettings(state_dir=tmp_path, certs=settings.certs, memory_state=False)
    assert superlink_command(sqlite)[superlink_command(sqlite).index("--database") + 1] == (
        str(tmp_path / "superlink.db"))
    assert settings.local_address == "127.0.0.1:9999"


def test_insecure_only_when_asked(tmp_path):
    with pytest.raises(SuperLinkError, match="--certs"):
        SuperLinkSettings(state_dir=tmp_path, certs=None)
    cmd = superlink_command(SuperLinkSettings(state_dir=tmp_path, certs=None, insecure=True))
    assert "--insecure" in cmd and "--enable-supernode-auth" not in cmd
    assert "--disable-runtime-dependency-installation" in cmd


def test_missing_certificate_files_are_named(tmp_path):
    (tmp_path / "ca.crt").write_text("x")
    with pytest.raises(SuperLinkError, match=r"coordinator\.crt.*coordinator\.key.*gen-certs"):
        CoordinatorCerts.from_dir(tmp_path)


def test_cli_start_refuses_without_certs_and_with_both_modes(tmp_path, capsys):
    assert cli.main(["--state-dir", str(tmp_path), "start"]) == 2
    assert "--certs DIR is required" in capsys.readouterr().err
    assert cli.main(["--state-dir", str(tmp_path), "start", "--insecure", "--certs",
                     str(tmp_path)]) == 2
    assert "not both" in capsys.readouterr().err


# -- operator connection --------------------------------------------------------------------------
def test_write_connection_keeps_other_entries(tmp_path):
    (tmp_path / "config.toml").write_text('[superlink]\ndefault = "x"\n\n[superlink.x]\n'
                                          'address = "1.2.3.4:1"\n')
    write_connection(tmp_path, Connection("127.0.0.1:9093", tmp_path / "ca.crt"))
    data = tomllib.loads((tmp_path / "config.toml").read_text())
    assert data["superlink"]["default"] == "consilia"
    assert data["superlink"]["x"]["address"] == "1.2.3.4:1"
    assert data["superlink"]["consilia"] == {"address": "127.0.0.1:9093",
                                             "root-certificates": str(tmp_path / "ca.crt")}
    write_connection(tmp_path, Connection("127.0.0.1:1", None))
    assert tomllib.loads((tmp_path / "config.toml").read_text())["superlink"]["consilia"] == {
        "address": "127.0.0.1:1", "insecure": True}


def test_operator_without_connection_says_how_to_get_one(tmp_path):
    with pytest.raises(OperatorError, match="fl-server start"):
        FlowerOperator(tmp_path)


def test_operator_reports_flower_json_errors(tmp_path, monkeypatch):
    write_connection(tmp_path, Connection("127.0.0.1:1", None))
    op = FlowerOperator(tmp_path)
    fake = subprocess.CompletedProcess([], 1, stdout=json.dumps(
        {"success": False, "error-message": "Public key already in use"}), stderr="")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: fake)
    with pytest.raises(OperatorError, match="Public key already in use"):
        op.register_node(tmp_path / "k.pub", "site-a")


# -- site registry ----------------------------------------------------------------------------
def test_site_key_fingerprint_matches_ssh_keygen(certs):
    pub = certs / "sites" / "site-a" / "supernode.key.pub"
    _, fingerprint = read_public_key(pub)
    expected = subprocess.run(["ssh-keygen", "-lf", str(pub)], check=True, capture_output=True,
                              text=True).stdout.split()[1]
    assert fingerprint == expected


def test_site_registry_refuses_private_keys_duplicates_and_bad_names(certs, tmp_path):
    with pytest.raises(SiteRegistryError, match="PRIVATE key"):
        read_public_key(certs / "sites" / "site-a" / "supernode.key")
    bad = tmp_path / "rsa.pub"
    bad.write_text("ssh-rsa AAAAB3NzaC1yc2E= x\n")
    with pytest.raises(SiteRegistryError, match="ECDSA"):
        read_public_key(bad)
    reg = SiteRegistry(tmp_path / "sites.json")
    _, fp_a = read_public_key(certs / "sites" / "site-a" / "supernode.key.pub")
    _, fp_b = read_public_key(certs / "sites" / "site-b" / "supernode.key.pub")
    reg.check_new("site-a", fp_a)
    reg.add("site-a", 11, fp_a)
    with pytest.raises(SiteRegistryError, match="already registered"):
        reg.check_new("site-a", fp_b)
    with pytest.raises(SiteRegistryError, match="already registered as site 'site-a'"):
        reg.check_new("other", fp_a)
    with pytest.raises(SiteRegistryError, match="letters"):
        reg.check_new("bad name!", fp_b)
    assert reg.by_node_id()[11].name == "site-a"
    reg.remove("site-a")
    assert reg.load() == []
    with pytest.raises(SiteRegistryError, match="no site named"):
        reg.remove("site-a")


# -- run config and run directory -----------------------------------------------------------------
def test_run_config_without_task_is_a_clear_error(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("strategy: {rounds: 3}\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: a deployed run needs 'task'"):
        load_run_config(path)
    path.write_text("task: {class_names: [a, b]}\nstrategy: {roundz: 3}\n")
    with pytest.raises(ConfigError, match=r"strategy\.roundz: unknown field"):
        load_run_config(path)
    path.write_text("task: {class_names: [a, b]}\nstrategy: {min_train_sites: 3}\n")
    with pytest.raises(ConfigError, match="min_available_sites"):
        load_run_config(path)


def test_run_config_overrides_and_every_strategy(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"task": TASK}))
    for name in ("fedavg", "fedprox", "fedadam"):
        run = load_run_config(path, [f"strategy.name={name}", "strategy.rounds=7",
                                     "dp.enabled=true", "train.local_epochs=2",
                                     "strategy.round_timeout_s=60"])
        assert (run.strategy.name, run.strategy.rounds, run.dp.enabled) == (name, 7, True)


def test_prepare_run_dir_writes_metadata_app_and_test_set(tmp_path):
    run = RunConfig.model_validate({"name": "t", "task": TASK})
    test = tmp_path / "test.npz"
    np.savez(test, images=np.zeros((4, 1, 16, 16), np.uint8), labels=np.array([0, 1, 0, 1]))
    app = prepare_run_dir(run, tmp_path / "run", ["fl-server", "run"],
                          state_dir=tmp_path / "state", test_set=test)
    run_dir = tmp_path / "run"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["task"] == TASK
    assert json.loads((run_dir / "task.json").read_text())["class_names"] == TASK["class_names"]
    env = json.loads((run_dir / "environment.json").read_text())
    assert env["mode"] == "deployment" and "flwr" in env["versions"]
    assert (run_dir / "test_set.npz").is_file()
    flwr = tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert flwr["components"]["serverapp"] == "consilia.server.app:app"
    # the sites see this config: the run directory is a token resolved on the coordinator
    assert "consilia-run-dir" not in flwr["config"]
    token = flwr["config"]["consilia-run-dir-token"]
    assert (tmp_path / "state" / "run-dirs" / token).read_text() == str(run_dir.resolve())
    assert RunConfig.model_validate_json(flwr["config"]["consilia-config-json"]) == run
    (run_dir / "metrics").mkdir()
    (run_dir / "metrics" / "rounds.jsonl").write_text("")
    with pytest.raises(ConfigError, match="already holds a run"):
        prepare_run_dir(run, run_dir, [], state_dir=tmp_path / "state")


def test_test_set_must_match_task(tmp_path):
    run = RunConfig.model_validate({"task": TASK})
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((2, 3, 16, 16), np.uint8), labels=np.array([0, 1]))
    with pytest.raises(ConfigError, match=r"\(N, 1, 16, 16\)"):
        check_test_set(bad, run)
    np.savez(bad, images=np.zeros((2, 1, 16, 16), np.uint8), labels=np.array([0, 5]))
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        check_test_set(bad, run)


def test_round_lines_name_failures_readably():
    record = {"round": 2, "elapsed_s": 12.34, "sites": {"a": {}, "b": {}},
              "train": {"train-loss": 0.5}, "federated_eval": {"accuracy": 0.75},
              "server_eval": {"accuracy": 0.8, "auc": 0.9},
              "incomplete": {"phase": "train", "answered": 1, "required": 2},
              "errors": [{"site": "node-7", "phase": "train", "reason":
                          "<class 'consilia.client.site.config.SitePolicyViolation'>:<'model "
                          "'vit' is not allowed'>"}]}
    lines = format_round(record, 3, {"node-7": "site-c"})
    assert lines[0].startswith("[round 2/3] 2 site(s) answered | train loss 0.5000")
    assert "test acc 0.8000 AUC 0.9000" in lines[0] and lines[0].endswith("12.3s")
    assert "only 1 of the required 2" in lines[1]
    assert lines[2] == ("    ! site-c train failed: SitePolicyViolation: model 'vit' is not "
                        "allowed")
    assert readable_reason("plain text") == "plain text"


def test_final_lines_report_calibration_and_test_metrics():
    from consilia.server.progress import format_final

    final = {"federated": {"accuracy": 0.97, "auc": 0.998},
             "federated_before_calibration": {"accuracy": 0.8, "auc": 0.97},
             "calibration": {"applied": True, "sites": ["site-a", "site-b"], "images": 240,
                             "declined": {"node-9": "<class 'consilia.client.site.config."
                                          "SitePolicyViolation'>:<'no statistics'>"}}}
    lines = format_final(final, {"node-9": "site-c"})
    assert lines[0] == ("calibration: classifier head re-fitted from the feature statistics of "
                        "2 site(s) (site-a, site-b), 240 images")
    assert lines[1] == "  ! declined: site-c: SitePolicyViolation: no statistics"
    assert lines[2] == ("final global model on the test split: accuracy 0.9700, AUC 0.9980 "
                        "(before calibration: accuracy 0.8000, AUC 0.9700)")
    skipped = format_final({"calibration": {"applied": False, "reason": "only 1 of 2"}})
    assert skipped == ["calibration: not applied: only 1 of 2"]
    noised = format_final({"calibration": {"applied": True, "sites": ["a"], "images": 9,
                                           "noised_sites": {"a": 5.0},
                                           "feature_clip_norm": 5.25}})
    assert noised[1] == ("  DP-noised statistics (local DP sites, features clipped to 5.2500): "
                         "a (noise 5)")


# -- reverse proxy ------------------------------------------------------------------------------
def test_proxy_template_renders_fleet_open_control_restricted(tmp_path):
    allow = operators_allow_file(["10.20.0.0/24", "192.0.2.7"])
    assert "allow 10.20.0.0/24;" in allow and "allow 192.0.2.7/32;" in allow
    with pytest.raises(ProxyConfigError, match="not-an-ip"):
        operators_allow_file(["not-an-ip"])
    template = DEPLOY / "nginx" / "consilia-coordinator.conf.template"
    text = render_proxy_config(template, {
        "CONSILIA_PROXY_LISTEN": "9092", "CONSILIA_SUPERLINK": "127.0.0.1:9093",
        "CONSILIA_SUPERLINK_TLS_NAME": "localhost", "CONSILIA_CERTS_DIR": "/c",
        "CONSILIA_OPERATORS_ALLOW": "/c/ops.allow"})
    assert "${CONSILIA_" not in text and "$remote_addr" in text  # nginx variables untouched
    blocks = dict(re.findall(r"location (/v1/\w+/) \{(.*?)\n    \}", text, re.DOTALL))
    assert "deny" not in blocks["/v1/fleet/"].replace("limit_except POST { deny all; }", "")
    assert "include /c/ops.allow;" in blocks["/v1/control/"]
    assert "deny all;" in blocks["/v1/control/"]
    assert re.search(r"location / \{\s*return 403;", text)  # runtime API, /docs: never
    assert "proxy_ssl_verify              on;" in text
    with pytest.raises(ProxyConfigError, match="CONSILIA_SUPERLINK"):
        render_proxy_config(template, {"CONSILIA_PROXY_LISTEN": "1"})


_NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.path.exists(p)), None
)


def test_proxy_config_command_output_passes_nginx_syntax_check(certs, tmp_path):
    if _NGINX is None:
        message = "nginx not installed (apt-get install nginx-light)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    out = tmp_path / "nginx"
    assert cli.main(["proxy-config", "--operators", "127.0.0.1", "--certs", str(certs),
                     "--listen", "127.0.0.1:19092", "--out", str(out)]) == 0
    main_conf = tmp_path / "nginx.conf"
    main_conf.write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\n"
        f"events {{}}\nhttp {{ include {out}/consilia-coordinator.conf; }}\n")
    res = subprocess.run([_NGINX, "-t", "-q", "-c", str(main_conf), "-p", str(tmp_path)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


# -- deploy/ files ------------------------------------------------------------------------------
def _dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("name,entry", [("Dockerfile.coordinator", "fl-server"),
                                        ("Dockerfile.site", "fl-client")])
def test_dockerfiles_copy_existing_paths_and_run_unprivileged(name, entry):
    # Docker is not available on the test machines: check what can be checked statically.
    instructions = _dockerfile_instructions(DEPLOY / name)
    known = {"FROM", "ENV", "RUN", "WORKDIR", "ARG", "COPY", "USER", "VOLUME", "EXPOSE",
             "HEALTHCHECK", "ENTRYPOINT", "CMD", "LABEL"}
    assert instructions[0][0] == "FROM" and "python:3.11" in instructions[0][1]
    assert {word for word, _ in instructions} <= known
    ignore = (DEPLOY / f"{name}.dockerignore").read_text()
    for word, rest in instructions:
        if word == "COPY":
            *sources, _dest = rest.split()
            for src in sources:
                assert (REPO / src).exists(), f"{name}: COPY {src} does not exist"
                assert f"!{src}" in ignore, f"{name}: {src} excluded by the .dockerignore"
    users = [rest for word, rest in instructions if word == "USER"]
    assert users and users[-1] not in ("root", "0")
    entrypoint = json.loads(dict(instructions)["ENTRYPOINT"])
    assert entrypoint == [entry]
    json.loads(dict(instructions)["CMD"])  # exec form


def test_coordinator_image_starts_the_hardened_superlink():
    cmd = json.loads(dict(_dockerfile_instructions(DEPLOY / "Dockerfile.coordinator"))["CMD"])
    args = cli.build_parser().parse_args(cmd)
    assert args.command == "start" and not args.insecure and args.certs is not None


def test_compose_file_has_coordinator_proxy_and_three_sites():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    sites = [name for name in services if name.startswith("site-")]
    assert len(sites) == 3
    assert services["superlink"]["networks"] == ["coordinator"]
    assert compose["networks"]["coordinator"]["internal"] is True
    for name in sites:  # sites reach only the proxy, never the SuperLink's network
        assert services[name]["networks"] == ["federation"]
    assert services["coordinator"]["ports"] == ["9092:9092"]
    for service in services.values():
        build = service.get("build")
        if build:
            assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
        for volume in service.get("volumes", []):
            src = volume.split(":")[0]
            if src.startswith("./") and not src.startswith(("./certs", "./data")):
                assert (DEPLOY / src).exists(), f"compose mounts missing {src}"
    env = services["coordinator"]["environment"]
    assert env["CONSILIA_SUPERLINK"] == "superlink:9093"


def test_example_configs_are_valid():
    from consilia.client.site.config import load_site_config

    run = load_run_config(DEPLOY / "run.example.yaml")
    assert run.task is not None and run.strategy.name in ("fedavg", "fedprox", "fedadam")
    for path in [DEPLOY / "site.example.yaml", *sorted((DEPLOY / "compose").glob("*.yaml"))]:
        site = load_site_config(path)
        assert run.model.name in site.policy.allowed_models, path
    assert load_site_config(DEPLOY / "site.example.yaml").runtime.isolation == "process"


def test_systemd_unit_runs_fl_client_unprivileged(tmp_path):
    text = (DEPLOY / "consilia-site.service").read_text()
    assert re.search(r"^ExecStart=\S+/fl-client --site /etc/consilia/site.yaml$", text, re.M)
    assert re.search(r"^User=consilia$", text, re.M)
    assert re.search(r"^NoNewPrivileges=yes$", text, re.M)
    for line in text.splitlines():  # systemd has no trailing comments
        assert "#" not in line or line.lstrip().startswith("#"), line
    if shutil.which("systemd-analyze") is None:
        return
    unit = tmp_path / "consilia-site.service"
    unit.write_text(re.sub(r"^ExecStart=.*$", "ExecStart=/bin/true", text, flags=re.M))
    res = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                         text=True)
    assert "consilia-site.service" not in res.stderr, res.stderr


def test_cli_parser_covers_every_operator_command():
    parser = cli.build_parser()
    for argv in (["register-site", "k.pub", "--name", "a"], ["unregister-site", "a"],
                 ["sites", "--json"], ["run", "r.yaml", "--out", "x", "--test-set", "t.npz"],
                 ["status", "1"], ["stop", "1"],
                 ["proxy-config", "--operators", "10.0.0.0/8", "--certs", "c", "--out", "o"]):
        args = parser.parse_args(argv)
        assert callable(args.func), argv
    ns = SimpleNamespace(state_dir="x", superlink="1.2.3.4:9092", ca=None,
                         insecure_connection=False)
    with pytest.raises(ConfigError, match="--ca"):
        cli._operator(ns)


# -- round-level robustness -----------------------------------------------------------------------
class _Reply:
    """Stand-in for a Flower reply: ok, or an error with a reason."""

    def __init__(self, node: int, error: str | None = None):
        self.error = SimpleNamespace(reason=error, code=0) if error else None
        self.metadata = SimpleNamespace(src_node_id=node)

    def has_error(self) -> bool:
        return self.error is not None

    def has_content(self) -> bool:
        return False


class _Recorder:
    """Round hooks that note each call (see consilia.server.round_hooks.RoundHooks)."""

    def __init__(self):
        self.calls = []

    def _replies(self, rnd, replies, phase):
        self.calls.append(("replies", rnd, phase, len(list(replies))))

    def on_failed_replies(self, rnd, replies, phase):
        self._replies(rnd, replies, phase)

    def on_train_incomplete(self, rnd, replies, answered, required):
        self._replies(rnd, replies, "train")
        self.calls.append(("incomplete", rnd, "train", answered, required))

    def on_train_aggregated(self, rnd, replies, metrics):
        self._replies(rnd, replies, "train")
        self.calls.append(("aggregated", "train"))

    def on_site_evaluation(self, rnd, replies, metrics):
        self._replies(rnd, replies, "evaluate")
        self.calls.append(("aggregated", "federated_eval"))

    def on_late_site_evaluation(self, model_round, with_round, replies, aggregate):
        self.calls.append(("late", model_round, with_round))


def test_round_with_fewer_than_min_sites_keeps_the_global_model():
    from consilia.common.config import DPConfig, StrategyConfig
    from consilia.server.strategy import build_strategy

    recorder = _Recorder()
    strategy = build_strategy(StrategyConfig(name="fedprox", min_train_sites=2), DPConfig(),
                              recorder)
    replies = [_Reply(1), _Reply(2, "Error: Node Unavailable"), _Reply(3, "refused")]
    assert strategy.aggregate_train(4, replies) == (None, None)
    assert ("incomplete", 4, "train", 1, 2) in recorder.calls
    assert ("replies", 4, "train", 3) in recorder.calls
    assert ("late", 3, 4) in recorder.calls  # round 3's model, evaluated with round 4


def test_fast_poll_grid_returns_replies_without_flowers_3s_steps():
    import time as _time

    from consilia.common.flower.fast_grid import FastPollGrid

    class _Grid:
        run = "delegated"

        def __init__(self):
            self.polls = 0

        def push_messages(self, messages):
            return [f"id-{i}" for i, _ in enumerate(messages)]

        def pull_messages(self, ids):
            self.polls += 1
            if self.polls < 4:
                return []
            return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i))
                    for i in sorted(ids)]

    inner = _Grid()
    grid = FastPollGrid(inner)
    start = _time.perf_counter()
    replies = list(grid.send_and_receive(["a", "b"], timeout=30))
    assert len(replies) == 2 and _time.perf_counter() - start < 1.0
    assert grid.run == "delegated"  # everything else goes to Flower's grid
    inner.polls = -10**9  # never answers: the timeout ends the wait
    start = _time.perf_counter()
    assert list(grid.send_and_receive(["a"], timeout=0.3)) == []
    assert 0.25 < _time.perf_counter() - start < 1.0
