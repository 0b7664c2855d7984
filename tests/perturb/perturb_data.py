"""Data and float32 error bounds shared by the perturbation tests.

Every tolerance in tests/perturb comes from one of the bounds below (or from an
argument written beside it). ``U = 2**-24`` is float32's unit roundoff: a correctly
rounded operation errs by at most ``U`` relative; a float32 sum or dot product of ``n``
terms errs by at most ``gamma(n) = n U / (1 - n U)`` times the sum of the terms'
absolute values (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., 3.1).
"""

import jax.numpy as jnp
import numpy as np

U = 2.0**-24


def gamma(n: int) -> float:
    return n * U / (1 - n * U)


def assert_within(actual, desired, bound) -> None:
    """``|actual - desired| <= bound`` elementwise, in float64."""
    actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
    excess = np.abs(actual - desired) - np.asarray(bound, np.float64)
    assert np.all(excess <= 0), f"bound exceeded by {excess.max():.3g} at {excess.argmax()}"


def noise_norm_rtol(n: int, value_norm: float, noise_norm: float) -> float:
    """Relative error of ``||fl(v + delta) - v||`` against the intended ``||delta||``.

    ``delta = size * (||v|| *) u / ||u||`` over ``n`` float32 elements: each norm errs by
    at most ``gamma(n + 2)`` (a sum of ``n`` squares and a square root), the division and
    the products add a rounding each: ``(2 gamma(n + 2) + 4U)`` relative to ``||delta||``.
    Adding ``delta`` to ``v`` rounds each element by at most ``U |v + delta|``, i.e.
    ``U (||v|| + ||delta||)`` in norm, relative to ``||delta||``.
    """
    return 2 * gamma(n + 2) + 4 * U + U * (value_norm + noise_norm) / noise_norm


def dense_chain(params, x, activations):
    """The forward pass of a chain of dense operators in float64, with a running bound
    on the float32 error of each output ``[(z_i, bound_i), ...]``.

    Layer ``a = z @ W + b`` errs by ``gamma(k + 1) (|z| @ |W| + |b|)`` (``k`` inputs),
    plus the error carried in ``z``, times ``|W|``; ``tanh`` and ``relu`` are 1-Lipschitz
    and ``tanh`` itself is accurate to 4 ulps (``8U |tanh a|``).
    """
    z, err, out = np.asarray(x, np.float64), np.zeros(np.shape(x)), []
    for block, act in zip(params, activations, strict=True):
        w = np.asarray(block["w"], np.float64)
        b = np.asarray(block.get("b", np.zeros(w.shape[1])), np.float64)
        a = z @ w + b
        err = gamma(w.shape[0] + 1) * (np.abs(z) @ np.abs(w) + np.abs(b)) + err @ np.abs(w)
        if act == "tanh":
            z = np.tanh(a)
            err = err + 8 * U * np.abs(z)
        elif act == "relu":
            z = np.maximum(a, 0.0)
        else:
            z = a
        out.append((z, err))
    return out


def power_deficit_bound(jacobian: np.ndarray, iters: int, tan2: float = 2e7) -> float:
    """Relative shortfall of ``iters`` power iterations on ``J^T J`` below ``sigma_1``.

    With ``x_i = sigma_i / sigma_1`` and a start at angle ``theta`` to the top singular
    space, the estimate ``||J v_k||`` satisfies ``1 - est / sigma_1 <= sum_i w_i (1 -
    x_i**2)`` with weights ``w_i <= tan(theta)**2 x_i**(4 k)`` (i outside the top space)
    summing to at most 1. Values within ``delta = 64 n U`` of the top (a repeated top
    value, as float32 computes it) add at most ``2 delta``; the others at most
    ``tan(theta)**2 max_i x_i**(4 k) (1 - x_i**2)``. For a Gaussian start in ``R^n``,
    ``tan(theta)**2 > t`` has probability about ``sqrt(2 n / (pi t))``: 2e-3 for n = 32
    and the default ``t = 2e7``. The same ``delta`` covers the float32 rounding of the
    iteration itself.
    """
    sigma = np.linalg.svd(np.asarray(jacobian, np.float64), compute_uv=False)
    x = sigma / sigma[0]
    delta = 64 * jacobian.shape[1] * U
    below = x[x < 1 - delta]
    tail = float(np.max(below ** (4 * iters) * (1 - below**2))) if below.size else 0.0
    return tan2 * tail + 3 * delta


