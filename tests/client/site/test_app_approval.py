"""A site runs only the Consilia code it installed, and only for app bundles it approved."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import pytest
import tomli_w
from site_testkit import LocalSuperLink, make_certs, tiny_run_json, write_probe_app, write_site

from consilia.client.site.app_approval import AppNotApproved, check_app_approved, identity_from_fab
from consilia.client.site.config import default_approved_apps, installed_version
from consilia.common.flower.app_project import CLIENTAPP_REF, write_flower_app


def _fab(version: str = "0.1.0", clientapp: str = CLIENTAPP_REF, publisher: str = "consilia",
         extra: dict[str, str] | None = None) -> bytes:
    project = {
        "project": {"name": "consilia-run", "version": version},
        "tool": {"flwr": {"app": {"publisher": publisher,
                                  "components": {"serverapp": "x:app", "clientapp": clientapp}}}},
    }
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("pyproject.toml", tomli_w.dumps(project))
        for name, text in (extra or {}).items():
            archive.writestr(name, text)
    return buffer.getvalue()


def test_identity_is_read_from_the_bundle_and_its_hash_verified():
    content = _fab("1.2.3", extra={"evil.py": "import os"})
    digest = hashlib.sha256(content).hexdigest()
    ident = identity_from_fab(content, digest)
    assert (ident.fab_id, ident.version, ident.clientapp) == ("consilia/consilia-run", "1.2.3",
                                                              CLIENTAPP_REF)
    assert ident.fab_hash == digest and ident.code_files == ("evil.py",)
    assert ident.describe() == f"consilia/consilia-run==1.2.3 (sha256:{digest})"
    with pytest.raises(AppNotApproved, match="does not match its announced hash"):
        identity_from_fab(content, "0" * 64)
    with pytest.raises(AppNotApproved, match="not a readable Flower app bundle"):
        identity_from_fab(b"not a zip")


def test_flowers_own_bundle_of_our_app_is_approved_by_default(tmp_path):
    from flwr.cli.build import build_fab_from_disk

    write_flower_app(tmp_path / "app", {"consilia-config-json": "{}"}, version=installed_version())
    ident = identity_from_fab(build_fab_from_disk(tmp_path / "app"))
    assert ident.fab_id == "consilia/consilia-run" and ident.code_files == ()
    check_app_approved(default_approved_apps(), ident, "hospital-a")  # no exception


def test_approval_by_identity_wildcard_and_hash():
    ident = identity_from_fab(_fab("0.1.7"))
    check_app_approved(["consilia/consilia-run==0.1.7"], ident)
    check_app_approved(["consilia/consilia-run==0.1.*"], ident)
    check_app_approved([f"sha256:{ident.fab_hash}"], ident)
    with pytest.raises(AppNotApproved):
        check_app_approved(["consilia/consilia-run==0.2.*", "sha256:" + "0" * 64], ident)
    with pytest.raises(AppNotApproved):
        check_app_approved(["other/consilia-run==0.1.7"], ident)


def test_unapproved_bundle_refusal_says_what_and_how():
    ident = identity_from_fab(_fab("9.9.9"))
    with pytest.raises(AppNotApproved) as err:
        check_app_approved(["consilia/consilia-run==0.1.0"], ident, "hospital-a")
    reason = err.value.reason
    assert reason.startswith("site 'hospital-a' has not approved the app bundle "
                             "consilia/consilia-run==9.9.9 (sha256:")
    assert "(approved: consilia/consilia-run==0.1.0)" in reason
    assert f"'sha256:{ident.fab_hash}' to policy.approved_apps" in reason


def test_bundle_asking_for_other_client_code_is_refused_even_if_hash_approved():
    ident = identity_from_fab(_fab(clientapp="evil_client:app", extra={"evil_client.py": ""}))
    with pytest.raises(AppNotApproved, match="runs only its installed ClientApp "
                       "'consilia.client.app:app'; the app bundle .* asks for 'evil_client:app'"):
        check_app_approved([f"sha256:{ident.fab_hash}"], ident, "hospital-a")


EVIL_CLIENT = '''from pathlib import Path
Path({marker!r}).write_text("bundle code ran at the site")
from flwr.clientapp import ClientApp
app = ClientApp()
'''


@pytest.mark.slow
def test_real_site_serves_approved_and_refuses_unapproved_bundles(tmp_path):
    """SuperLink (TLS + node auth) and ``fl-client`` on 127.0.0.1; three runs at once."""
    certs = make_certs(tmp_path / "coordinator")
    (tmp_path / "link").mkdir()
    link = LocalSuperLink(tmp_path / "link", certs).start()
    site = write_site(tmp_path / "site", coordinator=f"127.0.0.1:{link.port}",
                      runtime={"superlink_poll_interval_s": 0.5})
    shutil.copy(certs["ca"], site.parent / "certs" / "ca.crt")
    link.register(site.parent / "keys" / "site.key.pub", "hospital-a")
    client = subprocess.Popen([sys.executable, "-m", "consilia.client.cli", "--site", str(site)],
                              stdout=(tmp_path / "fl-client.out").open("w"),
                              stderr=subprocess.STDOUT)
    marker = tmp_path / "bundle-code-ran"
    outs = {k: tmp_path / f"{k}.json" for k in ("approved", "unapproved", "foreign")}
    run = tiny_run_json(rounds=1)
    try:
        link.submit(write_probe_app(tmp_path / "a", run, outs["approved"],
                                    version=installed_version(), grid_poll_s=0.2))
        link.submit(write_probe_app(tmp_path / "b", run, outs["unapproved"], version="9.9.9",
                                    grid_poll_s=0.2))
        link.submit(write_probe_app(
            tmp_path / "c", run, outs["foreign"], version=installed_version(),
            clientapp="evil_client:app", grid_poll_s=0.2,
            extra_files={"evil_client.py": EVIL_CLIENT.format(marker=str(marker))}))
        deadline = time.time() + 600
        while not all(p.exists() for p in outs.values()):
            assert client.poll() is None, (tmp_path / "fl-client.out").read_text()
            assert time.time() < deadline, (tmp_path / "fl-client.out").read_text()
            time.sleep(1)
    finally:
        client.send_signal(signal.SIGTERM)
        code = client.wait(timeout=120)
        link.stop()
    log = (tmp_path / "fl-client.out").read_text()
    assert code == 0, log
    replies = {k: json.loads(p.read_text())["rounds"][0]["replies"] for k, p in outs.items()}

    # What the coordinator received (its ServerApp's view of each reply):
    assert replies["approved"][0]["metrics"]["num-examples"] == 10
    refused = replies["unapproved"][0]["error"]
    assert refused.startswith("site 'hospital-a' has not approved the app bundle "
                              "consilia/consilia-run==9.9.9 (sha256:")
    foreign = replies["foreign"][0]["error"]
    assert "runs only its installed ClientApp 'consilia.client.app:app'" in foreign
    assert "asks for 'evil_client:app'" in foreign
    assert not marker.exists()  # no code from any bundle ran at the site

    # What the site logged, one line per task:
    rounds = [json.loads(line) for line in
              (site.parent / "state" / "logs" / "rounds.jsonl").read_text().splitlines()]
    assert sorted(r["status"] for r in rounds) == ["ok", "refused", "refused"]
    assert "took part in run" in log and "refused run" in log


def test_worker_refusal_text_names_the_site_once():
    from consilia.client.site.policy import SitePolicyViolation
    from consilia.client.site.worker import _failure_text, _is_refusal, _refusal_text

    policy = SitePolicyViolation("model 'vit' is not allowed by this site's policy (allowed: cnn)")
    assert _refusal_text("hospital-a", policy) == (
        "site 'hospital-a' refused: model 'vit' is not allowed by this site's policy (allowed: cnn)"
    )
    bundle = AppNotApproved("site 'hospital-a' has not approved the app bundle x==1 (sha256:0)")
    assert _refusal_text("hospital-a", bundle) == bundle.reason
    assert _is_refusal(policy) and _is_refusal(bundle) and not _is_refusal(ValueError("x"))
    assert _failure_text("hospital-a", ValueError("bad")) == (
        "site 'hospital-a' failed the task: ValueError: bad"
    )


def test_worker_logs_the_round_from_the_instruction_when_flower_sets_no_group_id():
    from flwr.app import ConfigRecord, Message, RecordDict

    from consilia.client.site.worker import _round_of

    def message(group_id: str, config: dict) -> Message:
        return Message(RecordDict({"config": ConfigRecord(config)}), dst_node_id=1,
                       message_type="train", group_id=group_id)

    assert _round_of(message("", {"server-round": 3})) == "3"  # Flower's strategies
    assert _round_of(message("5", {"server-round": 3})) == "5"
    assert _round_of(message("", {})) == ""


def test_worker_asks_for_tasks_quickly_right_after_one_and_slowly_when_idle(tmp_path, monkeypatch):
    from consilia.client.site import worker as module

    site = write_site(tmp_path / "site")
    worker = module.SiteWorker(site, "127.0.0.1:1", None, poll_interval_s=0.5,
                               active_poll_interval_s=0.05, active_window_s=60)
    assert worker.current_poll_interval() == 0.5  # no task yet
    now = [5000.0]
    monkeypatch.setattr(module.time, "monotonic", lambda: now[0])
    worker._last_task = now[0]
    now[0] += 10
    assert worker.current_poll_interval() == 0.05
    now[0] += 51
    assert worker.current_poll_interval() == 0.5
