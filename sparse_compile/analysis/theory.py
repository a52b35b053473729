"""Output-norm variance of a sparse ReLU layer at initialisation (Appendices A-B of the SRigL paper).

The layer (Definition B.1) is ``z = sqrt(2/k) (W * I)(xi * u)``: ``W`` an ``n x n`` matrix of iid
N(0, 1) weights, ``I`` the 0/1 sparsity pattern, ``u`` the previous layer's pre-activation, uniform
on the unit sphere, and ``xi`` its ReLU gate. Since ``||u|| = 1`` the quantity of interest,
``||z^{l+1}||^2 / ||z^l||^2``, is ``||z||^2``. Three patterns ``I`` (``KINDS``):

* ``"bernoulli"``: every entry independently ``Ber(k/n)``;
* ``"constant_per_layer"``: exactly ``n k`` ones placed uniformly among the ``n^2`` entries;
* ``"constant_fan_in"``: exactly ``k`` ones per row, rows independent (SRigL's constraint).

Derivation (from Tables 6-8 of the seed). Conditionally on ``I, xi, u`` the ``z_i`` are
independent Gaussians, so ``||z||^2 = (2/k) sum_ij g_i^2 I_ij xi_j u_j^2`` with ``g_i`` iid N(0, 1),
and ``E||z||^4`` is a sum over ``(i, i', j, j')`` of
``E[g_i^2 g_i'^2] E[I_ij I_i'j'] E[xi_j xi_j'] E[u_j^2 u_j'^2]``, with ``E[u_j^4] = 3/(n(n+2))``
and ``E[u_j^2 u_j'^2] = 1/(n(n+2))``. Multiplying by ``4/k^2`` and summing the four cases:

==================  ============  =========================================
case                terms         contribution to ``E||z||^4 * n(n+2)``
==================  ============  =========================================
i=i', j=j'          n^2           ``18 n / k``
i!=i', j=j'         n^2 (n-1)     ``6 (n-1) * q_col``
i=i', j!=j'         n^2 (n-1)     ``3 (n-1) * q_row``
i!=i', j!=j'        n^2 (n-1)^2   ``(n-1)^2 * q_far``
==================  ============  =========================================

where ``q = E[I_ij I_i'j'] / (k/n)^2`` for the pair type: Bernoulli ``q = 1`` everywhere;
constant-per-layer ``q = C_{n,k} = (n - 1/k)/(n - 1/n)`` everywhere; constant fan-in
``q_row = (k-1) n / (k (n-1))`` (same row, sampling without replacement), ``q_col = q_far = 1``
(rows independent). With ``E||z||^2 = 1`` (each kind has ``E[I_ij] = k/n``), ``Var = E||z||^4 - 1``:

* Bernoulli: ``(5n - 8 + 18 n/k) / (n(n+2))``
* constant per layer: ``((n^2 + 7n - 8) C_{n,k} + 18 n/k - n^2 - 2n) / (n(n+2))``
* constant fan-in: ``(5n - 8 + 18 n/k) / (n(n+2)) - 3(n-k) / (k n (n+2))``

Inconsistencies in the seed (``shared/seed/000_4e2dc63325b33e9c.txt``), each settled by the
derivation above and by :func:`simulate_output_norm_variance` (see ``tests/test_theory.py``):

1. The ``18 n/k`` term. Eqs. (14) (Bernoulli) and (25) (constant fan-in) of Appendix B print
   ``18 n/k``; Eqs. (1), (2), (3) of Appendix A and Eq. (21) of Appendix B print ``18 k/n``. The
   ``i=i', j=j'`` row of every table gives ``n^2 * 3 * (k/n) * (1/2) * 3/(n(n+2)) * (2/k)^2
   = 18 n/(k n (n+2))``, i.e. ``18 n/k``; the simulation agrees and rejects ``18 k/n`` by many
   standard errors at small ``k`` (at ``n=16, k=1``: 1.25 derived against 0.25 printed).
   :func:`printed_output_norm_variance` returns the printed versions, for that comparison.
2. Definition B.1 sizes ``xi, I, u, W`` by ``N`` while every sum runs to ``n``; Prop. B.6 says
   "exactly ``n - k`` zeros in the matrix ``I``" where it means in each row. Both are typos that
   change nothing.
3. The ReLU gate is modelled as ``xi ~ Ber(1/2)`` independent of ``u``; in a network it is
   ``xi = [u > 0]``. For ``u`` uniform on the sphere the two are equal in distribution jointly with
   ``u_j^2`` (sign symmetry), so the simulation uses the real gate ``u > 0`` and still tests the
   formulas exactly.
4. Appendix A says constant fan-in "always" gives a smaller variance than the other two kinds. From
   the closed forms, ``Var_per_layer - Var_fan_in = (n-k)(2n-5) / (k n (n+1)(n+2))``: true for
   ``k < n`` and ``n >= 3``, equal at ``k = n``, and reversed at ``n = 2, k = 1``
   (4.333 per-layer against 4.375 fan-in). Likewise ``Var_bernoulli - Var_per_layer =
   (n-k)(n+8) / (k n (n+1)(n+2))``, about a third of the fan-in gap for large ``n``: the
   per-layer kind sits between the other two rather than coinciding with Bernoulli.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "KINDS",
    "output_norm_variance",
    "printed_output_norm_variance",
    "simulate_output_norm_variance",
    "Simulation",
    "variance_curves",
]

KINDS = ("bernoulli", "constant_per_layer", "constant_fan_in")


def _check(kind: str, n: int, k: int) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if isinstance(n, bool) or isinstance(k, bool) or int(n) != n or int(k) != k:
        raise ValueError(f"n and k must be integers, got n={n!r}, k={k!r}")
    if n < 2:
        raise ValueError(f"n must be >= 2 (the sphere moments need n >= 2), got n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"k must satisfy 1 <= k <= n={n}, got k={k}")


def _c(n: int, k: int) -> float:
    """``C_{n,k} = E[I_ij I_i'j'] / (k/n)^2`` for two distinct entries, constant-per-layer kind."""
    return (n - 1 / k) / (n - 1 / n)


def output_norm_variance(kind: str, n: int, k: int) -> float:
    """Closed-form ``Var(||z^{l+1}||^2 / ||z^l||^2)`` of an ``n``-wide sparse ReLU layer of mean fan-in ``k``.

    Derived in this module's docstring from Tables 6-8 of the seed; the ``18 n/k`` term is the one
    of Eqs. (14) and (25), not the ``18 k/n`` of Eqs. (1)-(3) and (21) (see the module docstring).
    """
    _check(kind, n, k)
    n, k = int(n), int(k)
    den = n * (n + 2)
    bern = (5 * n - 8 + 18 * n / k) / den
    if kind == "bernoulli":
        return bern
    if kind == "constant_per_layer":
        return ((n * n + 7 * n - 8) * _c(n, k) + 18 * n / k - n * n - 2 * n) / den
    return bern - 3 * (n - k) / (k * n * (n + 2))


def printed_output_norm_variance(kind: str, n: int, k: int, equation: str = "A") -> float:
    """The formula exactly as the seed prints it, to show where it disagrees with the simulation.

    ``equation="A"``: Eqs. (1), (2), (3) of Appendix A (all with ``18 k/n``). ``equation="B"``:
    Eqs. (14), (21), (25) of Appendix B (``18 n/k`` except (21), which has ``18 k/n``). Use
    :func:`output_norm_variance` for the correct values.
    """
    _check(kind, n, k)
    if equation not in ("A", "B"):
        raise ValueError(f"equation must be 'A' or 'B', got {equation!r}")
    n, k = int(n), int(k)
    den = n * (n + 2)
    t = 18 * k / n if equation == "A" else 18 * n / k
    if kind == "bernoulli":
        return (5 * n - 8 + t) / den
    if kind == "constant_per_layer":
        return ((n * n + 7 * n - 8) * _c(n, k) + 18 * k / n - n * n - 2 * n) / den
    return (5 * n - 8 + t) / den - 3 * (n - k) / (k * n * (n + 2))


@dataclass
class Simulation:
    """Monte Carlo estimate of the moments of ``||z||^2`` (see :func:`simulate_output_norm_variance`)."""

    kind: str
    n: int
    k: int
    trials: int
    variance: float
    variance_se: float  # standard error of ``variance``
    mean: float
    mean_se: float

    def to_dict(self) -> dict:
        """JSON-ready fields."""
        return dict(self.__dict__)


def _smallest(keys: np.ndarray, m: int) -> np.ndarray:
    """0/1 float32 marker of the ``m`` smallest keys along the last axis (a uniformly random
    ``m``-subset when the keys are iid uniform)."""
    if m == keys.shape[-1]:
        return np.ones(keys.shape, dtype=np.float32)
    # Thresholding at the m-th smallest value is 4x faster than argpartition; float64 keys tie with
    # probability ~1e-13 per row, and a tie is caught and redone exactly.
    out = keys <= np.partition(keys, m - 1, axis=-1)[..., m - 1 : m]
    if not bool((out.sum(axis=-1) == m).all()):
        out = np.zeros(keys.shape, dtype=bool)
        np.put_along_axis(out, np.argpartition(keys, m - 1, axis=-1)[..., :m], True, axis=-1)
    return out.astype(np.float32)


def _pattern(rng: np.random.Generator, kind: str, t: int, n: int, k: int) -> np.ndarray:
    """``t`` independent ``n x n`` 0/1 sparsity patterns of the given kind, float32 ``[t, n, n]``."""
    if kind == "bernoulli":
        return (rng.random((t, n, n)) < k / n).astype(np.float32)
    if kind == "constant_per_layer":  # a uniformly random nk-subset of the n^2 positions
        return _smallest(rng.random((t, n * n)), n * k).reshape(t, n, n)
    return _smallest(rng.random((t, n, n)), k)  # per row, a uniformly random k-subset of the inputs


def simulate_output_norm_variance(
    kind: str, n: int, k: int, trials: int = 20000, seed: int = 0, chunk_elems: int = 1 << 22
) -> Simulation:
    """Monte Carlo of the layer itself: draw ``u`` uniform on the sphere, its ReLU gate
    ``xi = [u > 0]``, the pattern ``I`` of ``kind``, Gaussian ``W``, compute
    ``z = sqrt(2/k) (W * I)(xi * u)`` and return mean and variance of ``||z||^2`` with their standard
    errors. Nothing of the closed form is used. Deterministic for a given ``seed``.

    The standard error of the sample variance is ``sqrt((m4 - s^4) / trials)`` (``m4`` the sample's
    fourth central moment), its large-sample form. Work is done in chunks of about ``chunk_elems``
    weights to bound memory.
    """
    _check(kind, n, k)
    if int(trials) != trials or trials < 100:
        raise ValueError(f"trials must be an integer >= 100, got {trials!r}")
    n, k, trials = int(n), int(k), int(trials)
    rng = np.random.default_rng(seed)
    norms = np.empty(trials, dtype=np.float64)
    per = max(1, int(chunk_elems) // (n * n))
    scale = math.sqrt(2.0 / k)
    for start in range(0, trials, per):
        t = min(per, trials - start)
        u = rng.standard_normal((t, n))
        u /= np.linalg.norm(u, axis=1, keepdims=True)  # normalised Gaussian: uniform on the sphere
        x = ((u > 0) * u).astype(np.float32)  # xi * u, the ReLU output
        w = rng.standard_normal((t, n, n), dtype=np.float32) * _pattern(rng, kind, t, n, k)
        z = scale * np.matmul(w, x[:, :, None])[:, :, 0]
        norms[start : start + t] = np.einsum("ti,ti->t", z, z, dtype=np.float64)
    mean = float(norms.mean())
    d = norms - mean
    var = float(np.mean(d * d)) * trials / (trials - 1)
    m4 = float(np.mean(d**4))
    return Simulation(
        kind=kind, n=n, k=k, trials=trials,
        variance=var, variance_se=math.sqrt(max(m4 - var * var, 0.0) / trials),
        mean=mean, mean_se=math.sqrt(var / trials),
    )


def variance_curves(n: int = 64, ks=None, trials: int = 4000, seed: int = 0, sim_ks=None) -> dict:
    """The numbers of the Fig. 1b-style plot: closed form per kind at every ``k`` of ``ks`` (default
    every ``k`` in ``1..n``) and simulated points (mean, standard error) at ``sim_ks`` (default a
    log-spaced subset). JSON-ready; :mod:`sparse_compile.commands.theory` plots it.
    """
    if ks is None:
        ks = list(range(1, n + 1))
    if sim_ks is None:
        sim_ks = sorted({int(round(v)) for v in np.geomspace(1, n, 9)})
    out = {"n": n, "trials": trials, "seed": seed, "closed_form": {}, "simulated": {}}
    for kind in KINDS:
        out["closed_form"][kind] = [
            {"k": int(k), "k_over_n": k / n, "variance": output_norm_variance(kind, n, int(k))} for k in ks
        ]
        pts = []
        for i, k in enumerate(sim_ks):
            s = simulate_output_norm_variance(kind, n, int(k), trials=trials, seed=seed + 1000 * i + KINDS.index(kind))
            pts.append({"k": int(k), "k_over_n": k / n, "variance": s.variance, "se": s.variance_se,
                        "mean": s.mean, "mean_se": s.mean_se})
        out["simulated"][kind] = pts
    return out
