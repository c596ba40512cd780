"""A hospital's own configuration (``fl-client --site site.yaml``) and its policy checks.

The file belongs to the site: the coordinator never sees it. It names the site, how to reach
the coordinator (address, CA certificate, the site's authentication key), where the data are
(:data:`consilia.client.site.data_sources.DataSourceConfig`), how much of it to hold out locally,
resource limits, a local state directory (logs, decoded-image cache, privacy ledger) and the
**site policy**: which model architectures, how many rounds, whether differential privacy is
required and how strong it must be, the site's lifetime privacy budget, and which app bundles
(FABs) the site agrees to serve.

Loading is strict (unknown keys are errors) and every error names the file and the field.
Relative paths are resolved against the folder of the YAML file.

Policy decisions (documented for hospital IT):

- A run whose model is not in ``policy.allowed_models`` or whose planned rounds exceed
  ``policy.max_rounds`` is refused (:class:`SitePolicyViolation`; the reason reaches the
  coordinator's log, the other sites carry on).
- ``policy.dp.required``: the site trains only with local DP-SGD (Opacus). A run that asks
  for local DP weaker than ``policy.dp.max_run_epsilon`` is refused ("DP too weak"). A run that
  does not ask for local DP (DP off, or ``mode: central``, which does not protect data from the
  coordinator) is, by default, trained with the **site's own DP** at ``max_run_epsilon``
  (``policy.dp.when_not_requested: enforce``; the reply reports ``dp-enabled=1`` and the
  epsilon); set ``when_not_requested: refuse`` to refuse such runs instead.
- The site's lifetime budget ``policy.dp.budget_epsilon`` (per dataset, in the privacy ledger
  of the state directory) caps every DP run; the coordinator cannot raise it.

Importing this module is light (no torch); :func:`load_deployed_site` imports the trainer,
the data loader and the privacy controller when it runs.

Example (every optional field shown with its default, except where marked)::

    name: st-mary                         # reported to the coordinator
    coordinator:
      address: fl.example.org:9092        # the coordinator's SuperLink, HOST:PORT
      ca_certificate: certs/ca.crt        # relative paths: from this file's folder
      auth_key: certs/supernode.key       # OpenSSH ECDSA key; chmod 600; .pub registered
      connect_timeout_s: 10
    data:                                 # kind: dicom | image_folder
      kind: dicom
      root: /data/chest-xray
      labels_csv: labels.csv              # relative to root
      key: relative_path                  # or sop_instance_uid
      path_column: path
      label_column: label
    class_names: [normal, pneumonia]      # (not a default) labels of this site's data
    validation: {fraction: 0.2, seed: 0}  # local held-out split, stratified
    resources: {threads: 4, max_batch_size: 256}   # (threads default: auto)
    state_dir: /var/lib/consilia/st-mary  # logs, image cache, privacy ledger
    policy:
      allowed_models: [cnn, densenet121]  # (default: any registered model)
      max_rounds: 100
      dp:
        required: true                    # (default: false)
        max_run_epsilon: 8.0
        when_not_requested: enforce       # or refuse
        budget_epsilon: 10.0              # lifetime, per dataset
        delta: 1.0e-5                     # (default: min(1e-5, 1/(10 n)))
        max_grad_norm: 1.0
        accountant: rdp
        dataset_key: chest-xray-2024      # (default: the site name)
      feature_statistics:                 # classifier calibration after the last round
        share: true                       # send per-class feature sums (no per-image value)
        min_class_count: 20               # withhold classes rarer than this here
        dp_noise_multiplier: 5.0          # local-DP runs: noised, in the ledger; null: decline
      approved_apps: ["consilia/consilia-run==0.1.0"]   # default: the installed version
    runtime:
      isolation: process                  # subprocess = Flower's default (no approval)
      runtime_port: 9094                  # 127.0.0.1 only
      task_poll_interval_s: 0.2          # idle pace of the ClientApp process
      superlink_poll_interval_s: 1.0     # idle pace of the SuperNode
      active_poll_interval_s: 0.1        # both, during a run
      active_window_s: 60
      max_backoff_s: 300
"""

from __future__ import annotations

import logging
import re
import sys
import zlib
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from consilia.client.site.data_sources import DataSourceConfig
from consilia.common.config import (
    ConfigError,
    DPConfig,
    StrictModel,
    format_validation_error,
    load_config_file,
)
from consilia.common.flower.app_project import APP_PUBLISHER
from consilia.common.instructions import RoundInstruction

