"""The Fréchet distance behind the FID-proxy, against values computed by hand,
on the singular and non-finite statistics that made ``scipy.linalg.sqrtm`` raise."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.maths import fid_proxy, frechet_distance, frechet_distance_checked


def test_one_dimension_by_hand():
    # ||0 - 3||^2 + 4 + 1 - 2 sqrt(4 * 1) = 9 + 5 - 4 = 10
    d = frechet_distance(np.zeros(1), np.array([[4.0]]), np.full(1, 3.0), np.eye(1))
    assert d == pytest.approx(10.0)


def test_singular_covariances_by_hand():
    # S1 = [[1, 1], [1, 1]] (rank 1), S2 = [[1, 0], [0, 0]] (rank 1): S1 S2 =
    # [[1, 0], [1, 0]] has eigenvalues 1 and 0, so Tr (S1 S2)^{1/2} = 1; equal
    # means: Tr S1 + Tr S2 - 2 = 2 + 1 - 2 = 1
    s1, s2 = np.array([[1.0, 1.0], [1.0, 1.0]]), np.array([[1.0, 0.0], [0.0, 0.0]])
    d, why = frechet_distance_checked(np.zeros(2), s1, np.zeros(2), s2)
    assert d == pytest.approx(1.0) and why is None
    # S1 = diag(4, 0), S2 = diag(1, 9): Tr (S1 S2)^{1/2} = sqrt(4) = 2; means
    # (0, 0) and (1, 1): 2 + (4 + 0 + 1 + 9) - 4 = 12
    d = frechet_distance(
        np.zeros(2), np.diag([4.0, 0.0]), np.ones(2), np.diag([1.0, 9.0])
    )
    assert d == pytest.approx(12.0)
    # all samples equal (a saturated generator): zero covariance, distance = the
    # means' squared distance plus the real set's trace: 4 * 2^2 + 0 = 16
    real = torch.zeros(5, 4)
    assert fid_proxy(real, torch.full((5, 4), 2.0)) == pytest.approx(16.0)


def test_agrees_with_sqrtm_on_full_rank_statistics():
    from scipy import linalg

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 6)), rng.normal(size=(60, 6)) * 2 + 1
    m1, s1 = x.mean(0), np.cov(x, rowvar=False)
    m2, s2 = y.mean(0), np.cov(y, rowvar=False)
    ref = (m1 - m2) @ (m1 - m2) + np.trace(s1 + s2)
    ref -= 2 * np.trace(np.real(linalg.sqrtm(s1 @ s2)))
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(ref, rel=1e-9)


def test_non_finite_features_give_nan_with_a_reason_not_an_exception():
    from scipy import linalg

    nan_cov = np.full((3, 3), np.nan)
    with pytest.raises((np.linalg.LinAlgError, ValueError)):  # what it used to call
        linalg.sqrtm(nan_cov @ np.eye(3))
    d, why = frechet_distance_checked(np.zeros(3), nan_cov, np.zeros(3), np.eye(3))
    assert math.isnan(d) and "NaN or Inf" in str(why)
    fake = torch.randn(6, 3)
    fake[2, 1] = float("inf")  # a NaN/Inf image from an exploded adapter
    assert math.isnan(fid_proxy(torch.randn(6, 3), fake))
    # a set against itself is 0, not a rounding error below it
    f = torch.randn(3, 8)  # 3 samples in 8 dims: a singular covariance
    assert fid_proxy(f, f) == pytest.approx(0.0, abs=1e-9) and fid_proxy(f, f) >= 0
