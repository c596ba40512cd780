"""The coordinator's strategy section: aggregation, its parameters, update checks, CCVR."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from consilia.common.config.base import StrictModel

__all__ = [
    "BulyanConfig",
    "CENTRAL_DP_STRATEGIES",
    "CalibrationConfig",
    "FedAdagradConfig",
    "FedAvgMConfig",
    "FedYogiConfig",
    "KrumConfig",
    "MultiKrumConfig",
    "StrategyConfig",
    "StrategyName",
    "TrimmedMeanConfig",
    "UpdateValidationConfig",
]


class CalibrationConfig(StrictModel):
    """Classifier calibration after the last round (CCVR; see :mod:`consilia.common.ccvr`).

    Sites send per-class sums of the head's input features; the coordinator re-fits the
    classifier head on virtual features drawn from the pooled class Gaussians.
    """

    enabled: bool = False
    virtual_per_class: int = Field(default=2000, ge=10, le=100_000)
    epochs: int = Field(default=100, ge=1, le=10_000)
    lr: float = Field(default=0.04, gt=0)
    batch_size: int = Field(default=256, ge=1)
    min_sites: int | None = Field(
        default=None, ge=1, description="sites that must send statistics (None = min_train_sites)"
    )
    feature_clip_norm: float | None = Field(
        default=None, gt=0, description="L2 bound on features for sites that answer with DP-noised "
        "statistics (None = the 90th percentile of the final model's feature norms on the "
        "coordinator's test images)"
    )


class UpdateValidationConfig(StrictModel):
    """Checks every training reply passes before aggregation (``strategy.validation``).

    A reply must match the global model's layout (names, shapes, dtypes), hold only finite
    values, report a positive whole ``num-examples`` within the caps below, and move the model
    no further than ``max_update_norm_ratio`` × the round's median update; a reply that fails
    is dropped and recorded (``rejected`` in ``rounds.jsonl``). The defaults leave honest
    runs unchanged.
    """

    max_num_examples: int = Field(
        default=100_000_000, ge=1,
        description="largest num-examples a site may report in one reply")
    max_num_examples_growth: float = Field(
        default=10.0, ge=1,
        description="a site may report at most this × the num-examples of its first accepted "
        "reply in the run (growing data stays possible; one site cannot take over the average)")
    max_update_norm_ratio: float | None = Field(
        default=10.0, gt=1,
        description="largest ||w_site - w_global|| as a multiple of the round's median update "
        "norm (checked with 3 or more replies); null turns the check off")
    exclude_after: int | None = Field(
        default=3, ge=1,
        description="a site rejected in this many rounds is excluded for the rest of the run; "
        "null never excludes")


_ETA_L = "client learning rate: Flower only logs it (the sites train with train.lr)"


class FedYogiConfig(StrictModel):
    """FedYogi's server optimizer (``strategy.fedyogi``; Flower 1.42's defaults)."""

    eta: float = Field(default=1e-2, gt=0, description="server learning rate")
    eta_l: float = Field(default=0.0316, gt=0, description=_ETA_L)
    beta_1: float = Field(default=0.9, ge=0, lt=1)
    beta_2: float = Field(default=0.99, ge=0, lt=1)
    tau: float = Field(default=1e-3, gt=0, description="adaptivity (added to sqrt(v_t))")


class FedAdagradConfig(StrictModel):
    """FedAdagrad's server optimizer (``strategy.fedadagrad``; Flower 1.42's defaults)."""

    eta: float = Field(default=1e-1, gt=0, description="server learning rate")
    eta_l: float = Field(default=1e-1, gt=0, description=_ETA_L)
    tau: float = Field(default=1e-3, gt=0, description="adaptivity (added to sqrt(v_t))")


class FedAvgMConfig(StrictModel):
    """FedAvgM's server SGD with momentum (``strategy.fedavgm``; Flower 1.42's defaults).

    With ``server_learning_rate: 1`` and ``server_momentum: 0`` it is plain FedAvg.
    """

    server_learning_rate: float = Field(default=1.0, gt=0)
    server_momentum: float = Field(default=0.0, ge=0, lt=1)


class TrimmedMeanConfig(StrictModel):
    """Coordinate-wise trimmed mean (``strategy.trimmed_mean``)."""

    beta: float = Field(default=0.2, ge=0, lt=0.5, description="fraction of the replies "
                        "cut at each end of every coordinate (floor(beta·n) of n replies)")


class KrumConfig(StrictModel):
    """Krum (``strategy.krum``): the one reply closest to its n−f−2 nearest others."""

    num_malicious_nodes: int = Field(default=0, ge=0, description="f, the Byzantine sites "
                                     "tolerated; needs n ≥ 2f+3 replies per round")


class MultiKrumConfig(KrumConfig):
    """Multi-Krum (``strategy.multi_krum``): the mean of the m best Krum-scored replies."""

    num_nodes_to_select: int = Field(default=1, ge=1, description="m, replies averaged")


class BulyanConfig(StrictModel):
    """Bulyan (``strategy.bulyan``): Multi-Krum selection, then a coordinate-wise trimmed mean."""

    num_malicious_nodes: int = Field(default=0, ge=0, description="f, the Byzantine sites "
                                     "tolerated; needs n ≥ 4f+3 replies per round")


StrategyName = Literal["fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm",
                       "trimmed-mean", "median", "krum", "multi-krum", "bulyan"]

#: The strategies central DP may wrap: its noise, added to what the strategy returns, is
#: calibrated to a mean of the clipped updates (a median, Krum's pick or a server optimizer's
#: step has another sensitivity; FedAdam predates this check).
CENTRAL_DP_STRATEGIES = ("fedavg", "fedprox", "fedadam")


class StrategyConfig(StrictModel):
    """The server-side aggregation strategy and round schedule.

    Each strategy's own parameters live in the section named after it (``fedyogi``,
    ``trimmed_mean``, ``multi_krum``, ...); the FedAdam ones are the ``server_*`` fields.
    """

    name: StrategyName = "fedprox"
    rounds: int = Field(default=5, ge=1, le=10000)
    proximal_mu: float = Field(default=0.01, ge=0)
    fraction_train: float = Field(default=1.0, gt=0, le=1)
    fraction_evaluate: float = Field(default=1.0, ge=0, le=1)
    site_evaluation: Literal["with-next-round", "separate"] = Field(
        default="with-next-round",
        description="with-next-round: the sites that train round r+1 first score round r's "
        "global model (the one they receive) on their validation split and send the scores "
        "with their training reply (one message and one model download per site per round "
        "fewer); the final model gets evaluate messages of its own. separate: evaluate "
        "messages after every round. fraction_evaluate applies to evaluate messages; 0 turns "
        "site evaluation off",
    )
    min_train_sites: int = Field(default=2, ge=1)
    min_evaluate_sites: int = Field(default=2, ge=0)
    min_available_sites: int = Field(default=2, ge=1)
    round_timeout_s: float = Field(default=3600.0, gt=0)
    server_lr: float = Field(default=0.01, gt=0, description="FedAdam eta")
    server_beta_1: float = Field(default=0.9, ge=0, lt=1)
    server_beta_2: float = Field(default=0.99, ge=0, lt=1)
    server_tau: float = Field(default=1e-3, gt=0)
    fedyogi: FedYogiConfig = FedYogiConfig()
    fedadagrad: FedAdagradConfig = FedAdagradConfig()
    fedavgm: FedAvgMConfig = FedAvgMConfig()
    trimmed_mean: TrimmedMeanConfig = TrimmedMeanConfig()
    krum: KrumConfig = KrumConfig()
    multi_krum: MultiKrumConfig = MultiKrumConfig()
    bulyan: BulyanConfig = BulyanConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    validation: UpdateValidationConfig = UpdateValidationConfig()

    def min_replies(self) -> tuple[int, str]:
        """Return the fewest train replies the strategy can aggregate, and the field behind it.

        Bulyan needs ``4f+3`` replies and (Multi-)Krum ``2f+3`` (``f`` =
        ``num_malicious_nodes``); Multi-Krum also needs ``num_nodes_to_select + f``. Every
        other strategy needs one reply (``min_train_sites`` sets the run's own minimum).
        """
        if self.name == "bulyan":
            f = self.bulyan.num_malicious_nodes
            return 4 * f + 3, f"strategy.bulyan.num_malicious_nodes={f} (4f+3)"
        if self.name == "krum":
            f = self.krum.num_malicious_nodes
            return 2 * f + 3, f"strategy.krum.num_malicious_nodes={f} (2f+3)"
        if self.name == "multi-krum":
            f, m = self.multi_krum.num_malicious_nodes, self.multi_krum.num_nodes_to_select
            return max(2 * f + 3, m + f), (
                f"strategy.multi_krum.num_malicious_nodes={f}, num_nodes_to_select={m} "
                "(max(2f+3, m+f))")
        return 1, "strategy.name"
