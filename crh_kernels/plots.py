"""Figures of a :class:`crh_kernels.report.Report` (matplotlib, imported lazily, Agg canvas).

Imported by :meth:`Report.plot` (lazily) and by the experiments' own figures (:func:`figure`,
:func:`save_figure`); it reads a report duck-typed and takes every fit from
:mod:`crh_kernels.analysis`, never importing :mod:`crh_kernels.report`. It uses matplotlib's
object API with an Agg canvas (never ``pyplot``), so it neither needs a display nor changes a
notebook's backend.

* ``alpha.png`` — the six α per layer (paper Figs. 5, 18): one line per relation, covariance
  and second-moment panels; per-head layers are grouped by module (mean, min–max band). With
  standard errors (``Collector(blocks=K)``, issue 16) each single layer's α has its 95 %
  interval as a vertical bar (``se.interval``: the jackknife's, around the bias-corrected α).
* ``spectra.png`` — sorted eigenvalues λ_H,i against λ_G,i (log-log) of H_b and G_b per layer,
  heads of one module in different colours, with the fitted slope and grey reference lines of
  slopes 1, 2, 3 (paper Fig. 3).
* ``exponents.png`` — h_i and g_i against z_i in W's singular basis with the fitted p and q.
* ``phase.png`` — the (p, q) plane: the six relation lines, the phase points of docs/spec.md §4 and
  each layer as a point, filled when the verdict's exponent reading named its phase through the
  gates, hollow (with the failed gates, or "z flat") when it did not; with standard errors, the
  95 % intervals of p and q as a cross.
* ``heatmap_<layer>.png`` — H, G, Z of a layer (b and a sides; paper Fig. 2).

Every figure has a title saying what it shows, and a panel that cannot show what it is for (an
exponent fit on too few modes, a spectrum without a slope) says why on the panel.
* ``alpha_series.png`` — the six α against the training step, one panel per layer (heads of a
  module: mean and min–max band), when the report has an α series (paper Fig. 6); with standard
  errors, error bars α ± t_{K−1}·se at each point of a single layer.
"""
from __future__ import annotations

import math
import os
import re
from typing import Callable, Dict, List, Optional

import numpy as np

from .analysis import LINES, PHASES, RELATIONS, pairing_fit

__all__ = ["plot_report", "plot_alpha", "plot_spectra", "plot_exponents", "plot_phase",
           "plot_heatmaps", "plot_alpha_series", "unavailable", "heatmap_layers", "MAX_HEATMAPS"]

_REL = RELATIONS
_COLORS = {"forward_RGA": "#d62728", "forward_RWA": "#ff7f0e", "forward_GWA": "#bcbd22",
           "backward_RGA": "#1f77b4", "backward_RWA": "#17becf", "backward_GWA": "#9467bd"}


