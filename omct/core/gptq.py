"""Output-aware assignment of weights to per-row grids (GPTQ: Frantar et al., "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers", 2022).

Round-to-nearest minimises each weight's own error; a layer's output error ``(W - Q) H (W - Q)^T`` (``H =
E[x x^T]``, the second moment of its input) also depends on how the errors of correlated inputs add up.
GPTQ quantizes one column (input) at a time and moves the not yet quantized columns of the same row to
compensate for the error just made (optimal brain surgeon updates through the Cholesky factor of ``H^-1``),
so the errors cancel in the output instead of adding up.

Here a row's grid is any sorted table of values (uniform INT-k levels times a scale, or NUQ's level table), so
the same function serves uniform and non-uniform weights. With ``bracket`` each weight may only take one of
the two table values around its original value (round-to-nearest or the other way): the result is then
representable as "which weights round the other way", the compact form omct's record stores.

Cost: ``O(rows * cols^2 + cols^3)`` flops (the ``H`` inverse, the error feedback done as matrix products per
block of ``block`` columns) and at most 3 ``cols^2`` float64 values at once besides the caller's ``H`` (and
``O(rows * cols)``); the per-column Python loop does ``O(rows * L)`` work for ``L`` table values.
Deterministic: no randomness, ties go to the lower value.
"""

from __future__ import annotations

import numpy as np

#: GPTQ's damping: ``H + DAMP * mean(diag(H)) * I`` keeps the inverse well conditioned when H is estimated from
#: fewer samples than inputs (a sample of conv patches) or has dead inputs.
DAMP = 0.01


def nearest_index(values: np.ndarray, tables: np.ndarray) -> np.ndarray:
    """Index into each row's sorted table (``tables``: [rows, L]) of the entry nearest to ``values`` ([rows] or
    [rows, n]); ties to the lower entry (and to the first of repeated entries)."""
    v = np.asarray(values, np.float64)
    mids = (tables[:, 1:] + tables[:, :-1]) / 2  # [rows, L - 1]
    if v.ndim == 1:
        return (v[:, None] > mids).sum(1)
    return np.stack([np.searchsorted(mids[r], v[r], side="left") for r in range(v.shape[0])])


def bracket_indices(weight: np.ndarray, tables: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each weight ([rows, cols]), the index of its nearest table value and of the neighbour on the other
    side of it (the same index where there is none: at the ends of the table or exactly on a value)."""
    w = np.asarray(weight, np.float64)
    near = nearest_index(w, tables)
    at = np.take_along_axis(tables, near, 1)
    other = np.clip(np.where(w > at, near + 1, np.where(w < at, near - 1, near)), 0, tables.shape[1] - 1)
    return near, other


def damped_cholesky_inverse(h: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """Upper triangular ``U`` with ``U^T U = (H + damp * mean(diag H) * I)^-1``: GPTQ's ``Hinv``.

    With ``J`` the order reversal, ``J H J = L L^T`` gives ``H = (J L J)(J L J)^T`` with ``J L J`` upper, so
    ``U = (J L J)^-1``: one Cholesky factorisation and one inverse, about 3 ``cols^2`` float64 values at once."""
    rev = np.array(np.asarray(h, np.float64)[::-1, ::-1])
    diag = np.diag(rev)
    scale = float(diag.mean()) if diag.size and diag.mean() > 0 else 1.0
    rev[np.diag_indices(len(rev))] += damp * scale
    lower = np.linalg.cholesky(rev)
    del rev
    return upper_triangular_inverse(np.ascontiguousarray(lower[::-1, ::-1]))


def upper_triangular_inverse(u: np.ndarray, leaf: int = 256) -> np.ndarray:
    """The inverse of an invertible upper triangular matrix, by blocks: ``[[A, B], [0, C]]^-1 = [[A^-1,
    -A^-1 B C^-1], [0, C^-1]]``. Why: numpy has no triangular inverse, and ``np.linalg.inv`` (an LU
    factorisation, about ``2 n^3`` flops) took most of GPTQ's time on wide layers; by blocks it is about
    ``n^3 / 3`` flops, nearly all in matrix products."""
    n = len(u)
    if n <= leaf:
        return np.triu(np.linalg.inv(u))
    h = n // 2
    a_inv = upper_triangular_inverse(u[:h, :h], leaf)
    c_inv = upper_triangular_inverse(u[h:, h:], leaf)
    out = np.zeros_like(u)
    out[:h, :h] = a_inv
    out[h:, h:] = c_inv
    out[:h, h:] = -(a_inv @ u[:h, h:]) @ c_inv
    return out


def assign(weight: np.ndarray, tables: np.ndarray, h: np.ndarray, bracket: bool = False, block: int = 128,
           act_order: bool = True, damp: float = DAMP) -> np.ndarray:
    """Indices [rows, cols] into each row's table (``tables``: [rows, L], sorted values in the weight's units)
    that make ``(W - Q) H (W - Q)^T`` small, GPTQ's way.

    ``weight``: [rows, cols] (output channels x inputs), ``h``: [cols, cols] second moment of the inputs.
    ``bracket``: every weight stays on one of the two table values around its original value. ``act_order``:
    quantize the inputs with the largest ``H`` diagonal first (GPTQ's act-order; the result is returned in the
    original column order)."""
    w = np.array(weight, np.float64)
    tables = np.asarray(tables, np.float64)
    rows, cols = w.shape
    if tables.ndim != 2 or tables.shape[0] != rows or h.shape != (cols, cols):
        raise ValueError(f"weight {w.shape}, tables {tables.shape} and H {h.shape} do not match")
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(cols)
    w = w[:, perm]
    hinv = damped_cholesky_inverse(np.asarray(h)[np.ix_(perm, perm)], damp)
    if bracket:
        lo_hi = bracket_indices(w, tables)
        lo = np.minimum(*lo_hi)
        hi = np.maximum(*lo_hi)
    idx = np.zeros((rows, cols), np.int64)
    for start in range(0, cols, block):
        stop = min(start + block, cols)
        err = np.zeros((rows, stop - start))
        for j in range(start, stop):
            col = w[:, j]
            if bracket:
                a = np.take_along_axis(tables, lo[:, j:j + 1], 1)[:, 0]
                b = np.take_along_axis(tables, hi[:, j:j + 1], 1)[:, 0]
                k = np.where(np.abs(col - b) < np.abs(col - a), hi[:, j], lo[:, j])
            else:
                k = nearest_index(col, tables)
            idx[:, j] = k
            q = np.take_along_axis(tables, k[:, None], 1)[:, 0]
            e = (col - q) / hinv[j, j]
            w[:, j + 1:stop] -= np.outer(e, hinv[j, j + 1:stop])
            err[:, j - start] = e
        if stop < cols:
            w[:, stop:] -= err @ hinv[start:stop, stop:]
    out = np.empty_like(idx)
    out[:, perm] = idx
    return out


def output_error(weight: np.ndarray, quantized: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Each row's output error ``(w - q) H (w - q)^T`` (mean squared output error when ``H = E[x x^T]``)."""
    d = np.asarray(weight, np.float64) - np.asarray(quantized, np.float64)
    return ((d @ np.asarray(h, np.float64)) * d).sum(1)
