"""Where each kind of candidate sits among the M key columns, their weights, and the
per-entry rules (several hard negatives per row, the hardness penalty)."""

from __future__ import annotations

from typing import NamedTuple

import torch

#: ``ColumnLayout.hardness_mode`` values: which entries of row i get the hardness penalty
#: (see :class:`ColumnLayout`). Ints, so that every kernel can take them as they are.
HARDNESS_NONE = 0
HARDNESS_IN_BATCH = 1  # every column but the row's target and its own hard negatives
HARDNESS_HARD = 2  # the row's own hard negatives only (never its target)
HARDNESS_ALL = 3  # every column but the row's target
#: The loss's ``hardness_mode`` names, by code.
HARDNESS_MODES = {"in_batch_negatives": HARDNESS_IN_BATCH, "hard_negatives": HARDNESS_HARD,
                  "all_negatives": HARDNESS_ALL}


class GuideMask(NamedTuple):
    """The guide rule's tensors (see :class:`ColumnLayout`), all detached and in the
    accumulator dtype: ``rows`` (N x Dg unit rows, one per query row), ``cols`` (G x Dg
    unit rows, one per gradient column) and ``thresholds`` (N)."""

    rows: torch.Tensor
    cols: torch.Tensor
    thresholds: torch.Tensor


class ColumnLayout(NamedTuple):
    """Column segments of the candidate matrix ``[positives; hard; extra; gaussian]``, and
    the rules that decide each entry (i, j) of the (never stored) logit matrix.

    Notation: ``sim_ij`` is the similarity the kernel forms (the cosine when it
    normalizes, else the raw dot product q_i . k_j), in the accumulator dtype;
    ``inv_tau`` = 1 / temperature; ``t_i`` is row i's target column (``targets[i]``, or i
    when no targets are given; -1 means row i has no target).

    n_cols: M, every candidate column.
    n_grad_cols: the leading columns that receive a gradient (positives and hard
        negatives); extra and Gaussian negatives are constants.
    hard_start, n_hard, n_hard_blocks: row i < n_hard owns the ``n_hard_blocks`` (K)
        columns ``hard_start + k * n_hard + i`` for k in [0, K): its own hard negatives,
        K blocks of n_hard columns each (n_hard is 0 without hard negatives; K = 1 is one
        hard negative per row, at ``hard_start + i``). Each of them gets
        ``log_hard_weight`` added to its logit.
    gauss_start: first Gaussian column (``n_cols`` when there are none).
    log_hard_weight, log_gauss_weight: additive logit weights (0.0 means weight 1).
        ``log_hard_weight`` may be -inf: the row's own hard negatives are then masked
        (exp = 0, no gradient), as a document's own documents are in doc_to_doc.
    self_start, n_self: row i < n_self must not score column ``self_start + i`` (itself:
        NT-Xent, where queries and candidates are the same rows); n_self 0 masks nothing.
    hardness_mode, hardness_strength: the hardness penalty (Lan et al. 2025), ``s *
        sim_ij`` with s = ``hardness_strength`` (>= 0, a Python float), added to the
        VALUE of entry (i, j)'s logit but not to its derivative: d logit_ij / d sim_ij
        stays ``inv_tau`` and d logit_ij / d inv_tau stays ``sim_ij`` (a stop-gradient
        penalty, not divided by the temperature). The softmax, the log-sum-exp and the
        target logit all use the penalized value. Which entries of row i get it
        (``hardness_mode``): HARDNESS_NONE (0) none; HARDNESS_IN_BATCH (1) every column
        j != t_i that is not one of row i's own hard negatives (constant columns
        included); HARDNESS_HARD (2) row i's own hard negatives, except t_i;
        HARDNESS_ALL (3) every column j != t_i. The target entry is never penalized.

    Masked entries (past ``n_cols``, a row's self column, another group's column, a
    -inf weight, an entry the false-negative margin drops) have logit -inf. Every
    other entry's logit is::

        logit_ij = sim_ij * inv_tau + [own hard] log_hard_weight
                   + [j >= gauss_start] log_gauss_weight + [penalized] s * sim_ij

    Three rules live outside the layout because they are per-row tensors, passed to the
    kernels as arguments:

    - ``targets``: a target of -1 matches no column; the row's target logit is then 0
      and its value is its log-sum-exp alone (the direction terms of the loss, which
      have no target of their own, use this).
    - ``thresholds`` (the false-negative margin; None: off): a tensor of one value per
      row, in the accumulator dtype. Entry (i, j) with j != t_i and ``sim_ij >
      thresholds[i]`` is masked (-inf). The decision takes no gradient; the target entry
      is never dropped.
    - ``guide`` (a :class:`GuideMask`; None: off): a second model's opinion of each pair.
      Its unit rows ``guide.rows`` (one per row of q) and ``guide.cols`` (one per
      gradient column: G = ``n_grad_cols``), and one threshold per row. Entry (i, j) with
      j != t_i and j < G is masked (-inf) when ``guide.rows_i . guide.cols_j >
      guide.thresholds[i]``. The guide product is formed tile by tile where the entry's
      logit is (never an N x M buffer); it takes no gradient; constant columns (extra
      and Gaussian negatives) and the target entry are never masked by it.

    A row whose every entry is masked has log-sum-exp -inf and gets no gradient at all:
    kernels must give its probabilities as 0 (never exp(-inf - -inf)).
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
    n_hard_blocks: int = 1
    hardness_mode: int = HARDNESS_NONE
    hardness_strength: float = 0.0

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

    @property
    def penalized(self) -> bool:
        """Whether any entry gets a hardness penalty."""
        return self.hardness_mode != HARDNESS_NONE and self.hardness_strength != 0.0

    def own_hard(self, rows, cols):
        """Boolean tensor: whether column ``cols[j]`` is one of row ``rows[i]``'s own hard
        negatives (``rows`` and ``cols`` int64 tensors; the result is len(rows) x len(cols))."""
        offset = cols[None, :] - self.hard_start - rows[:, None]
        return ((rows[:, None] < self.n_hard) & (offset >= 0) & (offset % max(self.n_hard, 1) == 0)
                & (offset < self.n_hard * self.n_hard_blocks))
