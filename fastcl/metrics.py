"""Metrics of sentence embeddings: correlations, alignment, uniformity, singular spectrum.

- :func:`spearman`, :func:`pearson`: the STS correlations (ties get their average rank,
  as ``scipy.stats.spearmanr`` does).
- :func:`alignment`, :func:`uniformity`: Wang and Isola (2020), "Understanding
  contrastive representation learning through alignment and uniformity on the
  hypersphere", on L2-normalized embeddings::

      align   = E_{(x, y) positive} ||f(x) - f(y)||^alpha          (alpha = 2)
      uniform = log E_{x, y independent} exp(-t ||f(x) - f(y)||^2)  (t = 2)

  Lower is better for both. SimCSE (section 5) takes STS-B pairs scored above 4 as the
  positives and all STS-B sentences for uniformity.
- :func:`singular_spectrum`: singular values of the embedding matrix, largest first and
  divided by the largest (SimCSE section 5: contrastive learning flattens the spectrum of
  anisotropic embeddings), with summary numbers, and :func:`plot_spectra` (matplotlib).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


# ------------------------------------------------------------------ correlations


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n; tied values share the average of the ranks they span."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    # Boundaries of runs of equal values in sorted order.
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + 1 + e) / 2.0  # average of ranks s+1 .. e
    return ranks


def _as_vector(name: str, x) -> np.ndarray:
    v = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64).reshape(-1)
    if not np.isfinite(v).all():
        raise ValueError(f"{name} contains NaN or inf")
    return v


def pearson(x, y) -> float:
    """Pearson correlation of two equal-length sequences (NaN if either is constant)."""
    x, y = _as_vector("x", x), _as_vector("y", y)
    if x.shape != y.shape or x.size < 2:
        raise ValueError(f"need two sequences of the same length >= 2, got {x.size} and {y.size}")
    xc, yc = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((xc * xc).sum()) * float((yc * yc).sum()))
    return float((xc * yc).sum()) / denom if denom > 0 else float("nan")


def spearman(x, y) -> float:
    """Spearman rank correlation: Pearson correlation of the (average-tie) ranks."""
    x, y = _as_vector("x", x), _as_vector("y", y)
    if x.shape != y.shape or x.size < 2:
        raise ValueError(f"need two sequences of the same length >= 2, got {x.size} and {y.size}")
    return pearson(_ranks(x), _ranks(y))


# ------------------------------------------------------------ alignment, uniformity


def alignment(x: torch.Tensor, y: torch.Tensor, alpha: float = 2.0, normalize: bool = True) -> float:
    """Mean ``||x_i - y_i||^alpha`` over positive pairs (rows i of x and y)."""
    if x.shape != y.shape or x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"alignment needs two non-empty N x D matrices of one shape, got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    x, y = x.double(), y.double()
    if normalize:
        x, y = F.normalize(x, dim=1), F.normalize(y, dim=1)
    return float((x - y).norm(dim=1).pow(alpha).mean())


def uniformity(x: torch.Tensor, t: float = 2.0, normalize: bool = True) -> float:
    """``log`` of the mean of ``exp(-t ||x_i - x_j||^2)`` over all pairs i < j."""
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"uniformity needs an N x D matrix with N >= 2, got {tuple(x.shape)}")
    x = x.double()
    if normalize:
        x = F.normalize(x, dim=1)
    sq = torch.pdist(x, p=2).pow(2)
    # log-mean-exp, stable: log(mean(exp(v))) = logsumexp(v) - log(n)
    return float(torch.logsumexp(-t * sq, dim=0) - math.log(sq.numel()))


# ------------------------------------------------------------------ spectrum


def singular_spectrum(x: torch.Tensor, normalize_rows: bool = True, center: bool = False) -> dict:
    """Singular values of the embedding matrix (rows = sentences), largest first.

    Returns a dict with ``singular_values`` (raw), ``normalized`` (divided by the
    largest), ``top1_energy`` (share of the squared spectrum in the first value: close to
    1 for a strongly anisotropic, cone-shaped embedding set), ``effective_rank`` (exp of
    the entropy of the normalized singular values, Roy and Vetterli 2007) and
    ``count_above_0.1`` (values at least a tenth of the largest).
    """
    if x.dim() != 2 or min(x.shape) == 0:
        raise ValueError(f"singular_spectrum needs a non-empty N x D matrix, got {tuple(x.shape)}")
    x = x.double()
    if normalize_rows:
        x = F.normalize(x, dim=1)
    if center:
        x = x - x.mean(dim=0, keepdim=True)
    s = torch.linalg.svdvals(x)
    p = s / s.sum()
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
    energy = s.pow(2)
    return {
        "singular_values": s.tolist(),
        "normalized": (s / s[0]).tolist(),
        "top1_energy": float(energy[0] / energy.sum()),
        "effective_rank": math.exp(entropy),
        "count_above_0.1": int((s / s[0] >= 0.1).sum()),
    }


def plot_spectra(spectra: dict[str, list[float]], path: str | Path, title: str = "Singular spectrum") -> Path:
    """Plot normalized singular values (one line per label) to a PNG; needs matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the spectrum plot needs matplotlib: pip install matplotlib "
                          "(or pass no plot path to skip it)") from e
    path = Path(path)
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for label, values in spectra.items():
        ax.plot(np.arange(1, len(values) + 1), values, label=label)
    ax.set_yscale("log")
    # A few (near-)zero trailing values (a dimension the model never uses) would stretch the
    # axis over 15 decades and flatten everything that matters: clip the view at 1e-3.
    if min(min(v) for v in spectra.values()) < 1e-3:
        ax.set_ylim(bottom=1e-3)
        ax.text(0.02, 0.03, "values below 1e-3 clipped", transform=ax.transAxes, fontsize=7)
    ax.set_xlabel("index")
    ax.set_ylabel("singular value / largest")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
