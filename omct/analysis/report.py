"""A self-contained HTML page for an ``AnalysisReport``: table, per-layer error bars, histograms of the worst
layers' float vs quantized values. Plots are PNGs embedded as base64 (matplotlib, the ``report`` extra);
without matplotlib the page has the table only and says how to get the plots."""

from __future__ import annotations

import base64
import html
import io
import math
import os

import numpy as np

from omct.analysis.compare import AnalysisReport
from omct.fileio import atomic_write_text


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _plots(report: AnalysisReport, worst: int) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    names = [e.layer for e in report.layers]
    y = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.28 * len(names) + 1)))
    ax.barh(y - 0.2, [1 - e.accumulated.cosine for e in report.layers], height=0.4, label="accumulated (in the quantized model)")
    ax.barh(y + 0.2, [1 - e.isolated.cosine for e in report.layers], height=0.4, label="isolated (this layer alone)")
    ax.axvline(1 - report.threshold, color="red", linestyle="--", label=f"threshold (cosine {report.threshold})")
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("symlog", linthresh=1e-4)
    ax.set_xlabel("1 - cosine similarity (float vs quantized)")
    ax.legend(fontsize=8)
    out.append(("Per-layer error", _png(fig)))
    plt.close(fig)
    for e in sorted(report.layers, key=lambda e: e.cosine)[:worst]:
        if e.layer not in report.samples:
            continue
        f, q = report.samples[e.layer]
        fig, ax = plt.subplots(figsize=(7, 3))
        lo, hi = float(min(f.min(), q.min())), float(max(f.max(), q.max()))
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 80)
        ax.hist(f, bins=bins, alpha=0.6, label="float")
        ax.hist(q, bins=bins, alpha=0.6, label="quantized")
        ax.set_yscale("log")
        ax.set_title(f"{e.layer} ({e.op_type}): cosine {e.cosine:.4f}, SQNR {e.accumulated.sqnr_db:.1f} dB", fontsize=9)
        ax.legend(fontsize=8)
        out.append((f"Values of {e.layer}", _png(fig)))
        plt.close(fig)
    return out


def _fmt(v: float, digits: int) -> str:
    return "inf" if math.isinf(v) else f"{v:.{digits}f}"


def _summary(report: AnalysisReport, worst: int = 3) -> str:
    """The box on top: what the model's outputs lost, the worst layers, and what to skip (or why nothing)."""
    items = []
    for name, e in report.outputs.items():
        items.append(f"<li>model output <code>{html.escape(name)}</code>: cosine {e.cosine:.5f}, SQNR "
                     f"{_fmt(e.sqnr_db, 1)} dB, max abs error {e.max_abs:.4g}</li>")
    ranked = sorted(report.layers, key=lambda e: e.cosine)[:worst]
    if ranked:
        worst_list = ", ".join(f"<code>{html.escape(e.layer)}</code> ({e.cosine:.5f}, alone {e.isolated.cosine:.5f})"
                               for e in ranked)
        items.append(f"<li>worst layers (accumulated cosine, isolated cosine): {worst_list}</li>")
    flagged = report.flagged()
    flagged_list = ", ".join(html.escape(e.layer) for e in flagged) or "none"
    items.append(f"<li>flagged (accumulated cosine below {report.threshold}), worst own error first: "
                 f"<b>{flagged_list}</b></li>")
    skip = report.suggested_skip_layers()
    if skip:
        items.append("<li>suggested <code>skip_layers</code> (bad on their own, not only downstream of a bad layer): "
                     f"<code>{html.escape(str(skip))}</code>; on the command line "
                     f"<code>--skip {html.escape(' '.join(skip))}</code></li>")
    elif flagged:
        items.append("<li>suggested <code>skip_layers</code>: none bad on its own (the flagged layers inherit error "
                     "from upstream; skipping them would not repair it)</li>")
    for name, reason in report.not_compared.items():
        items.append(f"<li>not compared: <code>{html.escape(name)}</code>: {html.escape(reason)}</li>")
    return (f'<div id="summary"><p>{len(report.layers)} quantized layers compared on {report.batches} batch(es).</p>'
            f"<ul>{''.join(items)}</ul></div>")


def render_html(report: AnalysisReport, title: str = "omct quantization analysis", worst: int = 3) -> str:
    flagged = {e.layer for e in report.flagged()}
    rows = []
    for e in report.layers:
        cls = ' class="bad"' if e.layer in flagged else ""
        rows.append(f"<tr{cls}><td>{html.escape(e.layer)}</td><td>{e.op_type}</td><td>{e.cosine:.5f}</td>"
                    f"<td>{_fmt(e.accumulated.sqnr_db, 1)}</td><td>{e.accumulated.max_abs:.4g}</td>"
                    f"<td>{e.isolated.cosine:.5f}</td><td>{_fmt(e.isolated.sqnr_db, 1)}</td>"
                    f"<td>{'-' if e.input_scale is None else f'{e.input_scale:.4g}'}</td>"
                    f"<td>{'-' if e.clipped_fraction is None else f'{100 * e.clipped_fraction:.3f}%'}</td></tr>")
    try:
        plots = _plots(report, worst)
        figures = "".join(f'<h2>{html.escape(t)}</h2><img alt="{html.escape(t)}" src="data:image/png;base64,{b}">'
                          for t, b in plots)
    except ImportError:
        figures = "<p>Plots need matplotlib: <code>pip install 'omct[report]'</code>.</p>"
    summary = _summary(report)
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:70em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}} td:first-child{{text-align:left}}
tr.bad{{background:#fdd}} img{{max-width:100%}}
#summary{{background:#f4f4f8;padding:0.5em 1em;border:1px solid #ccd}}</style></head><body>
<h1>{html.escape(title)}</h1>
{summary}
<table id="layers"><tr><th>layer</th><th>op</th><th>cosine</th><th>SQNR dB</th><th>max abs error</th>
<th>isolated cosine</th><th>isolated SQNR dB</th><th>input scale</th><th>input clipped</th></tr>
{''.join(rows)}
</table>
<p>Accumulated: the layer's result in the quantized model vs the float model. Isolated: the layer alone
quantized, on the float model's input to it.</p>
{figures}
</body></html>
"""


def write_html(report: AnalysisReport, path: str | os.PathLike, title: str = "omct quantization analysis") -> None:
    atomic_write_text(path, render_html(report, title))