if TYPE_CHECKING:
    from consilia.client.site.locator import StatisticsRule

__all__ = [
    "APP_NAME",
    "CoordinatorConfig",
    "DPPolicy",
    "FeatureStatisticsPolicy",
    "ResourceLimits",
    "RuntimeSettings",
    "SiteConfig",
    "SitePolicy",
    "SitePolicyViolation",
    "statistics_rule_for",
    "ValidationSplit",
    "check_policy",
    "default_approved_apps",
    "installed_version",
    "load_deployed_site",
    "load_site_config",
    "register_loader",
    "site_dp_request",
    "stratified_split",
]

log = logging.getLogger("consilia.site")

#: ``project.name`` of the app bundle the coordinator submits (see common/flower/app_project.py).
APP_NAME = "consilia-run"

_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_APP_ID = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+==[A-Za-z0-9_.*+!-]+$")


class SitePolicyViolation(RuntimeError):  # noqa: N818 (named by the design brief)
    """The coordinator's run violates this site's policy; the site refuses it.

    Attributes
    ----------
    reason : str
        Plain-language reason (also the message), shown in the coordinator's log.

    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def installed_version() -> str:
    """Return the version of the installed Consilia package (what this site runs)."""
    try:
        return metadata.version("consilia")
    except metadata.PackageNotFoundError:  # pragma: no cover - source checkout without install
        return "0.0.0"


def default_approved_apps() -> list[str]:
    """Return the bundle identity the installed Consilia serves (``consilia/consilia-run==V``)."""
    return [f"{APP_PUBLISHER}/{APP_NAME}=={installed_version()}"]


# ---------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------


class CoordinatorConfig(StrictModel):
    """How the site reaches the coordinator (outbound TLS only; nothing listens at the site)."""

    address: str = Field(description="the coordinator's SuperLink address, HOST:PORT")
    ca_certificate: Path = Field(description="PEM CA certificate that signed the coordinator's")
    auth_key: Path = Field(
        description="the site's OpenSSH ECDSA private key, registered at the coordinator "
        "(its .pub file is what the coordinator registers); must not be group/world readable"
    )
    connect_timeout_s: float = Field(10.0, gt=0, le=300)

    @field_validator("address")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.strip().rpartition(":")
        if "://" in value:
            raise ValueError("give HOST:PORT without a scheme (no https://)")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("expected HOST:PORT, e.g. fl.example.org:9092")
        return value.strip()

    @property
    def host(self) -> str:
        """Host part of :attr:`address` (IPv6 brackets removed)."""
        return self.address.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        """Port part of :attr:`address`."""
        return int(self.address.rpartition(":")[2])


class ValidationSplit(StrictModel):
    """The site's local held-out split (stratified by class, seeded, never leaves the site)."""

    fraction: float = Field(0.2, ge=0, lt=1)
    seed: int = 0


class ResourceLimits(StrictModel):
    """What the site lends to training."""

    threads: int | None = Field(None, ge=1, le=1024, description="torch threads (None = auto)")
    max_batch_size: int = Field(
        256, ge=1, le=65536, description="a run asking for larger batches is trained with this"
    )


class DPPolicy(StrictModel):
    """The site's differential-privacy rules (local DP-SGD with Opacus)."""

    required: bool = Field(False, description="train only with local DP")
    max_run_epsilon: float = Field(
        8.0, gt=0, description="weakest per-run guarantee accepted (a run asking for a "
        "larger epsilon is refused when DP is required); also the site's own DP strength"
    )
    when_not_requested: Literal["enforce", "refuse"] = Field(
        "enforce", description="DP required but the run did not ask for local DP: apply the "
        "site's own DP (enforce) or refuse the run"
    )
    budget_epsilon: float = Field(
        10.0, gt=0, description="lifetime epsilon budget per dataset (privacy ledger); the "
        "coordinator cannot raise it"
    )
    delta: float | None = Field(
        None, gt=0, lt=1, description="the site's delta (None: min(1e-5, 1/(10 n)))"
    )
    max_grad_norm: float = Field(1.0, gt=0, description="clipping norm of the site's own DP")
    accountant: Literal["rdp", "prv", "gdp"] = "rdp"
    dataset_key: str | None = Field(
        None, min_length=1, description="name of this data in the privacy ledger (default: "
        "the site name); keep it stable when images are added"
    )


