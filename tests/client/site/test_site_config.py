"""Site config (fl-client --site site.yaml): validation messages, paths, policy, deployed loader."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from site_testkit import write_site

from consilia.client.site.assembly import cap_batch as _cap_batch
from consilia.client.site.assembly import load_deployed_site, stratified_split
from consilia.client.site.config import SitePolicy, default_approved_apps, load_site_config
from consilia.client.site.policy import SitePolicyViolation, check_policy, site_dp_request
from consilia.common.config import ConfigError, DPConfig, ModelConfig, TaskSpec, TrainConfig
from consilia.common.instructions import RoundInstruction


def _instr(model: str = "cnn", rounds: int = 3, batch: int = 4, **dp) -> RoundInstruction:
    return RoundInstruction(
        run_name="t", seed=1, server_round=1, total_rounds=rounds,
        model=ModelConfig(name=model), train=TrainConfig(batch_size=batch),
        task=TaskSpec(class_names=["normal", "pneumonia"], in_channels=1, image_size=16),
        dp=DPConfig(**dp),
    )


def _edit(path: Path, **changes) -> Path:
    data = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        node = data
        keys = dotted.split("__")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture()
def site_yaml(tmp_path: Path) -> Path:
    return write_site(tmp_path / "site")


# -- loading and validation ----------------------------------------------------------------


def test_valid_config_resolves_paths_against_the_yaml_folder(site_yaml, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # not the YAML's folder
    cfg = load_site_config(site_yaml)
    folder = site_yaml.parent
    assert cfg.coordinator.ca_certificate == folder / "certs" / "ca.crt"
    assert cfg.coordinator.auth_key == folder / "keys" / "site.key"
    assert cfg.data.root == folder / "images"
    assert cfg.state_dir == folder / "state"
    assert cfg.ledger_path == folder / "state" / "privacy-ledger.json"
    assert cfg.coordinator.host == "127.0.0.1" and cfg.coordinator.port == 1
    assert cfg.policy.approved_apps == default_approved_apps()
    assert cfg.runtime.isolation == "process"
    assert cfg.dataset_key == "hospital-a"


def test_dicom_labels_csv_stays_relative_to_the_data_root(site_yaml):
    _edit(site_yaml, data={"kind": "dicom", "root": "dicoms", "labels_csv": "labels.csv"})
    cfg = load_site_config(site_yaml)
    assert cfg.data.root == site_yaml.parent / "dicoms"
    assert cfg.data.labels_path == site_yaml.parent / "dicoms" / "labels.csv"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"coordinator__adress": "x:1"}, ["coordinator.adress", "unknown field"]),
        ({"coordinator__address": "https://fl.example.org:9092"},
         ["coordinator.address", "without a scheme"]),
        ({"coordinator__address": "fl.example.org"}, ["coordinator.address", "HOST:PORT"]),
        ({"name": "St Mary's"}, ["name", "letters, digits"]),
        ({"validation__fraction": 1.5}, ["validation.fraction", "less than 1"]),
        ({"resources__threads": 0}, ["resources.threads", "greater than or equal to 1"]),
        ({"policy__max_rounds": 0}, ["policy.max_rounds"]),
        ({"policy__dp__when_not_requested": "maybe"},
         ["policy.dp.when_not_requested", "'enforce' or 'refuse'"]),
        ({"policy__dp__max_noise_multiplier": 0}, ["policy.dp.max_noise_multiplier",
                                                    "greater than 0"]),
        ({"policy__dp__max_noise_multiplier": "lots"}, ["policy.dp.max_noise_multiplier"]),
        ({"policy__approved_apps": ["consilia-run"]},
         ["policy.approved_apps", "publisher/name==version"]),
        ({"policy__approved_apps": ["sha256:abc"]}, ["policy.approved_apps", "64 hex"]),
        ({"runtime__isolation": "thread"}, ["runtime.isolation", "'process' or 'subprocess'"]),
        ({"data": {"kind": "nifti", "root": "x"}}, ["data", "nifti"]),
    ],
)
def test_invalid_fields_are_named_with_the_file(site_yaml, change, expected):
    _edit(site_yaml, **change)
    with pytest.raises(ConfigError) as err:
        load_site_config(site_yaml)
    message = str(err.value)
    assert str(site_yaml) in message
    for fragment in expected:
        assert fragment in message, message


def test_missing_sections_and_file(site_yaml, tmp_path):
    data = yaml.safe_load(site_yaml.read_text())
    del data["data"], data["coordinator"]["auth_key"]
    site_yaml.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        load_site_config(site_yaml)
    assert "data: Field required" in str(err.value)
    assert "coordinator.auth_key: Field required" in str(err.value)
    with pytest.raises(ConfigError, match="config file not found"):
        load_site_config(tmp_path / "nope.yaml")


def test_approved_apps_accept_identity_wildcards_and_hashes(site_yaml):
    digest = "AB" * 32
    _edit(site_yaml, policy__approved_apps=["consilia/consilia-run==0.1.*", f"sha256:{digest}"])
    cfg = load_site_config(site_yaml)
    assert cfg.policy.approved_apps == ["consilia/consilia-run==0.1.*", "sha256:" + "ab" * 32]


# -- policy ----------------------------------------------------------------------------------


def test_disallowed_model_is_refused_with_a_reason():
    policy = SitePolicy(allowed_models=["cnn", "densenet121"])
    check_policy(policy, _instr("cnn"))
    with pytest.raises(SitePolicyViolation) as err:
        check_policy(policy, _instr("vit"))
    assert err.value.reason == (
        "model 'vit' is not allowed by this site's policy (allowed: cnn, densenet121)"
    )


def test_too_many_rounds_are_refused():
    with pytest.raises(SitePolicyViolation, match="plans 50 rounds; this site takes part in at "
                       "most 20 rounds per run"):
        check_policy(SitePolicy(max_rounds=20), _instr(rounds=50))
    check_policy(SitePolicy(max_rounds=20), _instr(rounds=20))


def test_dp_too_weak_is_refused_when_required():
    policy = SitePolicy(dp={"required": True, "max_run_epsilon": 4.0})
    with pytest.raises(SitePolicyViolation) as err:
        check_policy(policy, _instr(enabled=True, mode="local", target_epsilon=10.0))
    assert "too weak" in err.value.reason and "ε=10" in err.value.reason
    assert "ε ≤ 4" in err.value.reason
    check_policy(policy, _instr(enabled=True, mode="local", target_epsilon=3.0))
    assert site_dp_request(policy.dp, _instr(enabled=True, target_epsilon=3.0)).target_epsilon == 3


def test_dp_not_required_leaves_the_run_alone():
    policy = SitePolicy()
    check_policy(policy, _instr(enabled=True, target_epsilon=50.0))
    assert site_dp_request(policy.dp, _instr()) is None
    assert site_dp_request(policy.dp, _instr(enabled=True, mode="central")) is None


def test_required_dp_is_enforced_when_the_run_does_not_ask():
    policy = SitePolicy(dp={"required": True, "max_run_epsilon": 2.5, "delta": 1e-6,
                            "max_grad_norm": 0.7, "accountant": "prv"})
    check_policy(policy, _instr())  # no refusal: the site applies its own DP
    dp = site_dp_request(policy.dp, _instr())
    assert dp is not None
    assert (dp.enabled, dp.mode, dp.target_epsilon, dp.target_delta) == (True, "local", 2.5, 1e-6)
    assert (dp.max_grad_norm, dp.accountant) == (0.7, "prv")
    central = site_dp_request(policy.dp, _instr(enabled=True, mode="central"))
    assert central is not None and central.mode == "local"


def test_required_dp_refuses_runs_without_it_when_configured():
    policy = SitePolicy(dp={"required": True, "when_not_requested": "refuse"})
    with pytest.raises(SitePolicyViolation, match="requires local differential privacy .* "
                       "the run has DP disabled"):
        check_policy(policy, _instr())
    with pytest.raises(SitePolicyViolation, match="central DP .* does not protect"):
        check_policy(policy, _instr(enabled=True, mode="central"))


def test_batch_size_is_capped_to_the_site_limit():
    instr = _instr(batch=512, enabled=True, max_physical_batch_size=512)
    capped = _cap_batch(instr, 64)
    assert capped.train.batch_size == 64 and capped.dp.max_physical_batch_size == 64
    assert capped.train.lr == instr.train.lr and capped.model == instr.model
    assert _cap_batch(_instr(batch=8), 64) is not None
    assert _cap_batch(_instr(batch=8), 64).train.batch_size == 8


def test_stratified_split_is_per_class_seeded_and_keeps_singletons():
    labels = np.array([0] * 10 + [1] * 5 + [2])
    train, val = stratified_split(labels, 0.2, seed=3)
    assert np.bincount(labels[val], minlength=3).tolist() == [2, 1, 0]
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(16))
    again_train, again_val = stratified_split(labels, 0.2, seed=3)
    assert again_val.tolist() == val.tolist() and again_train.tolist() == train.tolist()
    assert stratified_split(labels, 0.0, seed=3)[1].size == 0


# -- the deployed site -----------------------------------------------------------------------


def test_policy_is_checked_before_the_data_are_touched(site_yaml):
    _edit(site_yaml, data={"kind": "image_folder", "root": "does-not-exist"},
          policy={"allowed_models": ["densenet121"]})
    with pytest.raises(SitePolicyViolation, match="model 'cnn' is not allowed"):
        load_deployed_site(site_yaml, _instr("cnn"))


def test_deployed_site_loads_splits_caps_and_trains(site_yaml):
    _edit(site_yaml, resources={"threads": 1, "max_batch_size": 2})
    site = load_deployed_site(site_yaml, _instr(batch=32), run_id=7)
    trainer = site.trainer
    assert site.name == "hospital-a"
    assert (len(trainer.train_data), len(trainer.val_data)) == (10, 2)
    assert trainer.train_data.images.shape[1:] == (1, 16, 16)
    assert trainer.threads == 1
    assert (site_yaml.parent / "state" / "cache").is_dir()
    from consilia.client.trainer import build_task_model

    instr = _instr(batch=32)
    state = build_task_model("cnn", {}, instr.task).state_dict()
    _weights, metrics = trainer.fit(state, instr)
    assert metrics["num-examples"] == 10 and metrics["dp-enabled"] == 0.0
    assert trainer.evaluate(state, instr)["num-examples"] == 2
    with pytest.raises(SitePolicyViolation):
        site.enforce_policy(_instr(rounds=1000))
    site.enforce_policy(instr)
    _edit(site_yaml, policy={"allowed_models": ["densenet121"]})  # tightened mid-run
    with pytest.raises(SitePolicyViolation, match="model 'cnn' is not allowed"):
        site.enforce_policy(instr)


def test_site_enforces_its_own_dp_and_accounts_it_in_the_ledger(site_yaml):
    _edit(site_yaml, policy={"dp": {"required": True, "max_run_epsilon": 3.0,
                                    "budget_epsilon": 5.0, "delta": 1e-3}})
    instr = _instr(rounds=2, batch=5)  # the run does not ask for DP
    site = load_deployed_site(site_yaml, instr, run_id=11)
    controller = site.trainer.privacy_factory(instr, len(site.trainer.train_data))
    assert controller is not None and controller.dp.target_epsilon == 3.0
    assert controller.budget_epsilon == 5.0 and controller.dataset_key == "hospital-a"
    from consilia.client.trainer import build_task_model

    state = build_task_model("cnn", {}, instr.task).state_dict()
    _weights, metrics = site.trainer.fit(state, instr)
    assert metrics["dp-enabled"] == 1.0
    assert 0 < metrics["epsilon"] <= 3.0 + 1e-6
    ledger = site_yaml.parent / "state" / "privacy-ledger.json"
    assert ledger.is_file() and '"run_id": "11"' in ledger.read_text()


def test_dp_site_plans_and_accounts_its_noised_calibration_statistics(site_yaml):
    import dataclasses

    import numpy as np

    from consilia.client.privacy.ledger import PrivacyLedger
    from consilia.client.trainer import build_task_model

    _edit(site_yaml, policy={"dp": {"required": True, "max_run_epsilon": 3.0,
                                    "budget_epsilon": 5.0, "delta": 1e-3}})
    instr = dataclasses.replace(_instr(rounds=1, batch=5), calibration=True)
    site = load_deployed_site(site_yaml, instr, run_id=12)
    controller = site.trainer.trains_with_dp(instr)
    assert controller is not None and controller.release_noise_multiplier == 5.0
    state = build_task_model("cnn", {}, instr.task).state_dict()
    site.trainer.fit(state, instr)
    stats, epsilon, sigma = site.trainer.private_feature_stats(
        state, instr, site.trainer.trains_with_dp(instr), clip_norm=1.0)
    assert sigma == 5.0 and 0 < epsilon <= 3.0 + 1e-2  # planned within the run's epsilon
    assert stats.counts.shape == (2,) and not np.allclose(stats.counts.round(), stats.counts)
    ledger = PrivacyLedger(site_yaml.parent / "state" / "privacy-ledger.json")
    ledger.load()
    assert [r.kind for r in ledger.entry("hospital-a").rounds] == ["train", "feature-statistics"]
    _edit(site_yaml, policy__feature_statistics={"share": False})
    unshared = load_deployed_site(site_yaml, instr, run_id=13)
    assert unshared.trainer.trains_with_dp(instr).release_noise_multiplier is None


def test_module_docstring_example_validates(tmp_path):
    import consilia.client.site.config as module

    doc = module.__doc__
    block = doc[doc.index("Example (every optional field"):].split("::", 1)[1]
    text = "\n".join(line[4:] for line in block.splitlines())
    (tmp_path / "site.yaml").write_text(text)
    cfg = load_site_config(tmp_path / "site.yaml")
    assert cfg.name == "st-mary" and cfg.data.kind == "dicom"
    assert cfg.policy.dp.required and cfg.policy.allowed_models == ["cnn", "densenet121"]
    assert cfg.coordinator.auth_key == tmp_path / "certs" / "supernode.key"


def test_deploy_example_site_config_validates():
    """deploy/site.example.yaml (the coordinator engineer's file) must match this schema."""
    example = Path(__file__).resolve().parents[3] / "deploy" / "site.example.yaml"
    if not example.is_file():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{example} is missing")
        pytest.skip("deploy/site.example.yaml not written yet")
    cfg = load_site_config(example)
    assert cfg.name and cfg.coordinator.address
    assert cfg.policy.dp.required and cfg.policy.dp.max_noise_multiplier == 10.0


def test_the_noise_cap_defaults_to_ten_and_reaches_the_sites_privacy_controller(site_yaml):
    assert SitePolicy().dp.max_noise_multiplier == 10.0
    _edit(site_yaml, policy={"dp": {"required": True, "max_noise_multiplier": 4.5}})
    assert load_site_config(site_yaml).policy.dp.max_noise_multiplier == 4.5
    instr = _instr(rounds=2, batch=5)
    site = load_deployed_site(site_yaml, instr, run_id=11)
    controller = site.trainer.privacy_factory(instr, len(site.trainer.train_data))
    assert controller is not None and controller.max_noise_multiplier == 4.5


# -- the site decides the accounting (issue 14 item 1) ---------------------------------------


def test_gdp_in_a_site_policy_is_refused_at_load_with_the_reason(site_yaml):
    _edit(site_yaml, policy={"dp": {"required": True, "accountant": "gdp"}})
    with pytest.raises(ConfigError) as err:
        load_site_config(site_yaml)
    assert str(site_yaml) in str(err.value)
    (line,) = [x for x in str(err.value).splitlines() if "policy.dp.accountant" in x]
    assert "'gdp' accountant is not allowed: it gives an approximation, not an upper bound" in line
    assert "use one of rdp, prv" in line


def test_a_run_asking_for_another_accountant_is_served_with_the_sites():
    policy = SitePolicy(dp={"accountant": "prv"})
    dp = site_dp_request(policy.dp, _instr(enabled=True, target_epsilon=2.0, accountant="gdp"))
    assert dp is not None and (dp.accountant, dp.target_epsilon) == ("prv", 2.0)
    default = site_dp_request(SitePolicy().dp, _instr(enabled=True, accountant="prv"))
    assert default is not None and default.accountant == "rdp"


def test_deployed_site_trains_a_gdp_run_under_its_rdp_policy_within_budget(site_yaml):
    import dataclasses

    from opacus.accountants import RDPAccountant
    from opacus.accountants.utils import get_noise_multiplier

    from consilia.client.privacy.ledger import PrivacyLedger
    from consilia.client.trainer import build_task_model

    _edit(site_yaml, policy={"dp": {"required": True, "accountant": "rdp", "budget_epsilon": 3,
                                    "delta": 1e-3}})
    instr = _instr(rounds=2, batch=5, enabled=True, mode="local", target_epsilon=3.0,
                   accountant="gdp", grad_sample_mode="hooks")
    site = load_deployed_site(site_yaml, instr, run_id=21)
    assert site.trainer.trains_with_dp(instr).dp.accountant == "rdp"
    state = build_task_model("cnn", {}, instr.task).state_dict()
    for rnd in (1, 2):
        state, metrics = site.trainer.fit(state, dataclasses.replace(instr, server_round=rnd))
        assert metrics["dp-enabled"] == 1.0 and metrics["dp-accountant-rdp"] == 1.0
        assert "dp-accountant-gdp" not in metrics
        assert metrics["epsilon"] <= 3.0 + 1e-9

    entry = PrivacyLedger(site_yaml.parent / "state" / "privacy-ledger.json").entry("hospital-a")
    cal = entry.calibrations["21"]
    assert entry.accountant == cal.accountant == "rdp" and entry.rounds_taken == 2
    # the noise is the one the site's accountant needs for the whole run (not GDP's)
    assert cal.noise_multiplier == pytest.approx(get_noise_multiplier(
        target_epsilon=3.0, target_delta=1e-3, sample_rate=cal.sample_rate,
        steps=2 * cal.steps_per_round, accountant="rdp"))
    reference = RDPAccountant()  # recompute the spend from the recorded rounds
    for record in entry.rounds:
        for _ in range(record.steps):
            reference.step(noise_multiplier=record.noise_multiplier,
                           sample_rate=record.sample_rate)
    recomputed = reference.get_epsilon(delta=entry.delta)
    assert recomputed == pytest.approx(entry.epsilon_spent, abs=1e-9)
    assert recomputed <= 3.0 + 1e-9


def test_a_ledger_kept_under_another_accountant_is_refused_with_the_fix(site_yaml):
    from consilia.client.privacy.budget import PrivacyConfigError
    from consilia.client.privacy.ledger import PrivacyLedger
    from consilia.client.trainer import build_task_model

    PrivacyLedger(site_yaml.parent / "state" / "privacy-ledger.json").open_entry(
        "hospital-a", accountant="prv", delta=1e-3, target_epsilon=3.0)
    _edit(site_yaml, policy={"dp": {"required": True, "budget_epsilon": 3, "delta": 1e-3}})
    instr = _instr(rounds=1, batch=5)
    site = load_deployed_site(site_yaml, instr, run_id=22)
    state = build_task_model("cnn", {}, instr.task).state_dict()
    with pytest.raises(PrivacyConfigError, match="accounted with the 'prv' accountant but this "
                       "site accounts with 'rdp'; set policy.dp.accountant: prv"):
        site.trainer.fit(state, instr)
