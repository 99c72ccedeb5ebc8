"""Low-rank decomposition of a 2-D convolution (numpy only): the factors, the rank estimate and the choice.

Two forms, both exact at full rank:

* ``svd`` (AMCT's two-conv form): ``K x 1`` conv to ``r`` channels, then ``1 x K`` conv to ``Cout``. The weight
  ``W[o, i, h, w]`` read as the matrix ``M[(i, h), (o, w)]`` is split by its SVD, ``M ~ A B``; the vertical
  conv takes the stride and padding of the rows, the horizontal one those of the columns.
* ``tucker2``: ``1 x 1`` conv to ``r_in`` channels, ``K x K`` core conv to ``r_out`` channels, ``1 x 1`` conv
  to ``Cout`` (HOSVD of the two channel modes, refined by HOOI sweeps).

Without data the factors minimise the weight error. With the layer's real inputs (``LayerData``) the last
factor (and for ``tucker2`` the core, by reduced-rank regression) minimises the layer's output error on them.
The rank: an EVBMF estimate (as AMCT) or a compute budget / error bound the user sets; each candidate is
scored by its MACs and its relative error, and ``choose`` picks the cheapest within the error allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

FORMS = ("svd", "tucker2")


@dataclass(frozen=True)
class ConvGeometry:
    """What the MAC count of a conv and its replacements needs: channels, square kernel, stride, the pads
    (top, left, bottom, right) and the input's spatial size."""

    cout: int
    cin: int
    k: int
    stride: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    in_hw: tuple[int, int] = (1, 1)

    @property
    def out_hw(self) -> tuple[int, int]:
        t, left, b, r = self.pads
        return ((self.in_hw[0] + t + b - self.k) // self.stride[0] + 1,
                (self.in_hw[1] + left + r - self.k) // self.stride[1] + 1)

    def macs(self) -> int:
        ho, wo = self.out_hw
        return self.cout * self.cin * self.k * self.k * ho * wo

    def form_macs(self, form: str, ranks: tuple[int, ...]) -> int:
        """Multiply-accumulates of the decomposed layer."""
        ho, wo = self.out_hw
        if form == "svd":
            (r,) = ranks
            w_mid = self.in_hw[1]  # the vertical conv keeps the full width (no horizontal pad or stride)
            return r * self.cin * self.k * ho * w_mid + self.cout * r * self.k * ho * wo
        r_in, r_out = ranks
        return (r_in * self.cin * self.in_hw[0] * self.in_hw[1] + r_out * r_in * self.k * self.k * ho * wo
                + self.cout * r_out * ho * wo)

    def form_params(self, form: str, ranks: tuple[int, ...]) -> int:
        if form == "svd":
            return ranks[0] * (self.cin + self.cout) * self.k
        r_in, r_out = ranks
        return r_in * self.cin + r_out * r_in * self.k * self.k + self.cout * r_out


@dataclass
class Decomposition:
    """One candidate: the form, its ranks, the conv weights in order (OIHW), the last conv's bias, the
    relative error (of the layer output on real inputs when ``data_aware``, else of the weight) and MACs."""

    form: str
    ranks: tuple[int, ...]
    weights: list[np.ndarray] = field(repr=False)
    bias: np.ndarray | None = field(repr=False)
    error: float
    macs: int
    data_aware: bool = False


# ------------------------------------------------------------------ factors


def svd_matrix(w: np.ndarray) -> np.ndarray:
    """The weight (Cout, Cin, K, K) as ``M[(i, h), (o, w)]``: the SVD of this splits the kernel's rows from
    its columns."""
    cout, cin, kh, kw = w.shape
    return w.transpose(1, 2, 0, 3).reshape(cin * kh, cout * kw)


def svd_factors(w: np.ndarray, rank: int) -> list[np.ndarray]:
    """Weights of the ``K x 1`` conv (rank, Cin, K, 1) and the ``1 x K`` conv (Cout, rank, 1, K)."""
    cout, cin, kh, kw = w.shape
    u, s, vt = np.linalg.svd(svd_matrix(np.asarray(w, np.float64)), full_matrices=False)
    root = np.sqrt(s[:rank])
    a = (u[:, :rank] * root).T.reshape(rank, cin, kh, 1)
    b = (root[:, None] * vt[:rank]).reshape(rank, cout, 1, kw).transpose(1, 0, 2, 3)
    return [a, b]


def _leading(mat: np.ndarray, rank: int) -> np.ndarray:
    """The ``rank`` leading left singular vectors of ``mat``."""
    u, _, _ = np.linalg.svd(mat, full_matrices=False)
    return u[:, :rank]


def tucker2_factors(w: np.ndarray, r_in: int, r_out: int, sweeps: int = 2) -> list[np.ndarray]:
    """Weights of the 1x1 conv (r_in, Cin, 1, 1), the core conv (r_out, r_in, K, K) and the 1x1 conv
    (Cout, r_out, 1, 1): HOSVD of the two channel modes, then ``sweeps`` HOOI passes (each factor the leading
    subspace of the weight projected on the other), which never increase the weight error."""
    w = np.asarray(w, np.float64)
    cout, cin, kh, kw = w.shape
    u_out = _leading(w.reshape(cout, -1), r_out)
    u_in = _leading(w.transpose(1, 0, 2, 3).reshape(cin, -1), r_in)
    for _ in range(sweeps):
        proj = np.einsum("oihw,ir->orhw", w, u_in, optimize=True)
        u_out = _leading(proj.reshape(cout, -1), r_out)
        proj = np.einsum("oihw,or->rihw", w, u_out, optimize=True)
        u_in = _leading(proj.transpose(1, 0, 2, 3).reshape(cin, -1), r_in)
    core = np.einsum("oihw,or,is->rshw", w, u_out, u_in, optimize=True)
    return [u_in.T.reshape(r_in, cin, 1, 1), core, u_out.reshape(cout, r_out, 1, 1)]


def compose(form: str, weights: list[np.ndarray]) -> np.ndarray:
    """The full (Cout, Cin, K, K) weight the factors stand for."""
    if form == "svd":
        a, b = weights
        return np.einsum("rihx,oryw->oihw", a, b, optimize=True)
    first, core, last = weights
    return np.einsum("si,rshw,or->oihw", first[:, :, 0, 0], core, last[:, :, 0, 0], optimize=True)


# ------------------------------------------------------------------ rank estimate


def evbmf_rank(mat: np.ndarray) -> int:
    """Rank of ``mat`` by empirical variational Bayesian matrix factorisation (Nakajima et al., 2013: the
    analytic global solution, noise variance estimated by minimising the free energy): the number of singular
    values above the EVB threshold. Used by AMCT to size the decomposition."""
    mat = np.asarray(mat, np.float64)
    lmat, mdim = mat.shape
    if lmat > mdim:
        mat, (lmat, mdim) = mat.T, (mdim, lmat)
    s = np.linalg.svd(mat, compute_uv=False)
    alpha = lmat / mdim
    tau_bar = 2.5129 * math.sqrt(alpha)  # the EVB threshold's tau (Nakajima et al., eq. for the lower bound)
    total = float((mat ** 2).sum())
    h = len(s)
    residual = max(total - float((s ** 2).sum()), 0.0)
    xubar = (1 + tau_bar) * (1 + alpha / tau_bar)
    eh_ub = int(min(math.ceil(lmat / (1 + alpha)) - 1, h)) - 1
    upper = (float((s ** 2).sum()) + residual) / (lmat * mdim)
    lower = max(s[eh_ub + 1] ** 2 / (mdim * xubar) if eh_ub + 1 < h else 0.0, float(np.mean(s[eh_ub + 1:] ** 2)) / mdim
                if eh_ub + 1 < h else 0.0)
    lower = max(lower, upper * 1e-12)

    def free_energy(sigma2: float) -> float:
        x = s ** 2 / (mdim * sigma2)
        z1 = x[x > xubar]
        z2 = x[x <= xubar]
        tau = 0.5 * (z1 - (1 + alpha) + np.sqrt((z1 - (1 + alpha)) ** 2 - 4 * alpha))
        term1 = float(np.sum(z2 - np.log(z2)))
        term2 = float(np.sum(z1 - tau))
        term3 = float(np.sum(np.log((tau + 1) / z1)))
        term4 = alpha * float(np.sum(np.log(tau / alpha + 1)))
        return term1 + term2 + term3 + term4 + residual / (mdim * sigma2) + (lmat - h) * math.log(sigma2)

    if not lower < upper:
        return h
    # golden-section search on log sigma2 (the free energy is smooth and unimodal in practice)
    lo, hi = math.log(lower), math.log(upper)
    g = (math.sqrt(5) - 1) / 2
    c, d = hi - g * (hi - lo), lo + g * (hi - lo)
    fc, fd = free_energy(math.exp(c)), free_energy(math.exp(d))
    for _ in range(80):
        if fc < fd:
            hi, d, fd = d, c, fc
            c = hi - g * (hi - lo)
            fc = free_energy(math.exp(c))
        else:
            lo, c, fc = c, d, fd
            d = lo + g * (hi - lo)
            fd = free_energy(math.exp(d))
    sigma2 = math.exp((lo + hi) / 2)
    threshold = math.sqrt(mdim * sigma2 * (1 + tau_bar) * (1 + alpha / tau_bar))
    return int(np.sum(s > threshold))


def round_rank(rank: int, multiple: int, limit: int) -> int:
    """``rank`` rounded up to a multiple of ``multiple`` (the hardware's channel granule), at most ``limit``."""
    return min(max(multiple, -(-rank // multiple) * multiple), limit)


# ------------------------------------------------------------------ data-aware fitting


def im2col(x: np.ndarray, kh: int, kw: int, stride: tuple[int, int], pads: tuple[int, int, int, int]) -> np.ndarray:
    """Patches of ``x`` (N, C, H, W) as rows (N * Ho * Wo, C * kh * kw), columns in OIHW weight order."""
    t, left, b, r = pads
    x = np.pad(x, ((0, 0), (0, 0), (t, b), (left, r)))
    n, c, hp, wp = x.shape
    ho, wo = (hp - kh) // stride[0] + 1, (wp - kw) // stride[1] + 1
    cols = np.empty((n, c, kh, kw, ho, wo), x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = x[:, :, i:i + stride[0] * ho:stride[0], j:j + stride[1] * wo:stride[1]]
    return cols.transpose(0, 4, 5, 1, 2, 3).reshape(n * ho * wo, c * kh * kw)


def conv2d(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None, stride: tuple[int, int],
           pads: tuple[int, int, int, int]) -> np.ndarray:
    """A plain convolution (groups 1, dilation 1) by im2col: NCHW in, NCHW out."""
    n, _, h, wd = x.shape
    cout, _, kh, kw = w.shape
    t, left, b, r = pads
    ho, wo = (h + t + b - kh) // stride[0] + 1, (wd + left + r - kw) // stride[1] + 1
    y = im2col(x, kh, kw, stride, pads) @ w.reshape(cout, -1).T
    if bias is not None:
        y = y + bias
    return y.reshape(n, ho, wo, cout).transpose(0, 3, 1, 2)


@dataclass
class _Moments:
    """Centred second moments of features ``g`` and targets ``y`` over sampled output pixels."""

    n: int = 0
    sg: np.ndarray | None = None
    sy: np.ndarray | None = None
    gg: np.ndarray | None = None
    gy: np.ndarray | None = None
    yy: float = 0.0
    yy_sum: np.ndarray | None = None

    def add(self, g: np.ndarray, y: np.ndarray) -> None:
        g, y = g.astype(np.float64), y.astype(np.float64)
        if self.sg is None:
            self.sg, self.sy = np.zeros(g.shape[1]), np.zeros(y.shape[1])
            self.gg, self.gy = np.zeros((g.shape[1],) * 2), np.zeros((g.shape[1], y.shape[1]))
            self.yy_sum = np.zeros(y.shape[1])
        self.n += len(g)
        self.sg += g.sum(0)
        self.sy += y.sum(0)
        self.gg += g.T @ g
        self.gy += g.T @ y
        self.yy += float((y ** 2).sum())

    def centred(self, cols: np.ndarray | None = None):
        """Means and centred moments, restricted to feature columns ``cols``."""
        sel = slice(None) if cols is None else cols
        mg, my = self.sg[sel] / self.n, self.sy / self.n
        gg = self.gg[np.ix_(cols, cols)] if cols is not None else self.gg
        gg = gg - self.n * np.outer(mg, mg)
        gy = self.gy[sel] - self.n * np.outer(mg, my)
        yy = self.yy - self.n * float(my @ my)
        return mg, my, gg, gy, yy


def _solve(gg: np.ndarray, gy: np.ndarray) -> np.ndarray:
    ridge = 1e-6 * max(float(np.trace(gg)) / len(gg), 1e-30)
    return np.linalg.solve(gg + ridge * np.eye(len(gg)), gy)


def _residual(gg, gy, yy, m) -> float:
    return max(yy - 2 * float(np.sum(m * gy)) + float(np.sum(m * (gg @ m))), 0.0)


class LayerData:
    """A conv layer's real inputs, reduced to what fitting its decompositions needs: the sampled output
    pixels of the original layer (targets) and the moments of each form's intermediate features at the
    largest rank considered (smaller ranks are leading sub-blocks). Built once per layer."""

    def __init__(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, geometry: ConvGeometry,
                 max_rows: int = 8192, seed: int = 0, target: np.ndarray | None = None):
        self.x = np.asarray(x, np.float32)
        if self.x.ndim != 4 or self.x.shape[1] != geometry.cin:
            raise ValueError(f"layer input of shape {self.x.shape} does not fit a conv with {geometry.cin} input channels")
        self.weight, self.bias, self.geometry = np.asarray(weight, np.float64), bias, geometry
        ho, wo = conv2d(self.x[:1], self.weight[:1], None, geometry.stride, geometry.pads).shape[2:]
        per_image = ho * wo
        rng = np.random.default_rng(seed)
        keep = np.arange(len(self.x))
        if len(keep) * per_image > 4 * max_rows:  # enough images to spread the sampled pixels over
            keep = np.sort(rng.choice(len(keep), max(1, 4 * max_rows // per_image), replace=False))
        images = self.x[keep]
        total = len(images) * per_image
        self.rows = np.sort(rng.choice(total, min(total, max_rows), replace=False))
        self.images = images
        if target is not None:  # the original layer's outputs, the inputs being those of the decomposed model so far
            y = np.asarray(target, np.float64)[keep]
        else:
            y = conv2d(images, self.weight, bias, geometry.stride, geometry.pads)
        self.y = y.transpose(0, 2, 3, 1).reshape(-1, geometry.cout)[self.rows]
        self._cache: dict = {}

    def whitening(self, kh: int, kw: int, stride: tuple[int, int], pads: tuple[int, int, int, int],
                  ridge: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
        """Symmetric square root of the second moment ``S`` of the input patches a first factor of shape
        (kh, kw) reads, and its inverse (``S`` plus ``ridge`` x its mean eigenvalue). The output error of a
        factorisation ``M ~ A B`` on these inputs is ``|S^1/2 M - S^1/2 A B|``: the SVD of ``S^1/2 M`` gives the
        best one (taps and channels the data never fills cost nothing)."""
        p = im2col(self.images, kh, kw, stride, pads).astype(np.float64)
        if len(p) > 8 * max_dim(p):
            p = p[np.random.default_rng(1).choice(len(p), 8 * max_dim(p), replace=False)]
        m = p.T @ p / len(p)
        m += ridge * max(float(np.trace(m)) / len(m), 1e-30) * np.eye(len(m))
        vals, vecs = np.linalg.eigh(m)
        vals = np.clip(vals, 1e-30, None)
        return (vecs * np.sqrt(vals)) @ vecs.T, (vecs / np.sqrt(vals)) @ vecs.T

    def _features(self, first_conv: np.ndarray, stride1, pads1, kh, kw, stride2, pads2) -> np.ndarray:
        mid = conv2d(self.images, first_conv, None, stride1, pads1)
        return im2col(mid, kh, kw, stride2, pads2)[self.rows]

    def moments(self, key, first_conv, stride1, pads1, kh, kw, stride2, pads2) -> _Moments:
        if key not in self._cache:
            mom = _Moments()
            mom.add(self._features(first_conv, stride1, pads1, kh, kw, stride2, pads2), self.y)
            self._cache[key] = mom
        return self._cache[key]


def _fit_svd(ld: LayerData, a_full: np.ndarray, rank: int) -> tuple[list[np.ndarray], np.ndarray, float]:
    """Second (1 x K) conv and its bias by least squares on the layer's real outputs, first conv fixed."""
    g = ld.geometry
    t, left, b, r = g.pads
    mom = ld.moments(("svd", a_full.tobytes()), a_full, (g.stride[0], 1), (t, 0, b, 0), 1, g.k, (1, g.stride[1]),
                     (0, left, 0, r))
    cols = np.arange(rank * g.k)
    mg, my, gg, gy, yy = mom.centred(cols)
    m = _solve(gg, gy)
    err = _residual(gg, gy, yy, m)
    second = m.T.reshape(g.cout, rank, 1, g.k)
    bias = my - mg @ m
    return [a_full[:rank], second], bias, math.sqrt(err / max(mom.yy, 1e-30))


def _fit_tucker2(ld: LayerData, first_full: np.ndarray, r_in: int, r_out: int):
    """Core conv and last 1x1 conv by reduced-rank regression of the real outputs on the core's input
    patches: the least-squares map projected on the ``r_out`` leading directions of its fitted outputs."""
    g = ld.geometry
    mom = ld.moments(("tucker2", first_full.tobytes()), first_full, (1, 1), (0, 0, 0, 0), g.k, g.k, g.stride, g.pads)
    k2 = g.k * g.k
    cols = np.arange(r_in * k2)
    mg, my, gg, gy, yy = mom.centred(cols)
    m = _solve(gg, gy)  # (r_in k k, Cout)
    fitted = m.T @ gg @ m
    vals, vecs = np.linalg.eigh((fitted + fitted.T) / 2)
    v = vecs[:, ::-1][:, :r_out]  # (Cout, r_out)
    mr = m @ v @ v.T
    err = _residual(gg, gy, yy, mr)
    core = (m @ v).T.reshape(r_out, r_in, g.k, g.k)
    last = v.reshape(g.cout, r_out, 1, 1)
    bias = my - mg @ mr
    return [first_full[:r_in], core, last], bias, math.sqrt(err / max(mom.yy, 1e-30))


# ------------------------------------------------------------------ candidates and the choice


def _rank_steps(limit: int, multiple: int) -> list[int]:
    return list(range(multiple, limit + 1, multiple)) or [limit]


def tucker2_bases(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HOSVD of the two channel modes: complete output and input bases and the full core in them, so that
    a truncation's weight error is the core energy it drops."""
    cout, cin = w.shape[:2]
    u_out = np.linalg.svd(w.reshape(cout, -1), full_matrices=False)[0]
    u_in = np.linalg.svd(w.transpose(1, 0, 2, 3).reshape(cin, -1), full_matrices=False)[0]
    return u_out, u_in, np.einsum("oihw,or,is->rshw", w, u_out, u_in, optimize=True)


def candidates(weight: np.ndarray, bias: np.ndarray | None, geometry: ConvGeometry, multiple: int = 16,
               forms: tuple[str, ...] = FORMS) -> list[Decomposition]:
    """Every form and rank (multiples of ``multiple``) that costs fewer MACs than the layer, with its weight
    error (truncated SVD / truncated HOSVD; ``refine`` improves the one chosen)."""
    w = np.asarray(weight, np.float64)
    g = geometry
    full = g.macs()
    norm2 = max(float((w ** 2).sum()), 1e-30)
    out: list[Decomposition] = []
    if "svd" in forms:
        limit = min(g.cin * g.k, g.cout * g.k)
        ranks = [r for r in _rank_steps(limit, multiple) if g.form_macs("svd", (r,)) < full]
        if ranks:
            a_full, b_full = svd_factors(w, max(ranks))
            s = np.linalg.svd(svd_matrix(w), compute_uv=False)
            for r in ranks:
                err = math.sqrt(float((s[r:] ** 2).sum()) / norm2)
                out.append(Decomposition("svd", (r,), [a_full[:r], b_full[:, :r]], bias, err,
                                         g.form_macs("svd", (r,))))
    if "tucker2" in forms:
        pairs = []
        for r_in in _rank_steps(g.cin, multiple):
            r_out = round_rank(round(r_in * g.cout / g.cin), multiple, g.cout)
            if g.form_macs("tucker2", (r_in, r_out)) < full:
                pairs.append((r_in, r_out))
        if pairs:
            u_out, u_in, core = tucker2_bases(w)
            for r_in, r_out in pairs:
                kept = float((core[:r_out, :r_in] ** 2).sum())
                err = math.sqrt(max(norm2 - kept, 0.0) / norm2)
                ws = [u_in[:, :r_in].T.reshape(r_in, g.cin, 1, 1), core[:r_out, :r_in],
                      u_out[:, :r_out].reshape(g.cout, r_out, 1, 1)]
                out.append(Decomposition("tucker2", (r_in, r_out), ws, bias, err,
                                         g.form_macs("tucker2", (r_in, r_out))))
    for d in out:
        _as_float32(d)
    return out


def _as_float32(d: Decomposition) -> Decomposition:
    d.weights = [np.ascontiguousarray(x, np.float32) for x in d.weights]
    if d.bias is not None:
        d.bias = np.asarray(d.bias, np.float32)
    return d


#: the least-squares fit to real outputs needs at least this many sampled output pixels per fitted feature
MIN_ROWS_PER_FEATURE = 4


def refine(d: Decomposition, weight: np.ndarray, bias: np.ndarray | None, data: LayerData | None = None,
           sweeps: int = 2) -> Decomposition:
    """The chosen candidate's final factors. Without data: HOOI sweeps for ``tucker2`` (the SVD is already
    optimal), error of the weight. With the layer's real inputs: the factorisation that is best for the second
    moment of its inputs (``LayerData.whitening``); then, given enough sampled output pixels, the last factor
    (``svd``) or the core and last 1x1 conv (``tucker2``, reduced-rank regression) fitted by least squares to the
    original layer's outputs, with a bias. The error is then that of the output on these inputs."""
    w = np.asarray(weight, np.float64)
    cout, cin, k = w.shape[0], w.shape[1], w.shape[2]
    if data is None:
        if d.form == "svd":
            return d
        r_in, r_out = d.ranks
        ws = tucker2_factors(w, r_in, r_out, sweeps)
        err = float(np.linalg.norm(compose("tucker2", ws) - w)) / max(float(np.linalg.norm(w)), 1e-30)
        return _as_float32(Decomposition(d.form, d.ranks, ws, bias, err, d.macs))
    g = data.geometry
    if d.form == "svd":
        (r,) = d.ranks
        root, inv = data.whitening(k, 1, (g.stride[0], 1), (g.pads[0], 0, g.pads[2], 0))
        u, sv, vt = np.linalg.svd(root @ svd_matrix(w), full_matrices=False)
        first = (inv @ u[:, :r]).T.reshape(r, cin, k, 1)
        ws = [first, (sv[:r, None] * vt[:r]).reshape(r, cout, 1, k).transpose(1, 0, 2, 3)]
        bb, err = bias, math.sqrt(float((sv[r:] ** 2).sum()) / max(float((sv ** 2).sum()), 1e-30))
        if len(data.rows) >= MIN_ROWS_PER_FEATURE * r * k:
            ws, bb, err = _fit_svd(data, first, r)
    else:
        r_in, r_out = d.ranks
        root, inv = data.whitening(1, 1, (1, 1), (0, 0, 0, 0))
        white = root @ w.transpose(1, 0, 2, 3).reshape(cin, -1)  # (Cin, Cout K K), whitened input mode
        u = _leading(white, r_in)
        first = (inv @ u).T.reshape(r_in, cin, 1, 1)
        reduced = (u.T @ white).reshape(r_in, cout, k, k).transpose(1, 0, 2, 3)  # (Cout, r_in, K, K)
        u_out = _leading(reduced.reshape(cout, -1), r_out)
        core = np.einsum("or,oshw->rshw", u_out, reduced, optimize=True)
        ws = [first, core, u_out.reshape(cout, r_out, 1, 1)]
        approx = u @ np.einsum("or,rshw->sohw", u_out, core, optimize=True).reshape(r_in, -1)
        bb, err = bias, float(np.linalg.norm(white - approx)) / max(float(np.linalg.norm(white)), 1e-30)
        if len(data.rows) >= MIN_ROWS_PER_FEATURE * r_in * k * k:
            ws, bb, err = _fit_tucker2(data, first, r_in, r_out)
    return _as_float32(Decomposition(d.form, d.ranks, ws, bb, err, d.macs, True))


def max_dim(p: np.ndarray) -> int:
    return max(p.shape[1], 1024)


def check_budget(rank_budget: float | None, what: str = "rank_budget") -> None:
    if rank_budget is not None and not (isinstance(rank_budget, (int, float)) and 0 < rank_budget <= 1):
        raise ValueError(f"{what} must be in (0, 1] (the fraction of a layer's MACs kept), got {rank_budget!r}")


def rank_order(cands: list[Decomposition], geometry: ConvGeometry, weight: np.ndarray, multiple: int,
               rank_budget: float | None = None, max_error: float | None = None) -> tuple[list[Decomposition], str]:
    """Candidates in order of preference, and the rule used (or, when empty, why nothing qualifies).

    * ``rank_budget`` b: MACs at most b x the layer's, least error first;
    * ``max_error`` e: error at most e, fewest MACs first;
    * neither (AMCT's way): the EVBMF rank of the two-conv form (rounded up) sets the error allowed, then the
      fewest MACs within it, whichever form.
    """
    full = geometry.macs()
    if rank_budget is not None:
        ok = sorted((c for c in cands if c.macs <= rank_budget * full), key=lambda c: (c.error, c.macs))
        return ok, (f"MACs <= {rank_budget:g} x" if ok else f"no rank within {rank_budget:g} x the layer's MACs")
    if max_error is not None:
        allowed, rule = max_error, f"error <= {max_error:g}"
    else:
        r = round_rank(evbmf_rank(svd_matrix(np.asarray(weight, np.float64))), multiple,
                       min(geometry.cin, geometry.cout) * geometry.k)
        ref = [c for c in cands if c.form == "svd" and c.ranks[0] >= r]
        if not ref:
            return [], f"the EVBMF rank ({r}) gives no gain"
        allowed = min(ref, key=lambda c: c.ranks[0]).error
        rule = f"EVBMF rank {r}: error <= {allowed:.3g}"
    ok = sorted((c for c in cands if c.error <= allowed * (1 + 1e-9)), key=lambda c: (c.macs, c.error))
    return ok, (rule if ok else f"no rank with error <= {allowed:g} gives a gain")