class FeatureStatisticsPolicy(StrictModel):
    """Whether the site answers the coordinator's classifier-calibration request.

    The answer is, per class, the number of images and the sum and outer-product sum of the
    global model's penultimate features (a few dozen numbers per class; never a per-image
    value). A site training the run with local DP sends them only through the Gaussian
    mechanism (features clipped to the coordinator's bound, noise multiplier
    ``dp_noise_multiplier``), accounted in its privacy ledger and planned into the run's
    budget from the first round; ``dp_noise_multiplier: null`` makes it decline instead.
    """

    share: bool = Field(True, description="send per-class feature statistics at the end of a "
                        "run (classifier calibration)")
    min_class_count: int = Field(20, ge=1, description="withhold every class with fewer images "
                                 "than this at the site (exact statistics, sites without DP)")
    dp_noise_multiplier: float | None = Field(
        5.0, gt=0, description="Gaussian noise multiplier of the statistics a site training "
        "with local DP sends; planned into the run's epsilon from its first round (at 5 the "
        "release costs about 0.07 of an epsilon-8 run); null: such a site declines"
    )


class SitePolicy(StrictModel):
    """What the site agrees to take part in."""

    allowed_models: list[str] | None = Field(
        None, description="registered architectures this site trains (None = any)"
    )
    max_rounds: int = Field(100, ge=1, le=100000)
    dp: DPPolicy = DPPolicy()
    feature_statistics: FeatureStatisticsPolicy = FeatureStatisticsPolicy()
    approved_apps: list[str] = Field(
        default_factory=default_approved_apps,
        description="app bundles this site serves: 'publisher/name==version' (version may "
        "use * wildcards) or 'sha256:<64 hex>' (the bundle's hash)",
    )

    @field_validator("approved_apps")
    @classmethod
    def _approved_syntax(cls, value: list[str]) -> list[str]:
        out = []
        for item in value:
            entry = item.strip()
            if entry.startswith("sha256:"):
                digest = entry.removeprefix("sha256:").lower()
                if not _HEX64.match(digest):
                    raise ValueError(f"'{item}': a hash entry is 'sha256:' + 64 hex digits")
                entry = "sha256:" + digest
            elif not _APP_ID.match(entry):
                raise ValueError(
                    f"'{item}': expected 'publisher/name==version' (e.g. "
                    f"'{default_approved_apps()[0]}') or 'sha256:<64 hex>'"
                )
            out.append(entry)
        return out


class RuntimeSettings(StrictModel):
    """How ``fl-client`` runs the Flower SuperNode and the site's ClientApp process."""

    isolation: Literal["process", "subprocess"] = Field(
        "process", description="process: the site's own long-lived ClientApp process that "
        "runs only the installed Consilia code and only approved bundles (recommended); "
        "subprocess: Flower's default, a fresh process per task running whatever ClientApp "
        "the bundle names (no approval check; for benchmarks only)"
    )
    runtime_port: int = Field(
        9094, ge=1024, le=65535, description="local port of the SuperNode's runtime API "
        "(bound to 127.0.0.1; one per site on a host)"
    )
    task_poll_interval_s: float = Field(
        0.2, ge=0.01, le=60, description="how often the ClientApp process asks for a task"
    )
    superlink_poll_interval_s: float = Field(
        1.0, ge=0.2, le=60, description="idle wait between the SuperNode's polls of the "
        "coordinator (Flower's default: 3 s); smaller answers rounds faster"
    )
    active_poll_interval_s: float = Field(
        0.1, ge=0.02, le=60, description="while a run is active (a task handled in the last "
        "active_window_s), the SuperNode polls the coordinator and the ClientApp process "
        "polls the SuperNode this often; rounds then start within ~0.1 s"
    )
    active_window_s: float = Field(
        60.0, ge=0, le=3600, description="how long after the last task the site keeps "
        "polling at the active pace before falling back to the idle intervals"
    )
    max_backoff_s: float = Field(300.0, ge=1, description="longest wait between reconnects")


