"""AdaRound (AMCT's ``ada_quantize``): learn, per weight, whether it rounds up or down.

Round-to-nearest minimises each weight's own error, not the layer's output error. AdaRound (Nagel et al.,
"Up or Down? Adaptive Rounding for Post-Training Quantization", 2020) relaxes the choice between ``floor(w/s)``
and ``floor(w/s) + 1`` to a rectified sigmoid ``h(V)`` and minimises the layer's output error on its
calibration inputs plus a regulariser that drives every ``h`` to 0 or 1:

    || (s * clip(floor(W/s) + h(V)) - W) X ||^2 / N  +  reg_param * sum(1 - |2h - 1|^beta)

with ``beta`` annealed from ``beta_range_start`` to ``beta_range_end`` after ``warm_start`` of the iterations.
The scale ``s`` is ARQ's (max |w| per output channel); only the rounding changes.

Everything here is numpy: the layer inputs are rows (a dense layer's input vectors or a convolution's
im2col patches) kept by ``InputSamples``, a bounded, seeded random subset of every row calibration saw, or,
for the default's learned rounding (flip descent only), summarised by ``InputGram``: the rows' second moments
accumulated batch by batch, the only thing the flip descent reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.random  # noqa: F401 - numpy 2 loads it on first use: inside the first batch's draw, 5-14 ms

from omct.core.options import AlgorithmOptions, CfgPlacement, option
from omct.core.parallel import release_scratch, scratch
from omct.core.params import QuantParams

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (AMCT's and the paper's values)

#: Bytes of input rows kept per layer (float32). With d = Cin * kh * kw values per row a layer keeps
#: min(MAX_ROWS, SAMPLE_BYTES // (4 d)) rows: 4096 rows up to d = 512, 512 rows at d = 4096.
SAMPLE_BYTES = 8 * 2**20
MAX_ROWS = 4096


@dataclass(frozen=True)
class AdaRoundOptions(AlgorithmOptions):
    """AMCT's ``ADAquantize`` message (field numbers as in AMCT's calibration_config proto).

    ``num_iteration`` defaults to 1000, not AMCT's 10000: AMCT runs on an accelerator; on a CPU core the
    optimisation costs about ``num_iteration * 4 * out_channels * d * min(rows, d)`` flops per layer (a minute
    for the ResNet-18 benchmark model at 1000), and 200 iterations were already within 0.3 dB of 1000 on the
    benchmark models (docs/ADVANCED_PTQ.md)."""

    num_iteration: int = option(1000, cfg=1, ge=0, le=1_000_000, help="Adam steps per layer")
    reg_param: float = option(0.01, cfg=2, ge=0.0, help="weight of the rounding regulariser")
    beta_range_start: float = option(20.0, cfg=3, gt=0.0, help="regulariser exponent at the end of the warm-up")
    beta_range_end: float = option(2.0, cfg=4, gt=0.0, help="regulariser exponent at the last iteration")
    warm_start: float = option(0.2, cfg=5, ge=0.0, lt=1.0, help="fraction of iterations without the regulariser")
    learning_rate: float = option(0.01, cfg=1000, gt=0.0, help="Adam step size (omct)")
    quantized_input: bool = option(True, cfg=1001, help="fit W x with the rounded weights on the quantized input (omct)")
    solver: str = option("adam", cfg=1002, choices=("adam", "flips"),
                         help="adam: AdaRound's relaxation; flips: descent by single floor/ceil flips only (omct)")
    center: bool = option(True, cfg=1004, help="with bias correction on, fit what it leaves: inputs minus their mean (omct)")
    polish: bool = option(True, cfg=1003, help="after adam, flip single weights while that lowers the loss (omct)")
    cfg = CfgPlacement("ada_quantize", 15, "ADAquantize", shared=(("channel_wise", 10),))


# --------------------------------------------------------------------------------------------------------------
# Calibration inputs: a bounded sample of rows


@dataclass(frozen=True)
class Window:
    """A 2-D convolution's geometry (ONNX attribute order): pads are (top, left, bottom, right)."""

    kernel: tuple[int, int]
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]
    dilations: tuple[int, int]


