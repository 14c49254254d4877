"""Where each kind of candidate sits among the M key columns, and their weights."""

from __future__ import annotations

from typing import NamedTuple


class ColumnLayout(NamedTuple):
    """Column segments of the candidate matrix ``[positives; hard; extra; gaussian]``.

    n_cols: M, every candidate column.
    n_grad_cols: the leading columns that receive a gradient (positives and hard
        negatives); extra and Gaussian negatives are constants.
    hard_start, n_hard: row i < n_hard has its own hard negative at column
        ``hard_start + i`` (n_hard is 0 without hard negatives).
    gauss_start: first Gaussian column (``n_cols`` when there are none).
    log_hard_weight, log_gauss_weight: additive logit weights (0.0 means weight 1).
    self_start, n_self: row i < n_self must not score column ``self_start + i`` (itself:
        NT-Xent, where queries and candidates are the same rows); n_self 0 masks nothing.
    """

    n_cols: int
    n_grad_cols: int
    hard_start: int = 0
    n_hard: int = 0
    gauss_start: int = 0
    log_hard_weight: float = 0.0
    log_gauss_weight: float = 0.0
    self_start: int = 0
    n_self: int = 0

    @classmethod
    def plain(cls, n_cols: int, n_grad_cols: int | None = None) -> "ColumnLayout":
        """Unweighted columns: every column is a candidate, none carries a weight."""
        return cls(n_cols=n_cols, n_grad_cols=n_cols if n_grad_cols is None else n_grad_cols,
                   gauss_start=n_cols)

    @property
    def hard_weighted(self) -> bool:
        return self.n_hard > 0 and self.log_hard_weight != 0.0

    @property
    def gauss_weighted(self) -> bool:
        return self.gauss_start < self.n_cols and self.log_gauss_weight != 0.0