class SiteConfig(StrictModel):
    """A hospital site: identity, coordinator, data, resources, state and policy."""

    name: str = Field(description="the site's name, reported to the coordinator")
    coordinator: CoordinatorConfig
    data: DataSourceConfig
    class_names: list[str] | None = Field(
        None, min_length=2, description="labels this site's data uses (for --check; a run's "
        "task decides the label space for training). Image folders default to the sub-folders"
    )
    validation: ValidationSplit = ValidationSplit()
    resources: ResourceLimits = ResourceLimits()
    state_dir: Path = Field(description="persistent folder: logs, image cache, privacy ledger")
    policy: SitePolicy = SitePolicy()
    runtime: RuntimeSettings = RuntimeSettings()

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _SITE_NAME.match(value):
            raise ValueError(
                "use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        return value

    @model_validator(mode="after")
    def _class_names_unique(self) -> SiteConfig:
        if self.class_names is not None and len(set(self.class_names)) != len(self.class_names):
            raise ValueError("class_names contains duplicates")
        return self

    # -- derived paths ------------------------------------------------------------------

    @property
    def dataset_key(self) -> str:
        """Name of the site's data in the privacy ledger."""
        return self.policy.dp.dataset_key or self.name

    @property
    def log_dir(self) -> Path:
        """``<state_dir>/logs``."""
        return self.state_dir / "logs"

    @property
    def cache_dir(self) -> Path:
        """``<state_dir>/cache`` (decoded images)."""
        return self.state_dir / "cache"

    @property
    def ledger_path(self) -> Path:
        """``<state_dir>/privacy-ledger.json``."""
        return self.state_dir / "privacy-ledger.json"

    @property
    def rounds_log(self) -> Path:
        """``<state_dir>/logs/rounds.jsonl``: one line per task the site took part in."""
        return self.log_dir / "rounds.jsonl"


def _absolute(value: Path, base: Path) -> Path:
    value = value.expanduser()
    return value if value.is_absolute() else base / value


def _resolve_paths(config: SiteConfig, base: Path) -> None:
    """Make the site's file paths absolute, relative ones taken from ``base``.

    A DICOM source's ``labels_csv`` keeps its own rule (relative to the data root).
    """
    coord = config.coordinator
    coord.ca_certificate = _absolute(coord.ca_certificate, base)
    coord.auth_key = _absolute(coord.auth_key, base)
    config.state_dir = _absolute(config.state_dir, base)
    config.data.root = _absolute(config.data.root, base)


def load_site_config(path: str | Path) -> SiteConfig:
    """Load and validate a site YAML file.

    Parameters
    ----------
    path : str or Path
        The site configuration; relative paths inside it are resolved against its folder.

    Returns
    -------
    SiteConfig
        The validated configuration with absolute paths.

    Raises
    ------
    ConfigError
        With the file name and one line per bad field (what is wrong, what is allowed).

    """
    path = Path(path).expanduser().resolve()
    data = load_config_file(path)
    try:
        config = SiteConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, f"site config {path}")) from None
    _resolve_paths(config, path.parent)
    return config


# ---------------------------------------------------------------------------------------
# Policy
# ---------------------------------------------------------------------------------------


def _requests_local_dp(instr: RoundInstruction) -> bool:
    return bool(instr.dp.enabled and instr.dp.mode == "local")


def check_policy(policy: SitePolicy, instr: RoundInstruction) -> None:
    """Refuse an instruction that violates the site's policy.

    Parameters
    ----------
    policy : SitePolicy
        The site's rules.
    instr : RoundInstruction
        What the coordinator asks this round.

    Raises
    ------
    SitePolicyViolation
        With a reason naming the run's value and the site's limit.

    """
    model = instr.model.name
    if policy.allowed_models is not None and model not in policy.allowed_models:
        raise SitePolicyViolation(
            f"model '{model}' is not allowed by this site's policy (allowed: "
            f"{', '.join(policy.allowed_models) or 'none'})"
        )
    if instr.total_rounds > policy.max_rounds:
        raise SitePolicyViolation(
            f"the run plans {instr.total_rounds} rounds; this site takes part in at most "
            f"{policy.max_rounds} rounds per run"
        )
    dp = policy.dp
    if not dp.required:
        return
    if _requests_local_dp(instr):
        if instr.dp.target_epsilon > dp.max_run_epsilon:
            raise SitePolicyViolation(
                f"differential privacy too weak: the run asks for ε={instr.dp.target_epsilon:g}; "
                f"this site requires ε ≤ {dp.max_run_epsilon:g} per run"
            )
        return
    if dp.when_not_requested == "refuse":
        why = (
            "central DP (dp.mode=central) does not protect the data from the coordinator"
            if instr.dp.enabled
            else "the run has DP disabled"
        )
        raise SitePolicyViolation(
            f"this site requires local differential privacy (ε ≤ {dp.max_run_epsilon:g} per "
            f"run) and {why}; enable dp with mode 'local'"
        )