class InputSamples:
    """A uniform random subset of the rows (dense inputs or conv patches) of every batch, at most ``max_rows``.

    Memory is ``max_rows * d * 4`` bytes whatever the number of batches: each batch's rows are merged into the
    kept set by reservoir sampling (the number taken from the new batch is hypergeometric), so the kept rows
    are a uniform sample of all rows seen. Seeded by ``seed`` and the batch count: the same data gives the
    same sample."""

    def __init__(self, window: Window | None, seed: int, max_bytes: int = SAMPLE_BYTES, max_rows: int = MAX_ROWS):
        self.window, self.seed, self.max_bytes, self.max_rows = window, seed, max_bytes, max_rows
        self.rows: np.ndarray | None = None
        self.seen = 0  # rows offered so far
        self.batches = 0

    def capacity(self, d: int) -> int:
        return max(1, min(self.max_rows, self.max_bytes // (4 * d)))

    def update(self, values: np.ndarray) -> None:
        x = np.asarray(values, np.float32)
        rng = np.random.default_rng([self.seed, self.batches])
        self.batches += 1
        if self.window is None:
            total = x.size // x.shape[-1]
            d = x.shape[-1]
        else:
            n, c, h, w = x.shape
            oh, ow = _out_size(h, w, self.window)
            total, d = n * oh * ow, c * self.window.kernel[0] * self.window.kernel[1]
        cap = self.capacity(d)
        keep = min(cap, self.seen + total)
        take = keep if self.seen == 0 else int(rng.hypergeometric(total, self.seen, keep))
        picks = np.sort(rng.choice(total, size=take, replace=False)) if take < total else np.arange(total)
        new = x.reshape(-1, d)[picks] if self.window is None else _patches(x, self.window, picks)
        new = np.ascontiguousarray(new, np.float32)
        old = self.rows
        if old is None or keep - take <= 0:
            self.rows = new
        else:  # len(old) - (keep - take) kept rows leave: the new rows overwrite them in place, the rest append
            drop = len(old) - (keep - take)
            if drop > 0:
                old[np.sort(rng.choice(len(old), size=drop, replace=False))] = new[:drop]
            self.rows = old if drop == take else np.concatenate([old, new[drop:]])
        self.seen += total


    def merge(self, other: InputSamples) -> None:
        """Join another process's sample of the same tensor (distributed calibration): a uniform sample of the
        union, as if one process had seen both (the number kept from ``other`` is hypergeometric in the rows
        each has seen)."""
        if other.rows is None:
            return
        if self.rows is None:
            self.rows, self.seen, self.batches = other.rows.copy(), other.seen, other.batches
            return
        rng = np.random.default_rng([self.seed, self.batches, other.batches, 1])
        keep = min(self.capacity(self.rows.shape[1]), len(self.rows) + len(other.rows))
        take = int(rng.hypergeometric(other.seen, self.seen, keep))
        take = min(max(take, keep - len(self.rows)), len(other.rows))
        mine = np.sort(rng.choice(len(self.rows), size=keep - take, replace=False))
        theirs = np.sort(rng.choice(len(other.rows), size=take, replace=False))
        self.rows = np.concatenate([self.rows[mine], other.rows[theirs]])
        self.seen += other.seen
        self.batches += other.batches


#: Odd 64-bit multipliers (wrapping) that mix a batch's probe values into ``InputGram``'s draw seed.
_MIX = (np.arange(1, 513, 2, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) | np.uint64(1)


class InputGram:
    """The second moments of a layer's input rows (dense inputs or conv patches), accumulated batch by batch:
    what the default's learned rounding needs instead of the rows themselves.

    Each batch contributes ``rows_per_batch`` of its rows (a seeded uniform draw; all of them when it has at most
    twice that many: a transformer's 16 x 32 tokens are not drawn from at all): their Gram matrix ``X' X`` (one
    float32 BLAS call per batch, per group the ``d x d`` block a grouped conv's output reads, summed in float32),
    their column sums and how many of each column's values are nonzero (exact zeros, from ReLU or padding, pass
    activation quantization unchanged). Memory is ``groups * d * d * 4`` bytes whatever the number of batches (a 3 x
    3 conv with 64 input channels: 1.3 MB). A batch's draw is seeded by ``seed`` and the batch's content, so the
    same data gives the same moments, and processes that calibrate on parts of it merge to what one process gets (up
    to float32 summation order)."""

    def __init__(self, window: Window | None, seed: int, groups: int = 1, rows_per_batch: int = 256,
                 max_d: int | None = None):
        self.window, self.seed, self.groups, self.rows_per_batch, self.max_d = window, seed, groups, rows_per_batch, max_d
        self.gram: np.ndarray | None = None  # (groups, d, d) float32: the sum of x' x over the rows taken
        self.sums: np.ndarray | None = None  # (groups, d) float64
        self.nonzero: np.ndarray | None = None  # (groups, d) int64
        self.n = 0  # rows taken
        self.batches = 0

    def update(self, values: np.ndarray) -> None:
        x = np.asarray(values, np.float32)
        self.batches += 1
        if self.window is None:
            total, d = x.size // x.shape[-1], x.shape[-1]
        else:
            n, c, h, w = x.shape
            oh, ow = _out_size(h, w, self.window)
            total, d = n * oh * ow, c * self.window.kernel[0] * self.window.kernel[1]
        if (self.max_d is not None and d > self.max_d) or total == 0 or d % self.groups:
            return
        g, dg = self.groups, d // self.groups
        take = total if total <= 2 * self.rows_per_batch else self.rows_per_batch  # a small batch: every row
        picks = self.picks(x, total, take)
        # the rows, their Gram product and their nonzero mask go to this thread's reused scratch buffers: fresh
        # temporaries of that size could come fresh from the OS each batch, faulted in page by page
        if self.window is None:
            rows = x.reshape(-1, d) if picks is None else np.take(x.reshape(-1, d), picks, axis=0, mode="clip",
                                                                   out=_scratch("rows", (take, d)))
        else:
            rows = _patches(x, self.window, np.arange(total) if picks is None else picks, out=_scratch("rows", (take, d)))
        if g == 1:  # x' x of one contiguous (take, d) block: a symmetric rank-k update (half a GEMM's flops)
            rows = np.ascontiguousarray(rows)
            gram = np.matmul(rows.T, rows, out=_scratch("gram", (d, d)))[None]
        else:
            grouped = rows.reshape(take, g, dg).transpose(1, 0, 2)  # (groups, take, dg)
            gram = np.matmul(grouped.transpose(0, 2, 1), grouped, out=_scratch("gram", (g, dg, dg)))
        if self.gram is None:  # the first batch's product, copied: no zeroed pages read, then written again
            self.gram = gram.astype(np.float32, copy=True).reshape(g, dg, dg)
            self.sums = np.zeros((g, dg))
            self.nonzero = np.zeros((g, dg), np.int64)
        else:
            self.gram += gram
        self.sums += rows.sum(0, dtype=np.float64).reshape(g, dg)
        if take < 2**24:  # a matrix-vector product over the 0/1 mask: exact counts in float32, twice as fast
            # written over the rows (read for the last time) where they are this thread's copy, not the batch itself
            mask = rows if self.window is not None or picks is not None else _scratch("mask", (take, d))
            np.not_equal(rows, 0, out=mask)
            nonzero = (np.ones(take, np.float32) @ mask).astype(np.int64)
        else:
            nonzero = np.count_nonzero(rows, axis=0)
        self.nonzero += nonzero.reshape(g, dg)
        self.n += take

    def picks(self, x: np.ndarray, total: int, take: int) -> np.ndarray | None:
        """The sorted positions of the ``take`` rows drawn from a batch ``x`` of ``total`` rows (None: every row).
        Drawn by the batch's content, not its position: distributed runs merge to the same sums."""
        if take >= total:
            return None
        probe = np.ascontiguousarray(x.reshape(-1)[:: max(1, x.size // 256)][:256]).view(np.uint32)
        key = int(np.bitwise_xor.reduce(probe.astype(np.uint64) * _MIX[: probe.size]))  # a hash of 256 values
        rng = np.random.default_rng([self.seed, total, key & 0xFFFFFFFF, key >> 32])
        return np.sort(rng.choice(total, size=take, replace=False))

    def merge(self, other: InputGram) -> None:
        """Join another process's moments of the same tensor (distributed calibration): sums add."""
        if other.gram is None:
            return
        if self.gram is None:
            self.gram, self.sums, self.nonzero = other.gram.copy(), other.sums.copy(), other.nonzero.copy()
        else:
            self.gram += other.gram
            self.sums += other.sums
            self.nonzero += other.nonzero
        self.n += other.n
        self.batches += other.batches

    def terms(self, w: np.ndarray, center: np.ndarray | None = None, step: float | None = None,
              divisor: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """``flip_descent``'s ``A`` (groups, d, d) and ``B`` (groups, out, d; None without ``step``) for weight
        ``w`` (groups, out, d) from the accumulated moments, the rows taken as the deployed layer reads them:

        * ``divisor`` (d,): each column divided by it (a ``dmq_balancer``-balanced layer);
        * ``center`` (d,): minus it (what bias correction leaves to fit): ``(x - c)'(x - c) / N`` from the Gram
          matrix, the column means and ``c``, exactly;
        * ``step``: quantized per tensor with that step before the layer. The rounding error ``e`` of an
          input value is taken as independent of the value, uniform over a step (``step^2 / 12``), and zero where
          the value is zero (exact zeros stay exact): with ``D`` the diagonal of those variances,
          ``||(Wq - W) xq - W (x - xq)||^2 / N`` is ``delta (X'X / N + D) delta' + 2 W D delta'`` up to a
          constant, so ``A = X'X / N + D`` and ``B = -W D``. The sampled rows' exact quantization error fits
          the sample's own noise too; this is its expectation."""
        release_scratch()  # the moments are read: calibration has ended
        g, dg = self.sums.shape
        n = max(1, self.n)
        a = self.gram * np.float32(1 / n)  # float32 throughout: one (groups, d, d) array and one temporary
        m = (self.sums / n).astype(np.float32)
        if divisor is not None:
            inv = (1.0 / np.asarray(divisor, np.float32)).reshape(g, dg)
            a *= inv[:, :, None]
            a *= inv[:, None, :]
            m *= inv
        if center is not None:
            c = np.asarray(center, np.float32).reshape(g, dg)
            a -= m[:, :, None] * c[:, None, :]
            a -= c[:, :, None] * (m - c)[:, None, :]  # - c m' + c c'
        lin = None
        if step is not None:
            var = ((float(step) ** 2 / 12.0) * (self.nonzero / n)).astype(np.float32)  # (groups, d)
            idx = np.arange(dg)
            a[:, idx, idx] += var
            lin = -np.asarray(w, np.float32) * var[:, None, :]
        return a, lin


#: Requests larger than this many values get a fresh array: what a thread keeps stays at most 4 MB a buffer.
SCRATCH_MAX = 2**20


def _scratch(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A float32 array of ``shape`` in this thread's reused buffer ``name`` (``core.parallel.scratch``): each
    batch's rows (0.6 MB for 512 rows of a 3 x 3 x 32 conv) and Gram product, allocated fresh, were faulted in
    page by page every batch."""
    return scratch("gram " + name, shape, np.float32, SCRATCH_MAX)


def _out_size(h: int, w: int, win: Window) -> tuple[int, int]:
    (kh, kw), (sh, sw), (pt, pl, pb, pr), (dh, dw) = win.kernel, win.strides, win.pads, win.dilations
    return (h + pt + pb - dh * (kh - 1) - 1) // sh + 1, (w + pl + pr - dw * (kw - 1) - 1) // sw + 1


def _patches(x: np.ndarray, win: Window, flat: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The im2col rows (C * kh * kw values, in the weight's (in, kh, kw) order) at output positions ``flat``,
    written into ``out`` (float32, (len(flat), C * kh * kw), C-contiguous) when given.

    A draw of rows: one gather of every (row, tap) pair's C values straight from the NCHW map (taps in the padding
    read a clipped position, then zeroed), then one copy into the rows' layout. Why: no copy of the whole map
    (padded, or transposed channels-last) for 256 rows: 1.4-4x faster on the MobileNetV2 and EfficientNet-Lite
    replicas' 3 x 3 and 5 x 5 maps, where that copy was most of learned rounding's calibration-time cost. Every
    row of a small map: per tap one strided copy of the padded map's window (1.3-2.5x faster than gathering each
    tap's rows from a channels-last copy on the ResNet-18 and MobileNetV2 replicas' maps)."""
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (dh, dw), (pt, pl) = win.kernel, win.strides, win.dilations, win.pads[:2]
    oh, ow = _out_size(h, w, win)
    if len(flat) >= n * oh * ow:
        # every position (a small map: all its rows are taken, ``flat`` is arange): per tap one strided copy of the
        # (padded) NCHW map's window into the rows' own layout, (n, oh, ow, C, kh, kw)
        pb, pr = win.pads[2:]
        xp = x
        if pt or pl or pb or pr:  # with ``out`` (InputGram's), in this thread's reused buffer: padding zeroed, map inside
            shape = (n, c, h + pt + pb, w + pl + pr)
            xp = np.empty(shape, np.float32) if out is None else _scratch("padded", shape)
            xp[:, :, :pt], xp[:, :, pt + h:], xp[:, :, :, :pl], xp[:, :, :, pl + w:] = 0.0, 0.0, 0.0, 0.0
            xp[:, :, pt:pt + h, pl:pl + w] = x
        rows = np.empty((n * oh * ow, c * kh * kw), np.float32) if out is None else out
        taps = rows.reshape(n, oh, ow, c, kh, kw)
        for i in range(kh):
            for j in range(kw):
                y, z = i * dh, j * dw
                taps[..., i, j] = xp[:, :, y:y + (oh - 1) * sh + 1:sh, z:z + (ow - 1) * sw + 1:sw].transpose(0, 2, 3, 1)
        return rows
    b, rest = np.divmod(flat, oh * ow)
    r, q = np.divmod(rest, ow)
    ti, tj = np.divmod(np.arange(kh * kw), kw)
    y = (r * sh - pt)[:, None] + ti * dh  # (rows, taps) positions in the unpadded map
    z = (q * sw - pl)[:, None] + tj * dw
    inside = (y >= 0) & (y < h) & (z >= 0) & (z < w)
    if inside.all():
        taps = x[b[:, None], :, y, z]  # (rows, taps, C)
    else:
        taps = x[b[:, None], :, np.clip(y, 0, h - 1), np.clip(z, 0, w - 1)]
        taps[~inside] = 0.0
    if out is None:
        return np.ascontiguousarray(taps.transpose(0, 2, 1)).reshape(len(flat), c * kh * kw)
    np.copyto(out.reshape(len(flat), c, kh * kw), taps.transpose(0, 2, 1))
    return out


def layer_seed(name: str) -> int:
    """A stable seed per layer (the same on every run and platform; ``hash`` of a str is salted): FNV-1a."""
    h = 2166136261
    for byte in name.encode():
        h = ((h ^ byte) * 16777619) % 2**32
    return h


# --------------------------------------------------------------------------------------------------------------
# The optimisation


def _rect_sigmoid(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """h(V) and dh/dV (zero where h is clipped)."""
    sig = 1.0 / (1.0 + np.exp(-v))
    raw = sig * (ZETA - GAMMA) + GAMMA
    h = np.clip(raw, 0.0, 1.0)
    grad = np.where((raw > 0) & (raw < 1), sig * (1 - sig) * (ZETA - GAMMA), 0.0)
    return h, grad


def output_error_terms(w: np.ndarray, x: np.ndarray, xq: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """The layer's output error as a quadratic in ``delta = Wq - W`` (per row: ``delta A delta' - 2 B . delta``
    plus a constant): ``||Wq xq - W x||^2 / N = ||delta xq - W (x - xq)||^2 / N`` gives ``A = xq' xq / N``
    (groups, d, d) and ``B = W (x - xq)' xq / N`` (groups, out, d; None when ``xq`` is ``x``)."""
    n = x.shape[1]
    if len(xq) == 1:  # one group: a 2-D xq' xq, which BLAS computes as a symmetric rank-k update (half the flops)
        gram = (xq[0].T @ xq[0])[None] / np.float32(n)
    else:
        gram = np.matmul(xq.transpose(0, 2, 1), xq) / np.float32(n)
    # W (x - xq)' xq as (W (x - xq)') xq: 2 out N d flops instead of N d^2 + out d^2
    lin = None if xq is x else np.matmul(np.matmul(w, (x - xq).transpose(0, 2, 1)), xq) / np.float32(n)
    return gram, lin


def flip_descent(values: np.ndarray, alternatives: np.ndarray, w: np.ndarray, gram: np.ndarray,
                 lin: np.ndarray | None = None, max_steps: int | None = None) -> np.ndarray:
    """Best-improvement descent over two allowed values per weight, in the weights' own units (any grid:
    AdaRound's floor/ceil codes times the scale, or the two NUQ levels around a weight).

    ``values`` (groups, out, d): the current weights; ``alternatives``: each weight's other allowed value (equal
    to ``values`` where there is none); ``gram`` (groups, d, d): ``A``, the input second moment; ``lin``:
    ``B`` (groups, out, d) or None. Each row's loss is ``delta A delta' - 2 B . delta`` with ``delta = Q - W``.
    Every step flips, in each output row, the one weight whose flip lowers the row's loss most, until no flip
    does (a local minimum: no single flip helps) or ``max_steps`` (default ``d``). A flip of weight j by
    ``e = alt - value`` changes the loss by ``2 e r_j + e^2 A_jj = 2 e h_j`` with ``r = delta A - B`` and
    ``h = r + e diag(A) / 2``; the flip adds ``e A_j`` to ``r``, and so to ``h`` everywhere but at j, where the
    sign change of ``e`` cancels it (value and alternative swap): a step costs ``O(out * d)`` in five passes
    over the working set (the product, its argmin, a row gather, its scaling, the add). Rows are independent: a
    row with no improving flip is final and leaves the working set, so late steps cost only what is still
    moving. Returns the final values; each is exactly one of the given ``values`` or ``alternatives``."""
    g, out, d = w.shape
    flipped = _flip_mask(values, alternatives, w, gram, lin, max_steps)
    return np.where(flipped, np.asarray(alternatives).reshape(g * out, d),
                    np.asarray(values).reshape(g * out, d)).reshape(g, out, d)


def _flip_mask(values: np.ndarray, alternatives: np.ndarray, w: np.ndarray, gram: np.ndarray,
               lin: np.ndarray | None, max_steps: int | None) -> np.ndarray:
    """``flip_descent``'s work: which weights take their alternative, (groups * out, d) bool."""
    g, out, d = w.shape
    n = g * out
    val0 = np.asarray(values).reshape(n, d)
    alt0 = np.asarray(alternatives).reshape(n, d)
    dtype = np.result_type(val0.dtype, gram.dtype)
    gram = np.asarray(gram, dtype)
    h = np.matmul(np.asarray(values, dtype) - w, gram)  # r = delta A - B, then h
    if lin is not None:
        h -= lin
    # the change a flip would make (0 where there is no other value: a gain of 0, never taken); C order, as h:
    # the loop writes single entries through flat views
    e = np.subtract(alt0, val0, dtype=dtype, order="C")
    h += (0.5 * e).reshape(g, out, d) * np.diagonal(gram, axis1=1, axis2=2)[:, None, :]
    del val0, alt0
    h = np.ascontiguousarray(h.reshape(n, d), dtype)
    rows = np.arange(n)  # the working set's rows
    toggles = []  # (rows, weights) flipped, step by step (a weight flipped twice is back where it started)
    gain = np.empty_like(h)  # half the gain, e h: the same argmin and sign, one multiply fewer
    at = np.arange(n) * d  # each working row's first flat index
    for _ in range(d if max_steps is None else max_steps):
        np.multiply(e, h, out=gain)
        j = gain.argmin(1)
        flat = at + j
        move = gain.reshape(-1).take(flat) < 0
        moving = int(np.count_nonzero(move))
        if not moving:
            break
        if moving < len(rows) // 2:  # most rows are final: keep only the moving ones (rows stopped are done)
            rows, h, e, j = (a[move] for a in (rows, h, e, j))
            gain, at = gain[: len(rows)], at[: len(rows)]
            flat, moving = at + j, len(rows)
        ef, hf = e.reshape(-1), h.reshape(-1)
        step, hj = ef.take(flat), hf.take(flat)  # each row's flip: e, and h at the weight, which the flip keeps
        if moving == len(rows):
            ef[flat] = -step
            toggles.append((rows, j))
        else:  # a row that stopped (no improving flip) stays as it is: a step of 0
            ef[flat[move]] = -step[move]
            toggles.append((rows[move], j[move]))
            step *= move
        if g == 1:  # one Gram matrix: a row gather (take's ``out=`` is the slower path), scaled, added in place
            upd = gram[0].take(j, axis=0)
            upd *= step[:, None]
            h += upd
        else:
            h += step[:, None] * gram[rows // out, j]
        hf[flat] = hj
    flipped = np.zeros((n, d), bool)
    for where, which in toggles:  # one weight per row and step: no repeats within one
        flipped[where, which] ^= True
    return flipped


def flip_search(codes: np.ndarray, w: np.ndarray, s: np.ndarray, gram: np.ndarray, lin: np.ndarray | None,
                qmin: int, qmax: int, max_steps: int | None = None) -> np.ndarray:
    """``flip_descent`` over AdaRound's choices (each code ``floor(w/s)`` or ``floor(w/s) + 1``, clipped to
    ``[qmin, qmax]``), starting from ``codes``: returns the final codes (float32, (groups, out, d))."""
    g, out, d = w.shape
    lo = np.floor(np.divide(w, s, dtype=np.float32))
    hi = lo + 1
    np.clip(lo, qmin, qmax, out=lo)
    np.clip(hi, qmin, qmax, out=hi)
    start = np.broadcast_to(np.asarray(codes, np.float32), (g, out, d))
    other = np.where(start == lo, hi, lo)
    del lo, hi  # not held through the descent (the records' peak, issue 17 item 7)
    sb = np.broadcast_to(s, (g, out, 1)).astype(np.float32)
    flipped = _flip_mask(sb * start, sb * other, w, gram, lin, max_steps).reshape(g, out, d)
    return np.where(flipped, other, start)


def _nearest_start(w: np.ndarray, s: np.ndarray, qmin: int, qmax: int) -> tuple[np.ndarray, int]:
    """Round-to-nearest codes and the lowest code the learned rounding may use: symmetric weights (ARQ: max |w|
    is qmax steps) keep off ``qmin``, as round-to-nearest does."""
    nearest = np.clip(np.round(w / s), qmin, qmax)
    return nearest, (-qmax if nearest.min() >= -qmax else qmin)


def learn_rounding_from_terms(weight: np.ndarray, scale: np.ndarray, gram: np.ndarray, lin: np.ndarray | None,
                              qmin: int, qmax: int) -> np.ndarray:
    """Integer codes of ``weight`` (groups, out, d) by flip descent from round-to-nearest on the output error's
    quadratic terms (``InputGram.terms``): the default's learned rounding, without the rows themselves."""
    w = np.asarray(weight, np.float32)
    s = np.broadcast_to(np.asarray(scale, np.float32), w.shape[:2] + (1,)).astype(np.float32)
    nearest, qmin = _nearest_start(w, s, qmin, qmax)
    return flip_search(nearest, w, s, gram, lin, qmin, qmax).astype(np.int64)


def learn_rounding(weight: np.ndarray, scale: np.ndarray, rows: np.ndarray, qmin: int, qmax: int,
                   options: AdaRoundOptions | None = None, quantized_rows: np.ndarray | None = None,
                   center: np.ndarray | None = None) -> np.ndarray:
    """Integer codes of ``weight`` (groups, out, d) with learned rounding, given its per-row ``scale``
    (broadcastable to (groups, out, 1)) and input ``rows`` (N, groups * d: group g reads columns
    ``g*d:(g+1)*d``). All groups and output channels are optimised together (vectorised Adam, or with
    ``solver: flips`` the flip descent alone; ``polish`` runs the descent after Adam).

    With ``quantized_rows`` (the same rows as the deployed layer sees them, quantized) the target stays the
    float output ``W x`` and the rounded weights are applied to the quantized input: the rounding then also
    absorbs what input quantization does to this layer's output. With ``center`` (the input's mean per
    column, when bias correction will run after this) both are fitted minus that mean: bias correction
    subtracts ``(Wq - W) center`` from the output, so what is left to fit is ``(Wq - W)(xq - center)``."""
    o = options or AdaRoundOptions()
    w = np.asarray(weight, np.float32)
    g, out, d = w.shape
    s = np.broadcast_to(np.asarray(scale, np.float32), (g, out, 1)).astype(np.float32)
    x = np.asarray(rows, np.float32).reshape(len(rows), g, d).transpose(1, 0, 2)  # (groups, N, d)
    xq = x if quantized_rows is None else \
        np.asarray(quantized_rows, np.float32).reshape(len(rows), g, d).transpose(1, 0, 2)
    if center is not None:
        c = np.asarray(center, np.float32).reshape(g, 1, d)
        x, xq = (x - c, x - c if xq is x else xq - c)
        xq = x if quantized_rows is None else xq
    n = x.shape[1]
    nearest, qmin = _nearest_start(w, s, qmin, qmax)
    if o.solver == "flips":
        gram, lin = output_error_terms(w, x, xq)
        return flip_search(nearest, w, s, gram, lin, qmin, qmax).astype(np.int64)
    base = np.floor(w / s)
    rest = np.clip(w / s - base, 1e-4, 1 - 1e-4)
    v = (-np.log((ZETA - GAMMA) / (rest - GAMMA) - 1)).astype(np.float32)
    # ||Wq xq - W x||^2 = ||(Wq - W) xq - W (x - xq)||^2: the gradient is 2 ((Wq - W) A - W C) with
    # A = xq' xq / N and C = (x - xq)' xq / N, (groups, d, d) each: cheaper than the rows when N > d
    gram, shift = output_error_terms(w, x, xq) if n > d or o.polish else (None, None)
    err_in = None if xq is x or gram is not None else np.matmul(w, (x - xq).transpose(0, 2, 1))  # (groups, out, N)
    m1, m2 = np.zeros_like(v), np.zeros_like(v)
    b1, b2, eps = 0.9, 0.999, 1e-8
    total = o.num_iteration
    warm = int(o.warm_start * total)
    for t in range(total):
        h, dh = _rect_sigmoid(v)
        soft = base + h
        inside = (soft >= qmin) & (soft <= qmax)
        delta = s * np.clip(soft, qmin, qmax) - w  # (groups, out, d)
        if gram is not None:
            g_delta = 2.0 * (np.matmul(delta, gram) - (shift if shift is not None else 0.0))
        else:
            e = np.matmul(delta, xq.transpose(0, 2, 1)) - (err_in if err_in is not None else 0.0)
            g_delta = (2.0 / n) * np.matmul(e, xq)
        grad = g_delta * s * inside
        if t >= warm and o.reg_param > 0:
            rel = (t - warm) / max(1, total - warm)
            beta = o.beta_range_end + (o.beta_range_start - o.beta_range_end) * max(0.0, 1.0 - rel)
            u = 2 * h - 1
            grad = grad - o.reg_param * beta * np.abs(u) ** (beta - 1) * np.sign(u) * 2
        grad = grad * dh
        m1 = b1 * m1 + (1 - b1) * grad
        m2 = b2 * m2 + (1 - b2) * grad * grad
        step = o.learning_rate * np.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1))
        v = v - (step * m1 / (np.sqrt(m2) + eps)).astype(np.float32)
    learned = np.clip(base + (v >= 0), qmin, qmax)

    def loss(codes: np.ndarray) -> np.ndarray:  # per (group, output channel), up to a constant
        delta = s * codes - w
        if gram is not None:
            return (np.matmul(delta, gram) * delta).sum(-1) - 2 * ((shift if shift is not None else 0.0) * delta).sum(-1)
        e = np.matmul(delta, xq.transpose(0, 2, 1)) - (err_in if err_in is not None else 0.0)
        return (e * e).sum(-1) / n

    # a channel whose learned rounding (thresholded: h may not have reached 0 or 1) ends up worse on the sample
    # than round-to-nearest keeps round-to-nearest: AdaRound never makes a layer's sampled output error worse
    worse = loss(learned) > loss(nearest)
    codes = np.where(worse[..., None], nearest, learned)
    if o.polish:
        codes = flip_search(codes, w, s, gram, shift, qmin, qmax)
    return codes.astype(np.int64)


# --------------------------------------------------------------------------------------------------------------
# Rounding decisions as the record keeps them


def _nearest_and_other(weight: np.ndarray, params: QuantParams) -> tuple[np.ndarray, np.ndarray]:
    """Round-to-nearest codes (as ``params.quantize``) and the other neighbour of each value (clipped)."""
    s = params._broadcast(params.scale.astype(np.float32), weight.ndim)
    x = np.divide(weight, s, dtype=np.float32)
    r = np.round(x)
    if params.num_bits <= 16 and not np.any(params.offset):  # params.quantize's codes, from the same w / s
        nearest = np.clip(r, params.qmin, params.qmax).astype(np.int64)
    else:
        nearest = params.quantize(weight)
    other = np.where(r > x, np.floor(x), np.ceil(x))
    return nearest, np.clip(other, params.qmin, params.qmax).astype(np.int64)


def rounding_flips(weight: np.ndarray, params: QuantParams, codes: np.ndarray) -> list[int]:
    """Where ``codes`` round the other way than round-to-nearest, gap-coded (first flat index, then the
    differences to the previous one): the compact form the record stores (``ada_flip``)."""
    return flip_gaps(*_nearest_and_other(weight, params), codes)


def recorded_rounding(weight: np.ndarray, params: QuantParams, codes: np.ndarray) -> tuple[list[int], np.ndarray]:
    """``rounding_flips`` and the codes the record gives back (``apply_flips`` of them), computed together: what
    a later algorithm (bias correction) reads without rounding the weight again."""
    if params.num_bits > 16 or np.any(params.offset):  # the general case, as ``rounding_flips`` and ``apply_flips``
        nearest, other = _nearest_and_other(weight, params)
        codes = np.asarray(codes).reshape(nearest.shape)
        kept = (codes != nearest) & (codes == other)
        return _gaps_of(np.flatnonzero(kept)), np.where(kept, other, nearest)
    # _nearest_and_other's values in float32 (exact integers), the other neighbour only where the codes moved
    s = params._broadcast(params.scale.astype(np.float32), weight.ndim)
    x = np.divide(weight, s, dtype=np.float32)
    r = np.round(x)
    nearest = np.clip(r, params.qmin, params.qmax)
    codes = np.asarray(codes, np.float32).reshape(nearest.shape)
    moved = np.flatnonzero(codes != nearest)  # C order, as the record's flat indices
    xm, rm = x.flat[moved], r.flat[moved]
    other = np.clip(np.where(rm > xm, np.floor(xm), np.ceil(xm)), params.qmin, params.qmax)
    kept = codes.flat[moved] == other
    flat = moved[kept]
    back = nearest.astype(np.int64)
    back.flat[flat] = other[kept]
    return _gaps_of(flat), back


def apply_flips(weight: np.ndarray, params: QuantParams, gaps: list[int]) -> np.ndarray:
    """Integer codes of ``weight``: round-to-nearest except at the gap-coded flat indices in ``gaps``, where the
    other neighbour (as ``_nearest_and_other`` gives it) is computed for those values only."""
    nearest = params.quantize(weight)
    flat = _gap_indices(gaps, nearest.size)
    s = np.broadcast_to(params._broadcast(params.scale.astype(np.float32), weight.ndim), weight.shape)
    at = np.unravel_index(flat, weight.shape)
    x = weight[at].astype(np.float32) / s[at]
    other = np.clip(np.where(np.round(x) > x, np.floor(x), np.ceil(x)).astype(np.int64), params.qmin, params.qmax)
    codes = nearest.reshape(-1)
    codes[flat] = other
    return codes.reshape(nearest.shape)


def flip_gaps(nearest: np.ndarray, other: np.ndarray, codes: np.ndarray) -> list[int]:
    """Where ``codes`` take ``other`` instead of ``nearest`` (any grid: uniform codes or NUQ levels), as
    gap-coded flat indices: first index, then the differences to the previous one."""
    codes = np.asarray(codes).reshape(nearest.shape)
    return _gaps_of(np.flatnonzero((codes != nearest) & (codes == other)))


def _gaps_of(flat: np.ndarray) -> list[int]:
    """Increasing flat indices, gap-coded: the first index, then the differences to the previous one."""
    return np.diff(flat, prepend=0).astype(np.int64).tolist() if flat.size else []


def _gap_indices(gaps: list[int], size: int) -> np.ndarray:
    """The flat indices of gap-coded ``gaps``, checked against a weight of ``size`` values."""
    steps = np.asarray(gaps, np.int64)  # the list converted once (a BERT layer's record: ~10^4 flips)
    flat = np.cumsum(steps)
    if flat.size and (flat[-1] >= size or np.any(steps[1:] <= 0)):
        raise ValueError(f"rounding flips index {int(flat[-1])} of a weight with {size} values, "
                         "or are not increasing")
    return flat


def apply_gaps(nearest: np.ndarray, other: np.ndarray, gaps: list[int]) -> np.ndarray:
    """``nearest`` with ``other`` at the gap-coded flat indices in ``gaps`` (the inverse of ``flip_gaps``)."""
    flat = _gap_indices(gaps, nearest.size)
    codes = nearest.reshape(-1).copy()
    codes[flat] = other.reshape(-1)[flat]
    return codes.reshape(nearest.shape)
