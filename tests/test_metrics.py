"""Correlations, alignment, uniformity and the singular spectrum against values worked
out by hand and against scipy."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from fastcl.metrics import alignment, pearson, plot_spectra, singular_spectrum, spearman, uniformity


def test_correlations_match_scipy_with_ties():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, 200).astype(float)  # many ties
    y = x + rng.normal(0, 2, 200)
    y[:20] = y[20:40]  # ties in y too
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).correlation, abs=1e-12)
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)


def test_spearman_is_rank_based():
    x = np.arange(10.0)
    assert spearman(x, np.exp(x)) == pytest.approx(1.0)
    assert spearman(x, -x ** 3) == pytest.approx(-1.0)
    assert pearson(x, np.exp(x)) < 0.9


def test_correlation_errors():
    with pytest.raises(ValueError, match="same length"):
        spearman([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="NaN"):
        pearson([1, float("nan")], [1, 2])


def test_alignment_known_values():
    u = torch.randn(5, 8)
    assert alignment(u, u) == pytest.approx(0.0, abs=1e-12)
    assert alignment(u, -u) == pytest.approx(4.0)  # ||2 u_hat||^2
    assert alignment(u, -3 * u, alpha=1) == pytest.approx(2.0)  # scale-free: rows are normalized
    with pytest.raises(ValueError):
        alignment(u, u[:3])


def test_uniformity_known_values():
    e = torch.eye(4)  # orthonormal: every pair at squared distance 2
    assert uniformity(e) == pytest.approx(-4.0)
    antipodal = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert uniformity(antipodal) == pytest.approx(-8.0)
    same = torch.ones(6, 3)
    assert uniformity(same) == pytest.approx(0.0, abs=1e-12)
    # Brute force over all pairs i < j.
    x = torch.nn.functional.normalize(torch.randn(30, 5, dtype=torch.float64), dim=1)
    pairs = [math.exp(-2 * float((x[i] - x[j]).pow(2).sum())) for i in range(30) for j in range(i + 1, 30)]
    assert uniformity(x) == pytest.approx(math.log(sum(pairs) / len(pairs)), abs=1e-12)


def test_spectrum_rank_one_and_isotropic():
    v = torch.randn(1, 16)
    cone = v.repeat(50, 1) * torch.rand(50, 1)  # every row the same direction
    s = singular_spectrum(cone)
    assert s["top1_energy"] == pytest.approx(1.0)
    assert s["count_above_0.1"] == 1
    iso = singular_spectrum(torch.eye(16))
    assert iso["normalized"] == pytest.approx([1.0] * 16)
    assert iso["effective_rank"] == pytest.approx(16.0)
    assert iso["top1_energy"] == pytest.approx(1 / 16)


def test_plot_writes_png(tmp_path):
    path = plot_spectra({"a": [1.0, 0.5, 0.1], "b": [1.0, 0.9, 0.8]}, tmp_path / "s.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