def site_dp_request(policy: DPPolicy, instr: RoundInstruction) -> DPConfig | None:
    """Return the DP this site applies to a round: the run's local DP, the site's own, or none.

    The run's own request is used when it asks for local DP; when the site requires DP and the
    run did not ask for it (and the policy enforces), the site's own DP at
    ``max_run_epsilon`` is applied. The lifetime budget caps either (privacy controller).
    """
    if _requests_local_dp(instr):
        return instr.dp
    if policy.required and policy.when_not_requested == "enforce":
        return DPConfig(
            enabled=True,
            mode="local",
            target_epsilon=policy.max_run_epsilon,
            target_delta=policy.delta,
            max_grad_norm=policy.max_grad_norm,
            accountant=policy.accountant,
        )
    return None


# ---------------------------------------------------------------------------------------
# The deployed site (used by the ClientApp through consilia.client.site.locator)
# ---------------------------------------------------------------------------------------


def stratified_split(labels: Any, fraction: float, seed: int) -> tuple[Any, Any]:
    """Seeded per-class split of indices into (train, validation).

    Each class with at least two images gives ``round(fraction * n)`` of them (at least one,
    at most ``n - 1``) to validation; a class with a single image stays in training.

    Returns
    -------
    tuple of numpy arrays
        Sorted train and validation indices.

    """
    import numpy as np

    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    val: list[int] = []
    if fraction > 0:
        for cls in np.unique(labels):
            idx = np.flatnonzero(labels == cls)
            if idx.size < 2:
                continue
            k = min(max(int(round(fraction * idx.size)), 1), idx.size - 1)
            val.extend(rng.permutation(idx)[:k].tolist())
    val_idx = np.array(sorted(val), dtype=np.int64)
    train_idx = np.setdiff1d(np.arange(labels.size), val_idx)
    return train_idx, val_idx


def _site_index(name: str) -> int:
    """Return a stable per-site integer for seeds (CRC32 of the name)."""
    return zlib.crc32(name.encode()) % 100_000


def _current_run_id(default: str) -> str:
    """Flower's run id of the task being executed (set when a ClientApp pulls its task)."""
    try:
        from flwr.supercore.task_identity import TaskIdentity

        run_id = getattr(TaskIdentity, "run_id", None)
    except ImportError:  # pragma: no cover
        run_id = None
    return str(run_id) if run_id else default


