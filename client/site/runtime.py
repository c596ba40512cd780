"""A loaded site as the ClientApp sees it: its trainer, its policy check, its statistics rule."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from consilia.client.site.policy import StatisticsRule
from consilia.client.trainer import SiteTrainer
from consilia.common.instructions import RoundInstruction

__all__ = ["SiteRuntime"]


@dataclass
class SiteRuntime:
    """A loaded site: its trainer, an optional policy check and its statistics rule."""

    name: str
    trainer: SiteTrainer
    check_policy: Callable[[RoundInstruction], None] | None = None
    statistics_rule: Callable[[], StatisticsRule] = StatisticsRule

    def enforce_policy(self, instr: RoundInstruction) -> None:
        """Raise if the coordinator's instruction violates this site's policy."""
        if self.check_policy is not None:
            self.check_policy(instr)
