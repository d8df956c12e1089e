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


def merge_rows(method, X, w, alpha=1.0, top_k=0.2, masks=None, density=1.0, **_):
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


def updates(modules, w):
    """{module: per-task weighted dense ΔW, None for a task without the module}."""
    return {m: [None if f is None else wi * f[2] * f[0] @ f[1] for wi, f in zip(w, fs)] for m, fs in modules.items()}


def merge(space, method, modules, w, scope="global", **kw):
    """modules: {name: per-task factors (see space_tensors)} -> {name: merged dense ΔW} (float64), with the
    options applied: isotropize, then LiNeS (block l of L scaled by a + beta*l/(L-1), a = ‖Σ_t ΔW_t‖ / (T·‖merged‖),
    Frobenius norms over all modules)."""
    if method in SPECTRAL:  # the dense definition: the space does not matter
        out = {m: SPECTRAL[method](ds, **kw) for m, ds in updates(modules, w).items()}
    else:
        out = _merge(space, method, modules, w, scope, **kw)
    if kw.get("isotropize"):
        out = {m: isotropic(d) for m, d in out.items()}
    if kw.get("lines"):
        total = sum((sum(dense(ds)) ** 2).sum() for ds in updates(modules, w).values())
        base = np.sqrt(total) / (len(w) * np.sqrt(sum((d**2).sum() for d in out.values())))
        blocks = {m: int(m.split(".layers.")[1].split(".")[0]) for m in out}
        depth = max(blocks.values())
        out = {m: (base + kw["lines"] * blocks[m] / depth) * d for m, d in out.items()}
    return out


def _merge(space, method, modules, w, scope="global", **kw):
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


# --- the spectral methods, on dense per-task updates (None: the task does not adapt the module) -----------
CUT = 1e-9  # numerical zeros: singular values below CUT·σ_max


def svd(M):
    U, s, Vh = np.linalg.svd(M, full_matrices=False)
    r = int((s > CUT * s[0]).sum()) if s.size and s[0] > 0 else 0
    return U[:, :r], s[:r], Vh[:r]


def polar(M):
    P, _, Qh = np.linalg.svd(M, full_matrices=False)
    return P @ Qh


def isotropic(M):
    U, s, Vh = svd(M)
    return s.mean() * U @ Vh if s.size else np.zeros_like(M)


def dense(updates):
    like = next(d for d in updates if d is not None)
    return [np.zeros_like(like) if d is None else d for d in updates]


def iso_c(updates, alpha=1.0, **_):
    return alpha * isotropic(sum(dense(updates)))


def iso_cts(updates, alpha=1.0, common=0.8, **_):
    ds = dense(updates)
    T = len(ds)
    U, s, Vh = svd(sum(ds))
    R = s.size
    per = min(round((R - int(np.floor(common * R))) / T), R // T)
    k = R - T * per
    lefts, rights, sig = [U[:, :k]], [Vh[:k].T], [s[:k]]
    for d in ds if per else []:
        res = d - U[:, :k] @ (U[:, :k].T @ d)
        Ur, sr, Vhr = np.linalg.svd(res, full_matrices=False)
        j = min(per, int((sr > CUT * s[0]).sum()))
        lefts.append(Ur[:, :j])
        rights.append(Vhr[:j].T)
        sig.append(sr[:j])
    sig = np.concatenate(sig)
    return alpha * sig.mean() * polar(np.hstack(lefts)) @ polar(np.hstack(rights)).T


def tsv(updates, alpha=1.0, keep=1.0, **_):
    lefts, rights, sig = [], [], []
    for d in dense(updates):
        U, s, Vh = svd(d)
        k = max(1, int(np.floor(keep * s.size))) if s.size else 0
        lefts.append(U[:, :k])
        rights.append(Vh[:k].T)
        sig.append(s[:k])
    return alpha * polar(np.hstack(lefts)) @ np.diag(np.concatenate(sig)) @ polar(np.hstack(rights)).T


def cart(updates, alpha=1.0, rank=0.08, **_):
    ds = dense(updates)
    m = sum(ds) / len(ds)
    k = max(1, int(np.floor(rank * svd(np.hstack(ds))[1].size)))
    out = m.copy()
    for d in ds:
        U, s, Vh = np.linalg.svd(d - m, full_matrices=False)
        out += alpha * (U[:, :k] * s[:k]) @ Vh[:k]
    return out


# --- the least-squares merges (RegMean, core-restricted RegMean, WUDI), on dense per-task updates -----------
RIDGE = 1e-6  # the ridge ε·mean(diag H)·I of the solve, as the package defines it


def reduced(G, reduce):
    return reduce * G + (1 - reduce) * np.diag(np.diag(G))


def ridged_inv(H):
    return np.linalg.inv(H + RIDGE * np.mean(np.diag(H)) * np.eye(H.shape[0]))


def regmean(updates, grams, w, alpha=1.0, reduce=0.95, **_):
    """α·(Σ_t w_t·ΔW_t·G̃_t)·(H + ε·mean(diag H)·I)⁻¹, H = Σ_t w_t·G̃_t; tasks without the module left out."""
    ts = [i for i, d in enumerate(updates) if d is not None]
    Gs = [w[i] * reduced(grams[i], reduce) for i in ts]
    return alpha * sum(updates[i] @ G for i, G in zip(ts, Gs)) @ ridged_inv(sum(Gs))


def core_regmean(updates, grams, w, A_rows, alpha=1.0, reduce=0.95, **_):
    """The same with ΔW's rows in the span of the tasks' A's (Q: an orthonormal basis of their rows):
    α·(Σ_t w_t·ΔW_t·G̃_t·Q)·(Qᵀ·H·Q + ε·mean(diag QᵀHQ)·I)⁻¹·Qᵀ."""
    ts = [i for i, d in enumerate(updates) if d is not None]
    Q = _range(np.vstack(A_rows).T)
    Gs = [w[i] * reduced(grams[i], reduce) for i in ts]
    return alpha * sum(updates[i] @ G @ Q for i, G in zip(ts, Gs)) @ ridged_inv(Q.T @ sum(Gs) @ Q) @ Q.T


def wudi(updates, alpha=1.0, **_):
    """α·(Σ_t ΔW_t·G_t)·(Σ_t G_t)⁺ with G_t = ΔW_tᵀ·ΔW_t/‖ΔW_t‖² (updates already weighted)."""
    present = [d for d in updates if d is not None and np.any(d)]
    Gs = [d.T @ d / (d**2).sum() for d in present]
    return alpha * sum(d @ G for d, G in zip(present, Gs)) @ np.linalg.pinv(sum(Gs), rcond=1e-10, hermitian=True)


def wudi_loss_grad(merged, updates):
    """∇ of Σ_t ‖(ΔW − ΔW_t)·ΔW_tᵀ‖²/‖ΔW_t‖² at ΔW = merged."""
    present = [d for d in updates if d is not None and np.any(d)]
    return sum(2 * (merged - d) @ d.T @ d / (d**2).sum() for d in present)


# the matrix methods that commute with orthonormal changes of frame: the same merge in every space
SPECTRAL = {"iso-c": iso_c, "iso-cts": iso_cts, "tsv": tsv, "cart": cart, "wudi": wudi}