def load_deployed_site(path: Path, instr: RoundInstruction, run_id: int | str | None = None):
    """Build the :class:`~consilia.client.site.locator.SiteRuntime` of a deployed site.

    Checks the policy first (a refused run never touches the data), loads the data through
    the state directory's cache, splits the local validation fraction (stratified, seeded),
    and builds a trainer with the site's thread and batch-size limits and a privacy factory
    that accounts in the site's ledger.

    Parameters
    ----------
    path : Path
        The site YAML (``node_config["site-config"]``).
    instr : RoundInstruction
        The first instruction of the run (task geometry and label space).
    run_id : int or str, optional
        Flower's run id (ledger key of the run's calibration); default: the run id of the task
        being executed, else the run name.

    Raises
    ------
    SitePolicyViolation
        If the run violates the site's policy.
    ValueError
        If the site has no usable image for this task.

    """
    from consilia.client.site.data_sources import load_site_data
    from consilia.client.site.locator import SiteRuntime
    from consilia.client.trainer import ImageData

    config = load_site_config(path)
    check_policy(config.policy, instr)
    task = instr.task
    dataset, report = load_site_data(
        config.data, list(task.class_names), task.in_channels, task.image_size,
        cache_dir=config.cache_dir, progress=False,
    )
    log.info("site %s: %s", config.name, report.to_text().replace("\n", "\n  "))
    if len(dataset) == 0:
        raise ValueError(
            f"site '{config.name}' has no usable image for classes {task.class_names} "
            f"({config.data.describe()}); run fl-client --check"
        )
    train_idx, val_idx = stratified_split(
        dataset.labels, config.validation.fraction, config.validation.seed
    )
    train = ImageData(dataset.images[train_idx], dataset.labels[train_idx])
    val = ImageData(dataset.images[val_idx], dataset.labels[val_idx]) if val_idx.size else None
    fixed_run_id = None if run_id is None else str(run_id)

    def privacy_factory(round_instr: RoundInstruction, n_train: int):
        dp = site_dp_request(config.policy.dp, round_instr)
        if dp is None:
            return None
        from consilia.client.privacy.ledger import PrivacyLedger
        from consilia.client.privacy.controller import PrivacyController

        statistics = config.policy.feature_statistics
        controller = PrivacyController(
            dp,
            budget_epsilon=config.policy.dp.budget_epsilon,
            budget_delta=config.policy.dp.delta,
            ledger=PrivacyLedger(config.ledger_path),
            dataset_key=config.dataset_key,
            model_name=round_instr.model.name,
            release_noise_multiplier=statistics.dp_noise_multiplier
            if round_instr.calibration and statistics.share else None,
        )
        rid = fixed_run_id or _current_run_id(round_instr.run_name)
        return controller.bind_round(rid, round_instr.server_round, round_instr.total_rounds)

    trainer = _capped_trainer(config, train, val, privacy_factory)
    log.info(
        "site %s ready: %d training / %d validation images (classes %s)",
        config.name, len(train), 0 if val is None else len(val), ", ".join(task.class_names),
    )

    def current_policy(round_instr: RoundInstruction) -> None:
        # Re-read the file: a hospital tightening its policy takes effect at the next round.
        check_policy(load_site_config(path).policy, round_instr)

    def statistics_rule() -> StatisticsRule:
        return statistics_rule_for(load_site_config(path).policy)

    return SiteRuntime(name=config.name, trainer=trainer, check_policy=current_policy,
                       statistics_rule=statistics_rule)


def statistics_rule_for(policy: SitePolicy) -> StatisticsRule:
    """Translate the site's policy into its answer to a feature-statistics request."""
    from consilia.client.site.locator import StatisticsRule

    rule = policy.feature_statistics
    if not rule.share:
        return StatisticsRule(False, rule.min_class_count, "this site's policy does not share "
                              "feature statistics (policy.feature_statistics.share: false)",
                              None)
    if policy.dp.required and rule.dp_noise_multiplier is None:
        return StatisticsRule(False, rule.min_class_count, "this site trains with local DP "
                              "(policy.dp.required) and sends no noised feature statistics "
                              "(policy.feature_statistics.dp_noise_multiplier: null)", None)
    return StatisticsRule(True, rule.min_class_count, "", rule.dp_noise_multiplier)


def _capped_trainer(config: SiteConfig, train, val, privacy_factory):
    """Build a SiteTrainer whose training batch size never exceeds the site's limit."""
    from consilia.client.trainer import SiteTrainer

    limit = config.resources.max_batch_size

    class CappedSiteTrainer(SiteTrainer):
        """SiteTrainer honouring ``resources.max_batch_size`` (and DP's physical batch)."""

        def fit(self, state, instr):  # noqa: D102 - documented on SiteTrainer
            return super().fit(state, _cap_batch(instr, limit))

        def evaluate(self, state, instr):  # noqa: D102
            return super().evaluate(state, _cap_batch(instr, limit))

    return CappedSiteTrainer(
        config.name, train, val, site_index=_site_index(config.name),
        threads=config.resources.threads, privacy_factory=privacy_factory,
    )


def _cap_batch(instr: RoundInstruction, limit: int) -> RoundInstruction:
    train, dp = instr.train, instr.dp
    if train.batch_size > limit:
        log.info("batch size %d capped to the site's limit %d", train.batch_size, limit)
        train = train.model_copy(update={"batch_size": limit})
    if dp.max_physical_batch_size > limit:
        dp = dp.model_copy(update={"max_physical_batch_size": limit})
    if train is instr.train and dp is instr.dp:
        return instr
    return replace(instr, train=train, dp=dp)


def register_loader() -> None:
    """Install :func:`load_deployed_site` as the ClientApp's deployed-site loader."""
    from consilia.client.site.locator import register_deployed_site_loader

    register_deployed_site_loader(load_deployed_site)


# consilia.client.site.locator imports this module lazily when a node has a 'site-config':
# register then, without importing torch into light processes (fl-client's supervisor).
if "consilia.client.site.locator" in sys.modules:
    register_loader()