def figure(w: float, h: float):
    """A matplotlib Figure on an Agg canvas (no pyplot, no display)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("Report.plot needs matplotlib: pip install 'crh-kernels[plot]'") from exc
    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path) -> str:
    """Lay out and write ``fig`` as PNG at ``path`` (parent folders created)."""
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return str(path)


def _f(v) -> float:
    return float("nan") if v is None else float(v)


def _multiplier(rep, k) -> Optional[float]:
    """The interval half-width in standard errors: the report's (meta.jackknife.z), else
    t_{K−1} of ``k``; None when neither is known."""
    z = (getattr(rep, "meta", None) or {}).get("jackknife") or {}
    if isinstance(z.get("z"), (int, float)):
        return float(z["z"])
    if isinstance(k, int) and k >= 2:
        from .analysis.errors import multiplier
        return multiplier(k)
    return None


def _groups(rep) -> Dict[str, List[str]]:
    """Layer names grouped for plotting: a layer alone, heads by their module."""
    out: Dict[str, List[str]] = {}
    for name, e in rep.layers.items():
        key = e.get("parent") if e.get("kind") == "head" and e.get("parent") else name
        out.setdefault(key, []).append(name)
    return out


def _short(name: str, width: int = 18) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


def _log_ticks(ax) -> None:
    """Small labels, and no minor-tick labels (they pile up on short log ranges)."""
    from matplotlib.ticker import NullFormatter
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.tick_params(labelsize=7)


def _pick(items: list, k: Optional[int]) -> list:
    if k is None or len(items) <= k:
        return items
    idx = np.unique(np.linspace(0, len(items) - 1, k).round().astype(int))
    return [items[i] for i in idx]


#: How many heatmap figures a run draws (``crh run`` and ``crh report`` alike).
MAX_HEATMAPS = 8


def _heatmap_groups(rep, max_heatmaps: Optional[int]) -> list:
    return _pick(list(_groups(rep).items()), max_heatmaps)


def heatmap_layers(rep, max_heatmaps: Optional[int] = MAX_HEATMAPS, max_heads: int = 8) -> List[str]:
    """The layers whose matrices :func:`plot_heatmaps` draws with these limits (what a run
    saves so that ``crh report`` can draw the same heatmaps again)."""
    out = []
    for _, members in _heatmap_groups(rep, max_heatmaps):
        kind = (rep.layers.get(members[0]) or {}).get("kind")
        out += members[:max_heads] if kind == "head" else members[:1]
    return out


def _fit_gap(fit) -> Optional[str]:
    """Why an exponent fit (a :class:`LineFit` dict) has no slope, in short lines for a panel;
    None when it has one."""
    if not fit:
        return "not fitted"
    if fit.get("slope") is not None:
        return None
    n = fit.get("n_modes") or 0
    if n < 2:
        return (f"a fit needs ≥ 2 modes\nabove the floor; this layer\nhas "
                f"{n} ({'a single singular value' if n == 1 else 'none'})")
    return f"z is flat on its {n} modes\n(Z ∝ a projection)"


# ---------------------------------------------------------------------------- alpha per layer
def plot_alpha(rep, path: str) -> str:
    groups = _groups(rep)
    names = list(groups)
    x = np.arange(len(names))
    fig = figure(max(6.0, 1.0 + 0.45 * len(names)) * 2, 4.2)
    bars = False
    for j, (key, title) in enumerate((("alpha_cov", "α on covariances"),
                                      ("alpha_second", "α on second moments"))):
        ax = fig.add_subplot(1, 2, j + 1)
        for rel in _REL:
            mean, lo, hi = [], [], []
            for g in names:
                vals = np.array([_f((rep.layers[n].get(key) or {}).get(rel)) for n in groups[g]])
                ok = vals[np.isfinite(vals)]
                mean.append(ok.mean() if ok.size else np.nan)
                lo.append(ok.min() if ok.size else np.nan)
                hi.append(ok.max() if ok.size else np.nan)
            mean = np.array(mean)
            if not np.isfinite(mean).any():
                continue
            style = "-" if rel.startswith("forward") else "--"
            ax.plot(x, mean, style, marker="o", ms=3, color=_COLORS[rel], label=rel.replace("_", " "))
            if any(len(groups[g]) > 1 for g in names):
                ax.fill_between(x, lo, hi, color=_COLORS[rel], alpha=0.15, lw=0)
            # 95 % intervals of single layers (issue 16), with caps
            iv = [((rep.layers[groups[g][0]].get("se") or {}).get("interval") or {}).get(key, {})
                  .get(rel) if len(groups[g]) == 1 else None for g in names]
            at = [i for i, v in enumerate(iv) if v is not None]
            if at:
                bars = True
                los, his = [iv[i][0] for i in at], [iv[i][1] for i in at]
                ax.vlines(x[at], los, his, color=_COLORS[rel], lw=1.4)
                for ends in (los, his):
                    ax.hlines(ends, x[at] - 0.06, x[at] + 0.06, color=_COLORS[rel], lw=1.0)
        ax.axhline(0.0, color="0.8", lw=0.8)
        ax.set_ylim(-1.05, 1.05)
        ax.set_xticks(x)
        ax.set_xticklabels([_short(n) for n in names], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("α")
        ax.set_title(title)
        if j == 0:
            ax.legend(fontsize=7, ncol=2, loc="lower left")
    jk = (getattr(rep, "meta", None) or {}).get("jackknife") or {}
    bar_text = (f"\nbars: 95 % intervals ({jk.get('method', 'jackknife')}, K={jk.get('k')} blocks; "
                f"Tukey's interval around the bias-corrected α)" if bars else "")
    fig.suptitle("Alignment α of the six CRH relations per layer (1 = proportional matrices)\n"
                 "solid: forward = the layer's output side (H_b, G_b, Z_b); dashed: backward = its "
                 "input side (H_a, G_a, Z_a)" + bar_text, fontsize=9)
    return save_figure(fig, path)


# ------------------------------------------------------------------------ eigenvalue scatter
def _ref_lines(ax, x: np.ndarray, y: np.ndarray) -> None:
    """Grey dashed power laws λ_H ∝ λ_G^k, k = 1, 2, 3, through the point of largest λ_G."""
    if x.size == 0:
        return
    i = int(np.argmax(x))
    xs = np.array([x.min(), x.max()])
    for k in (1, 2, 3):
        ax.plot(xs, y[i] * (xs / x[i]) ** k, "--", color="0.6", lw=0.8)


def _fit_ranks(lh: np.ndarray, lg: np.ndarray, floor: float) -> int:
    """How many ranks :func:`~crh_kernels.analysis.pairing_fit` would fit (its support)."""
    ok = np.isfinite(lh) & np.isfinite(lg) & (lh > 0) & (lg > 0)
    if not ok.any():
        return 0
    return int((ok & (lh > floor * lh[ok].max()) & (lg > floor * lg[ok].max())).sum())


def plot_spectra(rep, path: str, max_panels: Optional[int] = 24) -> str:
    groups = _pick(list(_groups(rep).items()), max_panels)
    n = max(1, len(groups))
    ncol = min(4, n)
    nrow = math.ceil(n / ncol)
    fig = figure(3.2 * ncol, 3.0 * nrow)
    cmap = None
    try:
        from matplotlib import colormaps
        cmap = colormaps["tab10"]
    except Exception:  # pragma: no cover - old matplotlib
        pass
    for k, (gname, members) in enumerate(groups):
        ax = fig.add_subplot(nrow, ncol, k + 1)
        slopes, side, shown, ranks = [], "b", 0, []
        for c, name in enumerate(members):
            sp = rep.spectra(name)
            if "H_b" in sp and "G_b" in sp:
                lh, lg = sp["H_b"], sp["G_b"]
                side = "b"
            elif "H_a" in sp and "G_a" in sp:
                lh, lg = sp["H_a"], sp["G_a"]
                side = "a"
            else:
                continue
            shown += 1
            m = min(lh.size, lg.size)
            lh, lg = lh[:m], lg[:m]
            ok = np.isfinite(lh) & np.isfinite(lg) & (lh > 0) & (lg > 0)
            ok &= (lh > 1e-9 * np.nanmax(lh)) & (lg > 1e-9 * np.nanmax(lg)) if ok.any() else ok
            color = cmap(c % 10) if cmap is not None else None
            ranks.append(_fit_ranks(lh, lg, 1e-6))
            ax.scatter(lg[ok], lh[ok], s=6, color=color, alpha=0.8)
            if c == 0:
                _ref_lines(ax, lg[ok], lh[ok])
            fit = pairing_fit(lh, lg, 1e-6)
            if fit is not None and ok.any():
                xs = np.array([lg[ok].min(), lg[ok].max()])
                ax.plot(xs, np.exp(fit[1]) * xs ** fit[0], "-", color=color, lw=1)
                slopes.append(fit[0])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"λ_G ({'G_b' if side == 'b' else 'G_a'})", fontsize=8)
        ax.set_ylabel(f"λ_H ({'H_b' if side == 'b' else 'H_a'})", fontsize=8)
        title = _short(gname, 28)
        if slopes:
            title += f"\nslope {np.mean(slopes):.2f}" + (f" ({min(slopes):.2f}–{max(slopes):.2f})"
                                                          if len(slopes) > 1 else "")
        else:
            title += "\nslope -"
        ax.set_title(title, fontsize=8)
        if not shown:
            have = sorted(rep.spectra(members[0]))
            why = ("no spectra: needs H and G of one side\n(this layer has "
                   + (", ".join(have) if have else "none") + ")")
        elif not slopes:
            n_ranks = max(ranks) if ranks else 0
            why = ("no slope: a fit needs ≥ 3 ranks\nwith both λ above 10⁻⁶ of their\nmaximum "
                   f"(this layer has {n_ranks})" if n_ranks < 3 else
                   "no slope: λ_G is flat on the ranks above 10⁻⁶\nof its maximum")
        else:
            why = None
        if why:
            ax.text(0.5, 0.5, why, transform=ax.transAxes, ha="center", va="center", fontsize=7,
                    color="0.3")
        _log_ticks(ax)
    fig.suptitle("Sorted eigenvalues of H against those of G, paired by rank (paper Fig. 3)\n"
                 "output side H_b, G_b where collected; grey dashed: slopes 1, 2, 3", fontsize=9)
    return save_figure(fig, path)


# ---------------------------------------------------------------------------- h, g against z
def plot_exponents(rep, path: str, max_panels: Optional[int] = 24) -> str:
    names = [n for n, e in rep.layers.items() if e.get("exponents")]
    names = _pick(names, max_panels)
    n = max(1, len(names))
    ncol = min(4, n)
    nrow = math.ceil(n / ncol)
    fig = figure(3.2 * ncol, 3.0 * nrow)
    for k, name in enumerate(names):
        ax = fig.add_subplot(nrow, ncol, k + 1)
        ex = rep.layers[name]["exponents"]
        z = np.array([_f(v) for v in ex["z"]])
        for key, fit, color, label in (("h", ex["p"], "#1f77b4", "h (H_a)"),
                                       ("g", ex["q"], "#d62728", "g (G_a)")):
            y = np.array([_f(v) for v in ex[key]])
            ok = np.isfinite(z) & np.isfinite(y) & (z > 0) & (y > 0)
            ax.scatter(z[ok], y[ok], s=6, color=color, alpha=0.7, label=label)
            if fit and fit.get("slope") is not None and ok.any():
                zs = np.array([z[ok].min(), z[ok].max()])
                ax.plot(zs, np.exp(fit["intercept"]) * zs ** fit["slope"], color=color, lw=1)
        e = rep.layers[name]
        p, q = e.get("p"), e.get("q")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("z = s² of W", fontsize=8)
        ax.set_title(f"{_short(name, 28)}\np={'-' if p is None else f'{p:.2f}'} "
                     f"q={'-' if q is None else f'{q:.2f}'}", fontsize=8)
        gp, gq = _fit_gap(ex.get("p")), _fit_gap(ex.get("q"))
        gaps = ([f"p, q undefined:\n{gp}"] if gp and gp == gq else
                [f"{w} undefined:\n{g}" for w, g in (("p", gp), ("q", gq)) if g])
        if gaps:
            ax.text(0.5, 0.5, "\n".join(gaps), transform=ax.transAxes, ha="center", va="center",
                    fontsize=7, color="0.3")
        _log_ticks(ax)
        if k == 0:
            ax.legend(fontsize=7)
    if not names:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no layer has exponents\n(needs W, H_a and G_a)", ha="center", va="center")
        ax.set_axis_off()
    fig.suptitle("Exponents in W's singular basis (docs/spec.md §4), one panel per layer with a weight\n"
                 "h_i = v_iᵀH_a v_i ~ z_i^p and g_i = v_iᵀG_a v_i ~ z_i^q, z_i = s_i²", fontsize=9)
    return save_figure(fig, path)


# ------------------------------------------------------------------------------ phase diagram
def plot_phase(rep, path: str) -> str:
    fig = figure(6.4, 5.6)
    ax = fig.add_subplot(1, 1, 1)
    pts = [(n, e["p"], e["q"]) for n, e in rep.layers.items()
           if e.get("p") is not None and e.get("q") is not None]
    lo_p, hi_p, lo_q, hi_q = -2.0, 3.5, -1.0, 4.0
    if pts:
        ps = np.array([p for _, p, _ in pts])
        qs = np.array([q for _, _, q in pts])
        lo_p, hi_p = min(lo_p, ps.min() - 0.5), max(hi_p, ps.max() + 0.5)
        lo_q, hi_q = min(lo_q, qs.min() - 0.5), max(hi_q, qs.max() + 0.5)
    pp = np.linspace(lo_p, hi_p, 2)
    for name, ln in LINES.items():
        color = _COLORS.get(name, "0.5")
        style = "-" if name.startswith("forward") else "--"
        if ln.b != 0:
            ax.plot(pp, (ln.c - ln.a * pp) / ln.b, style, color=color, lw=1.2, label=ln.label)
        else:
            ax.axvline(ln.c / ln.a, ls=style, color=color, lw=1.2, label=ln.label)
    for ph, info in PHASES.items():
        if info.point is not None:
            ax.plot(*info.point, "kx", ms=7)
            ax.annotate(ph, info.point, textcoords="offset points", xytext=(4, 4), fontsize=7)
    if pts:
        try:
            from matplotlib import colormaps
            cmap = colormaps["viridis"]
        except Exception:  # pragma: no cover
            cmap = None
        hollow = 0
        for i, (name, p, q) in enumerate(pts):
            color = cmap(i / max(1, len(pts) - 1)) if cmap is not None else None
            # the verdict's exponent reading (issue 13): a filled point named a phase through
            # the gates; a hollow one did not (gates failed, or z flat on the effective support)
            ex = (rep.layers[name].get("verdict") or {}).get("exponent") or {}
            named = ex.get("phase") not in (None, "undetermined", "flat", "not applicable")
            tag = _short(name, 16)
            if ex.get("phase") == "undetermined":
                tag += " (undet: " + ",".join(ex.get("failed") or []) + ")"
            elif ex.get("phase") == "flat":
                tag += " (z flat)"
            iv = (rep.layers[name].get("se") or {}).get("interval") or {}
            if iv.get("p") is not None:      # 95 % intervals of p and q (issue 16)
                ax.hlines(q, iv["p"][0], iv["p"][1], color=color, lw=1.0)
            if iv.get("q") is not None:
                ax.vlines(p, iv["q"][0], iv["q"][1], color=color, lw=1.0)
            if named or not ex:
                ax.plot(p, q, "o", color=color, ms=7, mec="k", mew=0.5)
            else:
                hollow += 1
                ax.plot(p, q, "o", mfc="none", mec=color, ms=7, mew=1.2)
            ax.annotate(tag, (p, q), textcoords="offset points", xytext=(5, -9),
                        fontsize=7, color="0.2")
        if hollow:
            ax.text(0.99, 0.06, "hollow: no phase named (a fit gate failed, or z is flat on the "
                    "effective support; report.json: verdict.exponent)", transform=ax.transAxes,
                    ha="right", va="bottom", fontsize=6.5, color="0.3")
        left = [n for n, e in rep.layers.items() if e.get("p") is None or e.get("q") is None]
        if left:
            ax.text(0.99, 0.01, f"not placed, p or q undefined: {', '.join(_short(n, 16) for n in left[:4])}"
                    + (f" and {len(left) - 4} more" if len(left) > 4 else ""),
                    transform=ax.transAxes, ha="right", va="bottom", fontsize=7, color="0.3")
    else:
        ax.text(0.5, 0.02, "no layer has (p, q): each needs W, H_a and G_a, and ≥ 2 modes above the floor",
                transform=ax.transAxes, ha="center", fontsize=8)
    ax.set_xlim(lo_p, hi_p)
    ax.set_ylim(lo_q, hi_q)
    ax.set_xlabel("p   (h ~ z^p)")
    ax.set_ylabel("q   (g ~ z^q)")
    ax.set_title("Phase diagram (docs/spec.md §4, the paper's Table 1): layers in the (p, q) plane", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    return save_figure(fig, path)


# ------------------------------------------------------------------------------------ heatmaps
def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "model"


def _heat(fig, nrow, ncol, k, m: Optional[np.ndarray], title: str):
    ax = fig.add_subplot(nrow, ncol, k)
    if m is None:
        ax.text(0.5, 0.5, "not collected", ha="center", va="center", fontsize=8)
        ax.set_axis_off()
    else:
        v = float(np.abs(m).max()) or 1.0
        im = ax.imshow(m, cmap="RdBu_r", vmin=-v, vmax=v, interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=6)
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_title(title, fontsize=8)


def plot_heatmaps(rep, out_dir: str, max_heatmaps: Optional[int] = None,
                  max_heads: int = 8) -> List[str]:
    paths = []
    groups = _heatmap_groups(rep, max_heatmaps)
    for gname, members in groups:
        if not any(rep.matrices.get(n) for n in members):
            continue
        if rep.layers[members[0]].get("kind") == "head":
            heads = members[:max_heads]
            fig = figure(5.0, 2.4 * len(heads))
            for i, name in enumerate(heads):
                mats = rep.matrices.get(name, {})
                _heat(fig, len(heads), 2, 2 * i + 1, mats.get("H_b"), f"{_short(name, 24)}: H_b")
                _heat(fig, len(heads), 2, 2 * i + 2, mats.get("G_b"), "G_b")
            fig.suptitle(f"{gname}: per-head H_b, G_b (covariances of each head's output and its "
                         f"gradient; {len(heads)} of {len(members)} heads)", fontsize=9)
        else:
            name = members[0]
            mats = rep.matrices.get(name, {})
            fig = figure(9.0, 5.6)
            for i, key in enumerate(("H_b", "G_b", "Z_b", "H_a", "G_a", "Z_a")):
                _heat(fig, 2, 3, i + 1, mats.get(key), key)
            fig.suptitle(f"{name}: H, G, Z (paper Fig. 2). Top: output side (H_b, G_b, Z_b = WWᵀ); "
                         "bottom: input side (H_a, G_a, Z_a = WᵀW)", fontsize=9)
        paths.append(save_figure(fig, os.path.join(out_dir, f"heatmap_{_slug(gname)}.png")))
    return paths


# --------------------------------------------------------------------------- α over training
def plot_alpha_series(rep, path: str, max_panels: Optional[int] = 24) -> str:
    """The six α against the step per layer, from ``rep.alpha_series`` (see Report)."""
    series = rep.alpha_series
    steps = np.array(series["steps"], dtype=float)
    names = [n for n in rep.layers if n in series["layers"]]
    names += [n for n in series["layers"] if n not in rep.layers]
    groups: Dict[str, List[str]] = {}
    for name in names:
        e = rep.layers.get(name, {})
        key = e.get("parent") if e.get("kind") == "head" and e.get("parent") else name
        groups.setdefault(key, []).append(name)
    groups_list = _pick(list(groups.items()), max_panels)
    n = max(1, len(groups_list))
    ncol = min(3, n)
    nrow = math.ceil(n / ncol)
    fig = figure(4.2 * ncol, 3.0 * nrow + 0.6)
    ses = series.get("se") or {}
    mult = _multiplier(rep, series.get("k")) if ses else None
    bars = False
    for k, (gname, members) in enumerate(groups_list):
        ax = fig.add_subplot(nrow, ncol, k + 1)
        drawn = False
        for rel in _REL:
            vals = np.array([[_f(v) for v in series["layers"][m][rel]] for m in members])
            if vals.size == 0 or not np.isfinite(vals).any():
                continue
            with np.errstate(all="ignore"):
                ok = np.isfinite(vals)
                cnt = ok.sum(axis=0)
                mean = np.where(cnt > 0, np.where(ok, vals, 0.0).sum(axis=0) / np.maximum(cnt, 1), np.nan)
            style = "-" if rel.startswith("forward") else "--"
            ax.plot(steps, mean, style, marker="o", ms=3, color=_COLORS[rel],
                    label=rel.replace("_", " "))
            if len(members) > 1:
                lo = np.where(cnt > 0, np.where(ok, vals, np.inf).min(axis=0), np.nan)
                hi = np.where(cnt > 0, np.where(ok, vals, -np.inf).max(axis=0), np.nan)
                ax.fill_between(steps, lo, hi, color=_COLORS[rel], alpha=0.15, lw=0)
            elif mult is not None and members[0] in ses:
                se = np.array([_f(v) for v in ses[members[0]][rel]])
                fin = np.isfinite(se) & np.isfinite(mean)
                if fin.any():
                    bars = True
                    ax.errorbar(steps[fin], mean[fin], yerr=mult * se[fin], fmt="none",
                                ecolor=_COLORS[rel], elinewidth=0.9, capsize=2)
            drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "no α yet\n(no rows collected at these steps)", ha="center",
                    va="center", fontsize=8, transform=ax.transAxes)
        ax.axhline(0.0, color="0.8", lw=0.8)
        ax.set_ylim(-1.05, 1.05)
        ax.set_xlabel("training step", fontsize=8)
        ax.set_ylabel("α (covariances)", fontsize=8)
        label = _short(gname, 32) + (f" ({len(members)} heads)" if len(members) > 1 else "")
        ax.set_title(label, fontsize=9)
        ax.tick_params(labelsize=7)
        if k == 0 and drawn:
            ax.legend(fontsize=6, ncol=2, loc="lower left")
    if not groups_list:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "the α series has no layer", ha="center", va="center")
        ax.set_axis_off()
    bar_text = (f"\nerror bars: α ± {mult:.3g}·se (jackknife standard error over K={series.get('k')} "
                f"blocks; 95 % t interval)" if bars else "")
    fig.suptitle(f"α over training: six relations per layer every {series['every']} steps "
                 f"(rows since the start; forward solid, backward dashed)" + bar_text, fontsize=9)
    return save_figure(fig, path)


def plot_report(rep, out_dir: str, *, heatmaps: bool = True,
                max_heatmaps: Optional[int] = None,
                on_error: Optional[Callable[[str, Exception], None]] = None) -> List[str]:
    """Every figure of the report under ``out_dir``; returns the PNG paths.

    ``on_error(name, exception)``, when given, receives a figure that fails (an ``Exception``;
    KeyboardInterrupt still stops) and the other figures are still drawn; without it the first
    failure raises."""
    def each(name, draw):
        if on_error is None:
            return draw()
        try:
            return draw()
        except Exception as exc:
            on_error(name, exc)
            return None

    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        if on_error is None:
            raise
        on_error(out_dir, exc)
        return []
    paths = [each(name, lambda fn=fn, name=name: fn(rep, os.path.join(out_dir, name)))
             for name, fn in (("alpha.png", plot_alpha), ("spectra.png", plot_spectra),
                              ("exponents.png", plot_exponents), ("phase.png", plot_phase))]
    if getattr(rep, "alpha_series", None) is not None:
        paths.append(each("alpha_series.png", lambda: plot_alpha_series(
            rep, os.path.join(out_dir, "alpha_series.png"))))
    if heatmaps and rep.matrices:
        paths += each("heatmap_*.png", lambda: plot_heatmaps(rep, out_dir, max_heatmaps=max_heatmaps)) or []
    return [p for p in paths if p is not None]


def unavailable() -> Optional[str]:
    """Why figures cannot be drawn here (matplotlib missing or broken), or None when they can."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError as exc:
        if getattr(exc, "name", None) == "matplotlib" or "matplotlib" in str(exc).split(";")[0]:
            return "matplotlib is not installed (pip install 'crh-kernels[plot]')"
        return f"matplotlib cannot be imported ({type(exc).__name__}: {str(exc).splitlines()[0]})"
    except Exception as exc:  # a broken install raises anything
        return f"matplotlib cannot be imported ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0]})"
    return None