def lipschitz_slack(batch: int, entries: int, svds: int, svd_size: int) -> float:
    """Relative float32 slack of a measured block error against ``M_j prod L_i ||xi||``.

    The measured error ``||g_hat_j - g_j||`` carries the rounding of both gradients: the
    noise (its norm over ``entries`` values: ``gamma(entries + 2)``), the backward sums
    over the ``batch`` (``gamma(batch + 8)`` each, relative to terms of the size of the
    perturbation's own effect here, since the clean parts cancel exactly in exact
    arithmetic and are computed by the same operations), and the norms of the error
    (``gamma(entries + 2)``). The bound's Jacobian norms come from float32 SVDs
    (``4 svd_size U`` each, ``svds`` of them).
    """
    return 2 * gamma(entries + 2) + 2 * gamma(batch + 8) + svds * 4 * svd_size * U


def logistic_loss_bound(params, x, acts, reg_value: float = 0.0) -> float:
    """Float32 error bound of ``mean BCE(z, y) + R`` for a chain ending in one logit.

    The logits' error (``dense_chain``; the loss is 1-Lipschitz in each logit and
    averaged), the evaluation of each term ``max(z, 0) - z y + log1p(exp(-|z|))`` (6
    roundings of quantities <= ``2|z| + log 2``), the mean of ``n`` terms (``gamma(n)``
    of their sum), and the regulariser: a float32 sum of ``P`` nonnegative terms of up
    to 4 roundings each, ``gamma(P + 4) R``.
    """
    import jax

    z, err = dense_chain(params, x, acts)[-1]
    n, p = z.shape[0], sum(np.size(leaf) for leaf in jax.tree.leaves(params))
    terms = 2 * np.abs(z) + np.log(2.0)
    data = err.mean() + 6 * U * terms.mean() + gamma(n) * terms.mean()
    return float(data + gamma(p + 4) * reg_value)


def tanh_logistic_abs_gradient(trace, x, hidden: int) -> np.ndarray:
    """Bound on ``A = || |B|(|c|) ||`` at every step of a ``run_sgd`` trace of
    ``dense(hidden, tanh)`` then a logistic head: the norm of the sum over the examples
    of each example's absolute gradient terms (rounding errors of the backward sums are
    at most ``gamma(m) A``).

    Each example's absolute gradient has ``||v_i||^2 <= ||h_i||^2 + 1 + (||x_i||^2 + 1)
    ||w_2||^2 <= hidden + 1 + (max ||x||^2 + 1) param_norm^2`` (|tanh| <= 1), weighted by
    ``|c_i| = |sigmoid(z_i) - y_i| / n``, and ``mean |sigmoid - y| <= 1 - exp(-loss)``
    (``|sigmoid - y| = 1 - exp(-l_i)``, concave in ``l_i``; a regulariser only makes
    the recorded loss larger).
    """
    x2 = float(np.max(np.sum(np.asarray(x, np.float64) ** 2, axis=1)))
    param_norm = np.asarray(trace.param_norm, np.float64)
    loss = np.asarray(trace.loss, np.float64)
    return np.sqrt(hidden + 1 + (x2 + 1) * param_norm**2) * (1 - np.exp(-loss))


def logistic_data(n=64, seed=0):
    """A noisy linear rule in 3-D (not separable: logistic regression has an optimum)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3)).astype(np.float32)
    y = x @ np.array([1.5, -1.0, 0.5]) + 0.5 * rng.standard_normal(n) > 0
    return jnp.asarray(x), jnp.asarray(y.astype(np.int32))
