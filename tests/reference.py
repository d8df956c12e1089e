"""Dense float64 reference of every merge, written from the formulas (numpy), independent of the package.

KnOTS here is the reference algorithm itself: a dense SVD of the concatenated updates M = [ΔW_1 | … | ΔW_n].
"""

import numpy as np


def trim(x, top_k):
    d = x.size
    k = d - int(d * top_k)
    if k <= 0:
        return x.copy()
    threshold = np.sort(np.abs(x))[k - 1]
    return np.where(np.abs(x) >= threshold, x, 0.0)


def ties_merge(Y):
    """Elect + disjoint mean of already trimmed rows Y (n × d)."""
    gamma = np.sign(Y.sum(0))
    gamma[gamma == 0] = np.sign(gamma.sum())
    agree = (np.sign(Y) == gamma) & (Y != 0)
    return np.where(agree, Y, 0).sum(0) / np.maximum(agree.sum(0), 1)


def merge_rows(method, X, w, alpha=1.0, top_k=0.2, masks=None, density=1.0):
    """X: n × d float64 rows; masks (optional, n × d of 0/1) is DARE's keep mask."""
    if masks is not None:
        X = X * masks / density
    Y = w[:, None] * X
    if method in ("ta", "dare-ta"):
        return alpha * Y.sum(0)
    if method == "magnitude":
        return alpha * np.stack([trim(y, top_k) for y in Y]).sum(0)
    if method in ("ties", "dare-ties"):
        return alpha * ties_merge(np.stack([trim(y, top_k) for y in Y]))
    raise ValueError(method)


def _range(M):
    U, s, _ = np.linalg.svd(M, full_matrices=False)
    return U[:, s > 1e-9 * s[0]]


def space_tensors(space, factors):
    """Per-task tensors X_i and a function X -> ΔW, for one module. factors: per task (B_i, A_i, s_i), or
    None for a task that does not adapt this module (its X_i is zero; it takes no part in the basis)."""
    present = [f for f in factors if f is not None]
    deltas = [s * B @ A for B, A, s in present]
    if space == "full":
        xs, back = deltas, lambda X: X
    elif space == "knots":
        I = deltas[0].shape[1]
        U, sig, Vh = np.linalg.svd(np.hstack(deltas), full_matrices=False)
        keep = sig > 1e-9 * sig[0]
        U, sig, Vh = U[:, keep], sig[keep], Vh[keep]
        xs, back = [sig[:, None] * Vh[:, i * I : (i + 1) * I] for i in range(len(deltas))], lambda X: U @ X
    elif space == "core":
        Ub, Va = _range(np.hstack([B for B, _, _ in present])), _range(np.vstack([A for _, A, _ in present]).T)
        xs, back = [Ub.T @ d @ Va for d in deltas], lambda X: Ub @ X @ Va.T
    else:
        raise ValueError(space)
    it = iter(xs)
    return [next(it) if f is not None else np.zeros_like(xs[0]) for f in factors], back


def merge(space, method, modules, w, scope="global", **kw):
    """modules: {name: per-task factors (see space_tensors)} -> {name: merged dense ΔW} (float64)."""
    spaces = {m: space_tensors(space, f) for m, f in modules.items()}
    if scope == "global":
        flat = np.hstack([np.stack([x.ravel() for x in xs]) for xs, _ in spaces.values()])
        merged = merge_rows(method, flat, w, **kw)
        out, start = {}, 0
        for m, (xs, back) in spaces.items():
            size = xs[0].size
            out[m] = back(merged[start : start + size].reshape(xs[0].shape))
            start += size
        return out
    return {
        m: back(merge_rows(method, np.stack([x.ravel() for x in xs]), w, **kw).reshape(xs[0].shape))
        for m, (xs, back) in spaces.items()
    }
