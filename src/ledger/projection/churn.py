"""Churn risk: the BG/NBD model (Fader, Hardie & Lee 2005) fitted by maximum likelihood.

For a customer with ``x`` repeat purchases, the last at ``t_x``, observed for
``T`` time units since the first purchase (``projections/churn.sql`` builds
these from purchase *days*, in weeks), the model's likelihood is

    L(r, alpha, a, b | x, t_x, T) = B(a, b+x)/B(a, b) * G(r+x) alpha^r / (G(r) (alpha+T)^(r+x))
        + [x > 0] B(a+1, b+x-1)/B(a, b) * G(r+x) alpha^r / (G(r) (alpha+t_x)^(r+x))

(paper, eq. 6). The four parameters are found by minimising the negative
log-likelihood over log-parameters with scipy (Nelder-Mead then L-BFGS-B);
customers with the same (x, t_x, T) are grouped and weighted, which is exact.

Per customer we report

* ``p_alive`` = P(still active | x, t_x, T)
  = 1 / (1 + [x>0] a/(b+x-1) ((alpha+T)/(alpha+t_x))^(r+x))
* ``expected_purchases_90d`` = E[Y(t) | x, t_x, T] for t = 90 days (paper, eq. 10, with
  the Gaussian hypergeometric function from scipy);
* ``risk_band``: ``low`` when p_alive >= 0.7, ``medium`` when >= 0.3, else ``high``.

Fallback (customers with no purchase, or every customer when the model cannot
be fitted — fewer than :data:`MIN_CUSTOMERS` purchasers, or the optimiser
fails): an engagement rule on days since the customer's last own action
(:func:`engagement_band`): up to 30 days ``low``, up to 90 ``medium``, beyond
that or never ``high``. ``p_alive`` stays NULL for them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

TIME_UNIT = "week"
DAYS_PER_UNIT = 7.0
HORIZON_DAYS = 90
MIN_CUSTOMERS = 20
LOW_RISK_P_ALIVE = 0.7
MEDIUM_RISK_P_ALIVE = 0.3
ENGAGEMENT_LOW_DAYS = 30
ENGAGEMENT_MEDIUM_DAYS = 90
#: An optimiser that stops without declaring success still gives a converged fit when no
#: direction within the bounds lowers the mean negative log-likelihood by more than this
#: per unit of log-parameter. On small data sets a and b grow together along a flat ridge
#: towards their bound (every customer the same dropout probability); whether Nelder-Mead
#: met its tolerances there depended on the machine's floating-point rounding (24
#: purchasers: converged on one machine, "maximum number of iterations" on an AMD EPYC,
#: with the same parameters to six digits).
STATIONARY_GRADIENT = 1e-4

Array = NDArray[np.float64]


@dataclass(frozen=True)
class BgNbdFit:
    r: float
    alpha: float
    a: float
    b: float
    log_likelihood: float
    customers: int
    converged: bool
    message: str


def log_likelihood(
    params: Array, x: Array, t_x: Array, big_t: Array, weights: Array | None = None
) -> float:
    """Total log-likelihood of (r, alpha, a, b) over the customers (weighted when grouped)."""
    from scipy import special  # scipy loads in ~0.3 s: only when a model is fitted

    r, alpha, a, b = params
    a1 = special.gammaln(r + x) - special.gammaln(r) + r * np.log(alpha)
    a2 = (
        special.gammaln(a + b)
        + special.gammaln(b + x)
        - special.gammaln(b)
        - special.gammaln(a + b + x)
    )
    a3 = -(r + x) * np.log(alpha + big_t)
    repeat = x > 0
    # For x = 0 the second term is absent; keep the log finite and mask it out.
    a4 = np.where(
        repeat,
        np.log(a) - np.log(np.where(repeat, b + x - 1, 1.0)) - (r + x) * np.log(alpha + t_x),
        -np.inf,
    )
    ll = a1 + a2 + np.logaddexp(a3, a4)
    if weights is not None:
        return float(np.sum(ll * weights))
    return float(np.sum(ll))


def preload() -> None:
    """Import the parts of scipy that fitting and scoring use, ahead of the first fit."""
    from scipy import optimize, special  # noqa: F401


def fit(x: Array, t_x: Array, big_t: Array) -> BgNbdFit:
    """Maximum-likelihood (r, alpha, a, b) for the given customers."""
    from scipy import optimize  # scipy loads in ~0.3 s: only when a model is fitted

    x = np.asarray(x, dtype=np.float64)
    t_x = np.asarray(t_x, dtype=np.float64)
    big_t = np.asarray(big_t, dtype=np.float64)
    keys, counts = np.unique(np.stack([x, t_x, big_t], axis=1), axis=0, return_counts=True)
    gx, gt, gT = keys[:, 0], keys[:, 1], keys[:, 2]
    w = counts.astype(np.float64)
    n = float(w.sum())

    def objective(log_params: Array) -> float:
        value = -log_likelihood(np.exp(log_params), gx, gt, gT, w) / n
        return value if np.isfinite(value) else 1e300

    start = np.zeros(4)
    # Bounded in log space (about 6e-6 .. 1.6e5): degenerate data cannot run off to
    # infinities that make the predictions meaningless.
    bounds = [(-12.0, 12.0)] * 4
    first = optimize.minimize(
        objective,
        start,
        method="Nelder-Mead",
        bounds=bounds,
        options={"maxiter": 4000, "xatol": 1e-8, "fatol": 1e-12},
    )
    best = optimize.minimize(objective, first.x, method="L-BFGS-B", bounds=bounds)
    chosen = best if best.fun <= first.fun else first
    converged = bool(first.success or best.success)
    message = str(chosen.message)
    if not converged:
        slope = projected_gradient(objective, chosen.x, bounds)
        converged = slope <= STATIONARY_GRADIENT
        message = (
            f"{message.rstrip('.')}; "
            f"{'accepted' if converged else 'not accepted'}: steepest slope within the bounds "
            f"{slope:.1e} (at most {STATIONARY_GRADIENT:.0e})"
        )
    r, alpha, a, b = (float(v) for v in np.exp(chosen.x))
    return BgNbdFit(
        r=r,
        alpha=alpha,
        a=a,
        b=b,
        log_likelihood=float(-chosen.fun * n),
        customers=int(n),
        converged=converged,
        message=message,
    )


def projected_gradient(
    objective: Callable[[Array], float],
    point: Array,
    bounds: list[tuple[float, float]],
    step: float = 1e-5,
) -> float:
    """The largest slope of ``objective`` at ``point`` along a direction the bounds allow
    (central differences; a coordinate at a bound that the objective pushes against counts
    as flat, as in the optimality conditions of a bounded minimum)."""
    steepest = 0.0
    for i, (low, high) in enumerate(bounds):
        e = np.zeros_like(point)
        e[i] = step
        slope = (objective(point + e) - objective(point - e)) / (2 * step)
        if (point[i] >= high - step and slope < 0) or (point[i] <= low + step and slope > 0):
            continue
        steepest = max(steepest, abs(slope))
    return steepest


def p_alive(model: BgNbdFit, x: Array, t_x: Array, big_t: Array) -> Array:
    r, alpha, a, b = model.r, model.alpha, model.a, model.b
    x = np.asarray(x, dtype=np.float64)
    repeat = x > 0
    log_ratio = (r + x) * (np.log(alpha + big_t) - np.log(alpha + t_x))
    odds = np.where(
        repeat, np.exp(np.log(a) - np.log(np.where(repeat, b + x - 1, 1.0)) + log_ratio), 0.0
    )
    return np.asarray(1.0 / (1.0 + odds), dtype=np.float64)


def expected_purchases(
    model: BgNbdFit, horizon: float, x: Array, t_x: Array, big_t: Array
) -> Array:
    """E[Y(horizon) | x, t_x, T]: expected purchases in the next ``horizon`` time units."""
    from scipy import special  # scipy loads in ~0.3 s: only when a model is fitted

    r, alpha, a, b = model.r, model.alpha, model.a, model.b
    x = np.asarray(x, dtype=np.float64)
    z = horizon / (alpha + big_t + horizon)
    hyp = special.hyp2f1(r + x, b + x, a + b + x - 1, z)
    first = (a + b + x - 1) / (a - 1)
    second = 1 - ((alpha + big_t) / (alpha + big_t + horizon)) ** (r + x) * hyp
    return np.asarray(first * second * p_alive(model, x, t_x, big_t), dtype=np.float64)


def risk_band(p: float) -> str:
    if p >= LOW_RISK_P_ALIVE:
        return "low"
    if p >= MEDIUM_RISK_P_ALIVE:
        return "medium"
    return "high"


def engagement_band(days_inactive: float | None) -> str:
    """The fallback rule for customers the model does not score."""
    if days_inactive is None:
        return "high"
    if days_inactive <= ENGAGEMENT_LOW_DAYS:
        return "low"
    if days_inactive <= ENGAGEMENT_MEDIUM_DAYS:
        return "medium"
    return "high"
