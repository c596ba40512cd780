"""The privacy budget's refusals: the two exceptions and the slack of every epsilon comparison.

:class:`PrivacyBudgetExceeded` means a site refuses to train (or to release) because a budget
would be exceeded; :class:`PrivacyConfigError` means the DP request or the site's privacy
policy cannot be honoured as given. No torch or Opacus import.
"""

from __future__ import annotations

__all__ = ["EPSILON_SLACK", "PrivacyBudgetExceeded", "PrivacyConfigError"]

#: Slack when comparing a would-be epsilon with its cap (float noise of the accountant only).
EPSILON_SLACK = 1e-9


class PrivacyBudgetExceeded(RuntimeError):  # noqa: N818 (name fixed by the design brief)
    """Training one more round would exceed a privacy budget; the site refuses to train.

    Attributes
    ----------
    reason : str
        Plain-language reason (also the exception message).

    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PrivacyConfigError(ValueError):
    """The DP request or the site's privacy policy cannot be honoured as given."""

