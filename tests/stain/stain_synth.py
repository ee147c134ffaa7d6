"""Images synthesised from known stain vectors (Beer-Lambert), for the stain tests.

A plain module (not ``conftest``) so that tests can import it: ``from stain_synth import ...``.
"""

from __future__ import annotations

import numpy as np

#: Ruifrok & Johnston's H and E (unit rows) and the torchstain / Macenko reference pair
RUIFROK = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])
MACENKO_REF = np.array([[0.5626, 0.7201, 0.4062], [0.2159, 0.8012, 0.5581]])


def unit(m):
    m = np.asarray(m, np.float64)
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def render(conc: np.ndarray, matrix, i0=240.0, noise: float = 1.0, seed: int = 0):
    """uint8 RGB of concentrations ``conc`` [..., 2] under ``matrix`` [2, 3] (+ noise)."""
    od = conc @ unit(matrix)
    rgb = float(i0) * np.exp(-od)
    rgb += np.random.default_rng(seed).normal(0.0, noise, rgb.shape)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def he_concentrations(h: int, w: int, seed: int = 0) -> np.ndarray:
    """[h, w, 2] H and E concentrations: 20 % nuclei (H), 25 % stroma (E), 45 % mixed,
    10 % background (0), in random order."""
    rng = np.random.default_rng(seed)
    n = h * w
    kind = rng.choice(4, n, p=[0.2, 0.25, 0.45, 0.1])
    c = np.zeros((n, 2))
    c[kind == 0, 0] = rng.uniform(0.4, 2.0, (kind == 0).sum())
    c[kind == 1, 1] = rng.uniform(0.3, 1.5, (kind == 1).sum())
    m = kind == 2
    c[m, 0] = rng.uniform(0.1, 1.2, m.sum())
    c[m, 1] = rng.uniform(0.1, 1.0, m.sum())
    return c.reshape(h, w, 2)
