"""Lloyd-Max codebooks for one coordinate of a random unit vector (TurboQuant's scalar quantizer).

After a random rotation, each coordinate t of a unit vector in R^d follows the density
f_d(t) ∝ (1 - t²)^((d - 3) / 2) on [-1, 1] (close to N(0, 1/d) for large d), whatever the input was. The
codebook that minimises the expected squared error of one coordinate under f_d is found by Lloyd's iteration
(boundaries halfway between centroids, centroids at the conditional means), computed once per (d, bits) in
float64 on a fine grid with exact cumulative integrals of the piecewise-linear density.
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["coordinate_codebook"]

_GRID = 40001


def _density(dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Grid and normalised density of one coordinate of a uniform unit vector in R^dim."""
    half_width = min(1.0, 14.0 / np.sqrt(dim))  # beyond 14 standard deviations the mass is below 1e-40
    t = np.linspace(-half_width, half_width, _GRID)
    inside = np.clip(1.0 - t * t, 1e-300, None)
    log_f = 0.5 * (dim - 3) * np.log(inside)
    f = np.exp(log_f - log_f.max())
    if dim <= 3:
        f[[0, -1]] = 0.0  # integrable singularities at ±1: the grid's endpoints carry no mass
    f /= np.trapezoid(f, t)
    return t, f


@functools.cache
def coordinate_codebook(dim: int, bits: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(centroids, boundaries) of the 2**bits-level Lloyd-Max quantizer for a coordinate of a random unit vector
    in R^dim: ascending centroids, and the 2**bits - 1 boundaries between them."""
    if dim < 2:
        raise ValueError(f"a codebook needs dim >= 2, got {dim}")
    if not 1 <= bits <= 8:
        raise ValueError(f"codebook bits must be in 1..8, got {bits}")
    t, f = _density(dim)
    # Cumulative mass and first moment, so interval integrals need only interpolation at the boundaries.
    step = np.diff(t)
    mass = np.concatenate([[0.0], np.cumsum(0.5 * (f[1:] + f[:-1]) * step)])
    tf = t * f
    moment = np.concatenate([[0.0], np.cumsum(0.5 * (tf[1:] + tf[:-1]) * step)])
    levels = 2**bits
    # Start from the quantiles' midpoints: already close for a bell-shaped density.
    centroids = np.interp((np.arange(levels) + 0.5) / levels, mass / mass[-1], t)
    for _ in range(2000):
        boundaries = 0.5 * (centroids[1:] + centroids[:-1])
        edges = np.concatenate([[t[0]], boundaries, [t[-1]]])
        m = np.interp(edges, t, mass)
        mo = np.interp(edges, t, moment)
        cell_mass = np.diff(m)
        updated = np.where(cell_mass > 0, np.diff(mo) / np.maximum(cell_mass, 1e-300), centroids)
        # Symmetric density: keep the codebook exactly symmetric against rounding drift.
        updated = 0.5 * (updated - updated[::-1])
        if np.max(np.abs(updated - centroids)) < 1e-13:
            centroids = updated
            break
        centroids = updated
    boundaries = 0.5 * (centroids[1:] + centroids[:-1])
    return tuple(float(c) for c in centroids), tuple(float(b) for b in boundaries)
