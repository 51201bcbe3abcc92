"""Report: per-layer CRH/PAH numbers from a :class:`~crh_kernels.collect.Collector`, as a table,
JSON and figures.

Every number comes from :mod:`crh_kernels.analysis` applied to the layer's matrices; this module
only gathers them, names them and lays them out. Per layer (``Report.layers[name]``):

==========================  ===================================================================
key                         meaning
==========================  ===================================================================
``kind``                    ``linear``, ``conv2d``, ``conv1d`` or ``head``
``alpha_cov``               the six α of docs/spec.md §3 on covariances ``cov(x̂)`` (the paper's headline)
``alpha_second``            the same on second moments ``E[x̂x̂ᵀ]`` (paper appendix C.2)
``r_h``, ``r_g``            ``||μ||² / tr E[x̂x̂ᵀ]`` of h and g (paper Fig. 10): the a side (h_a,
                            g_a) when collected, else the b side (heads); all four in ``mean_ratio``
``effective_rank_h/_g``     effective rank of H and G (same side rule, same ``kind`` as exponents)
``p``, ``q``                exponents ``h ~ z^p``, ``g ~ z^q`` in W's singular basis (docs/spec.md §4)
``exponent_moments``        which matrices p, q, the forward slope, ``commutation`` and the phase
                            were fitted on: ``"raw"`` (raw second moments, bias folded in:
                            ``Collector(raw_moments=True)``, or ``normalize=False`` with the bias
                            column), else ``kind`` (``"cov"``: the normalized covariances α uses);
                            ``exponent_moments_why`` says why, in words
``identity``                how far the covariances α uses are from the identities the (p, q)
                            lines rest on: ``{"on": "cov", "H_b": {residual, scale, alpha} of
                            H_b ≟ W H_a Wᵀ, "G_a": ... of G_a ≟ Wᵀ G_b W, "raw": {source,
                            weight_change} or null}`` (:func:`~crh_kernels.analysis
                            .identity_residual`); ``identity_residual``: the larger residual
``forward_slope``           slope of log H_b vs log G_b: in W's left singular basis for layers
                            with a weight (docs/spec.md §4), of the sorted spectra for heads
                            (``forward_slope_source`` says which)
``pairing_slope``           slope of log λ_H,i vs log λ_G,i of H_b, G_b by rank (paper Fig. 3),
                            always on the ``kind`` matrices (the paper's), as are ``spectra``
``phase``                   the verdict's exponent reading: a phase of Table 1 named only through
                            the gates, ``"none"``, ``"flat"`` (z flat on the effective support) or
                            ``"undetermined"``; ``phase_explanation`` says why, ``phase_holds``
                            lists the lines within ``tol`` (None: no fit)
``verdict``                 :meth:`~crh_kernels.analysis.LayerVerdict.to_dict` (issue 13):
                            ``verdict``/``label`` (the α reading, or ``"trivial"``), ``agreement``
                            (``agree``: yes/no/?/-), ``trivial`` (kinds and reasons), ``alpha``
                            (per relation α, baseline at the effective ranks, bar, status),
                            ``exponent`` (support, every gate's value and limit, failed gates,
                            reason), ``explanation``, ``gates``; plus ``isotropy_a`` and
                            ``effective_ranks``. ``meta["verdict_gates"]``: the thresholds
``commutation``             off-diagonal energy of ``VᵀH_aV``: exponents are trustworthy when small
``n``                       rows counted (h_a's, else the first stream collected); ``n_streams``
``streams``                 the streams that hold rows; ``shared``: streams shared with a layer
``exponents``               :meth:`ExponentFit.to_dict` (z, h, g, pairing spectra, fits) or None
``spectra``                 eigenvalues (descending) per stream where ``exponents`` has none
``warnings``                warnings raised while analysing this layer
``se``                      standard errors (issue 16), None unless the collector kept
                            sub-states (``Collector(blocks=K)``): ``{"alpha_cov": {relation:
                            se}, "alpha_second": {..}, "p", "q", "forward_slope",
                            "pairing_slope", "effective_rank_h", "effective_rank_g", "k"}``
                            (delete-one-block jackknife over the K leave-one-out views, each
                            analysed by the same functions as the layer; None where the number
                            or its se is undefined), ``bias`` (same shape: the jackknife bias),
                            ``interval`` (same shape: the 95 % interval (value − bias) ±
                            t_{K−1}·se, or None) and ``reasons`` (why a defined number has no
                            se). The verdict reads the intervals: a relation holds only when
                            its whole interval clears the bar, "undetermined" when it straddles
                            it (:func:`~crh_kernels.analysis.layer_verdict`).
                            ``meta["jackknife"]``: ``{"k", "by", "method", "level", "z" (the
                            multiplier t_{K−1, 0.975}), "quantile", "interval"}`` (None without
                            sub-states); :mod:`crh_kernels.analysis.errors` says why t and why
                            the bias-corrected centre
==========================  ===================================================================

Undefined numbers (a missing stream, a constant matrix, a flat z) are ``None``, in memory and in
JSON alike (strict JSON has no NaN). ``Report.meta`` holds the collector's configuration and
notes (``forward_only`` when no gradient was seen). The matrices needed for heatmaps are kept in
memory only (``Report.matrices``, downsized by block averaging to at most ``heatmap_size``).
``Report.alpha_series`` (None unless the collector had ``alpha_every=K``) holds the six α per
layer every K steps (:mod:`crh_kernels.collect.series`): ``{"kind": "cov", "every": K, "steps":
[...], "layers": {name: {relation: [α or null per step]}}}`` (with sub-states also ``"se"``, of
the same shape, and ``"k"``), in JSON too.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import textwrap
import warnings
from typing import Dict, List, Optional

import numpy as np
import torch

from ._version import __version__

__all__ = ["Report", "read_json", "check_report_dict", "check_alpha_series", "MAX_JSON_DEPTH"]

_FORMAT = "crh_kernels.Report/1"
_SIDE = {"h": ("h_a", "h_b"), "g": ("g_a", "g_b")}
_ATTR = {"h_a": "H_a", "h_b": "H_b", "g_a": "G_a", "g_b": "G_b"}


def _clean(v):
    """JSON-ready copy: NaN/inf -> None, numpy/torch scalars and arrays -> Python values/lists."""
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().numpy()
    if isinstance(v, np.ndarray):
        return _clean(v.tolist())
    if isinstance(v, (np.floating, float)):
        f = float(v)
        return f if math.isfinite(f) else None
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.bool_):
        return bool(v)
    return v


# ----------------------------------------------------------------------------- reading JSON back
#: How deeply a saved run's JSON files may nest. A report nests 6 levels (layers → layer →
#: exponents → pairing → list), a run's extras about 8; anything far deeper is not ours.
MAX_JSON_DEPTH = 32

_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def _json_depth(text: str) -> int:
    """How deeply ``text`` nests its arrays and objects (strings ignored), without recursion."""
    depth = best = 0
    for ch in _NOT_BRACKET.sub("", _JSON_STRING.sub('""', text)):
        depth += 1 if ch in "[{" else -1
        best = max(best, depth)
    return best


def _finite_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"number {text[:20]} overflows a float")
    return v


def _no_constant(token: str):
    raise ValueError(f"{token} is not a JSON number (strict JSON: undefined numbers are null)")


def read_json(path, *, what: Optional[str] = None, max_depth: int = MAX_JSON_DEPTH):
    """The strict JSON value in the file ``path``. Raises ``ValueError`` with one line naming
    the file (``what``, default its base name) when it cannot be read, is not UTF-8 or not JSON,
    holds NaN/Infinity or a number that overflows a float, or nests deeper than ``max_depth``
    (checked before parsing, so a hostile file cannot exhaust the recursion limit)."""
    path = os.fspath(path)
    name = what or os.path.basename(path) or path
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ValueError(f"{name}: cannot read it ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{name}: not UTF-8 text (byte {exc.start})") from None
    depth = _json_depth(text)
    if depth > max_depth:
        raise ValueError(f"{name}: nested {depth} levels deep, more than the {max_depth} a saved "
                         "run ever uses")
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{name}: not valid JSON ({exc.msg} at line {exc.lineno}, column "
                         f"{exc.colno})") from None
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"{name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def _describe(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"{str(v).lower()}"
    if isinstance(v, (int, float)):
        return f"the number {v!r}"
    if isinstance(v, str):
        return f"the string {json.dumps(v[:30])}{'…' if len(v) > 30 else ''}"
    if isinstance(v, list):
        return f"a list of {len(v)} items"
    if isinstance(v, dict):
        return f"an object of {len(v)} keys"
    return type(v).__name__


def _key(path: str, k) -> str:
    text = str(k)
    if len(text) > 40:
        text = text[:39] + "…"
    return f"{path}[{json.dumps(text, ensure_ascii=False)}]"


class _Checker:
    """Type checks of a report dict; the first failure raises ``ValueError`` naming the field."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, path: str, want: str, v):
        raise ValueError(f"{self.where}: {path} must be {want}, got {_describe(v)}")

    @staticmethod
    def is_num(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    def num(self, path, v, null=True):
        if not (self.is_num(v) or (null and v is None)):
            self.fail(path, "a finite number" + (" or null" if null else ""), v)

    def integer(self, path, v, lo=0, null=False):
        if v is None and null:
            return
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            self.fail(path, f"an integer ≥ {lo}" + (" or null" if null else ""), v)

    def string(self, path, v, null=True, choices=None):
        if v is None and null:
            return
        if not isinstance(v, str) or (choices is not None and v not in choices):
            want = "a string" if choices is None else "one of " + ", ".join(map(json.dumps, choices))
            self.fail(path, want + (" or null" if null else ""), v)

    def obj(self, path, v, null=False):
        if not (isinstance(v, dict) or (null and v is None)):
            self.fail(path, "an object" + (" or null" if null else ""), v)
        return v or {}

    def lst(self, path, v, null=False):
        if not (isinstance(v, list) or (null and v is None)):
            self.fail(path, "a list" + (" or null" if null else ""), v)
        return v or []

    def num_list(self, path, v, null=True):
        for i, x in enumerate(self.lst(path, v, null=null)):
            self.num(f"{path}[{i}]", x)

    def str_list(self, path, v, choices=None):
        for i, x in enumerate(self.lst(path, v)):
            self.string(f"{path}[{i}]", x, null=False, choices=choices)

    def num_map(self, path, v, null=False):
        for k, x in self.obj(path, v, null=null).items():
            self.num(_key(path, k), x)

    def int_map(self, path, v):
        for k, x in self.obj(path, v).items():
            self.integer(_key(path, k), x)

    def fit(self, path, v, null=False):
        d = self.obj(path, v, null=null)
        for k in ("slope", "intercept", "r2", "x_span"):
            if k in d:
                self.num(f"{path}.{k}", d[k])
        if "n_modes" in d:
            self.integer(f"{path}.n_modes", d["n_modes"])


_STREAMS = ("h_a", "h_b", "g_a", "g_b")
_LAYER_NUMBERS = ("r_h", "r_g", "effective_rank_h", "effective_rank_g", "p", "q", "forward_slope",
                  "pairing_slope", "commutation", "identity_residual")
#: The numbers of a layer entry that get a standard error (issue 16), besides the two α maps.
SE_NUMBERS = ("p", "q", "forward_slope", "pairing_slope", "effective_rank_h", "effective_rank_g")
_LAYER_STRINGS = ("kind", "parent", "side_h", "side_g", "phase", "phase_explanation",
                  "forward_slope_source", "exponent_moments_why")
_FIT_LABEL = {"raw": "raw", "cov": "cov", "second_moment": "sm"}
#: what ``exponent_moments`` may say (docs/spec.md §4: raw moments for the lines, else the ``kind``)
EXPONENT_MOMENTS = ("raw", "cov", "second_moment")


def _check_series(c: "_Checker", path: str, d) -> None:
    from .analysis import RELATIONS
    c.obj(path, d)
    c.string(f"{path}.kind", d.get("kind"), null=False, choices=("cov",))
    c.integer(f"{path}.every", d.get("every"), lo=1)
    steps = c.lst(f"{path}.steps", d.get("steps"))
    for i, s in enumerate(steps):
        c.integer(f"{path}.steps[{i}]", s)
        if i and s <= steps[i - 1]:
            c.fail(f"{path}.steps[{i}]", f"larger than the step before ({steps[i - 1]})", s)
    tables = [("layers", d.get("layers"))]
    if d.get("se") is not None:
        tables.append(("se", d["se"]))
        c.integer(f"{path}.k", d.get("k"), lo=2)
    for table, layers in tables:
        for name, rels in c.obj(f"{path}.{table}", layers).items():
            lp = _key(f"{path}.{table}", name)
            c.obj(lp, rels)
            if set(rels) != set(RELATIONS):
                c.fail(lp, "an object of the six relations " + ", ".join(RELATIONS), rels)
            for r in RELATIONS:
                c.num_list(f"{lp}.{r}", rels[r], null=False)
                if len(rels[r]) != len(steps):
                    c.fail(f"{lp}.{r}", f"a list of {len(steps)} values (one per step)", rels[r])


def _check_pair(c: "_Checker", path: str, v) -> None:
    """An interval: null or a list of two finite numbers, the lower first."""
    if v is None:
        return
    c.num_list(path, v, null=False)
    if len(v) != 2 or v[0] > v[1]:
        c.fail(path, "null or [lo, hi] with lo ≤ hi", v)


def _check_se(c: "_Checker", path: str, se) -> None:
    """A layer's ``se`` block (issue 16; :func:`_standard_errors`)."""
    from .analysis import RELATIONS
    c.obj(path, se)
    c.integer(f"{path}.k", se.get("k"), lo=2)
    for key in ("alpha_cov", "alpha_second"):
        c.num_map(f"{path}.{key}", se.get(key))
        unknown = set(se[key]) - set(RELATIONS)
        if unknown:
            c.fail(f"{path}.{key}", "an object keyed by the six relations", se[key])
    for k in SE_NUMBERS:
        if k in se:
            c.num(f"{path}.{k}", se[k])
    if se.get("bias") is not None:
        b = c.obj(f"{path}.bias", se["bias"])
        for k, v in b.items():
            if isinstance(v, dict):
                c.num_map(_key(f"{path}.bias", k), v)
            else:
                c.num(_key(f"{path}.bias", k), v)
    if se.get("interval") is not None:
        iv = c.obj(f"{path}.interval", se["interval"])
        for k, v in iv.items():
            kp = _key(f"{path}.interval", k)
            if isinstance(v, dict):
                for rel, x in v.items():
                    _check_pair(c, _key(kp, rel), x)
            else:
                _check_pair(c, kp, v)
    for k, why in c.obj(f"{path}.reasons", se.get("reasons"), null=True).items():
        c.string(_key(f"{path}.reasons", k), why, null=False)


def _check_verdict(c: "_Checker", path: str, v) -> None:
    """The per-layer verdict block (:meth:`LayerVerdict.to_dict` plus the report's extras)."""
    c.obj(path, v)
    for k in ("verdict", "label", "explanation"):
        c.string(f"{path}.{k}", v.get(k), null=False)
    if not (v.get("agreement") is None or isinstance(v.get("agreement"), bool)):
        c.fail(f"{path}.agreement", "true, false or null", v.get("agreement"))
    c.string(f"{path}.agree", v.get("agree"), null=False, choices=("yes", "no", "?", "-"))
    for i, t in enumerate(c.lst(f"{path}.trivial", v.get("trivial"))):
        c.obj(f"{path}.trivial[{i}]", t)
        c.string(f"{path}.trivial[{i}].kind", t.get("kind"), null=False)
    al = c.obj(f"{path}.alpha", v.get("alpha"))
    c.string(f"{path}.alpha.name", al.get("name"), null=False)
    c.str_list(f"{path}.alpha.holds", al.get("holds"))
    for rel, r in c.obj(f"{path}.alpha.relations", al.get("relations")).items():
        rp = _key(f"{path}.alpha.relations", rel)
        c.obj(rp, r)
        for k in ("alpha", "baseline", "required", "se"):
            c.num(f"{rp}.{k}", r.get(k))
        _check_pair(c, f"{rp}.interval", r.get("interval"))
    ex = c.obj(f"{path}.exponent", v.get("exponent"))
    c.string(f"{path}.exponent.phase", ex.get("phase"), null=False)
    c.str_list(f"{path}.exponent.failed", ex.get("failed"))
    for g, gv in c.obj(f"{path}.exponent.gates", ex.get("gates")).items():
        gp = _key(f"{path}.exponent.gates", g)
        c.obj(gp, gv)
        if not isinstance(gv.get("passed"), bool):
            c.fail(f"{gp}.passed", "true or false", gv.get("passed"))
    if "isotropy_a" in v:
        c.num(f"{path}.isotropy_a", v["isotropy_a"])


def check_alpha_series(d, where: str = "α series") -> None:
    """Check the dict form of an α series (``Report.alpha_series``; written by
    :meth:`crh_kernels.collect.series.AlphaSeries.to_dict`): ``kind`` "cov", ``every`` a
    positive int, ``steps`` increasing non-negative ints, ``layers`` an object of six-relation
    objects holding one finite number or null per step; with sub-states also ``se`` (the same
    shape: standard errors) and ``k`` (an int ≥ 2). Raises ``ValueError`` naming the field."""
    _check_series(_Checker(where), "alpha_series", d)


def check_report_dict(d, where: str = "report.json") -> None:
    """Check that ``d`` has the shape :meth:`Report.to_dict` writes: the format tag, ``layers``
    an object of layer objects whose known fields have their types (numbers finite or null,
    counts non-negative integers, lists and objects where the table, the claims and the figures
    expect them), ``meta`` an object. Unknown fields are allowed (newer files). Raises
    ``ValueError`` with one line naming the first offending field."""
    c = _Checker(where)
    if not isinstance(d, dict):
        c.fail("the top level", "an object with format, meta and layers", d)
    if d.get("format") != _FORMAT:
        raise ValueError(f"{where}: not a crh_kernels report (format {_describe(d.get('format'))}, "
                         f"expected {json.dumps(_FORMAT)})")
    if "layers" not in d:
        raise ValueError(f"{where}: no layers")
    meta = c.obj("meta", d.get("meta", {}))
    if "kind" in meta:
        c.string("meta.kind", meta["kind"], choices=("cov", "second_moment"))
    for k in ("tol", "floor"):
        if k in meta:
            c.num(f"meta.{k}", meta[k])
    for k in ("steps", "n_layers"):
        if k in meta:
            c.integer(f"meta.{k}", meta[k], null=True)
    if "notes" in meta:
        c.str_list("meta.notes", meta["notes"])
    if "experiment" in meta:
        c.string("meta.experiment", meta["experiment"])
    if meta.get("jackknife") is not None:
        jk = c.obj("meta.jackknife", meta["jackknife"])
        if not isinstance(jk.get("k"), list):
            c.integer("meta.jackknife.k", jk.get("k"), lo=2)
        c.num("meta.jackknife.z", jk.get("z"))
        c.string("meta.jackknife.method", jk.get("method"), null=False)
    if d.get("alpha_series") is not None:
        _check_series(c, "alpha_series", d["alpha_series"])
    for name, e in c.obj("layers", d["layers"]).items():
        path = _key("layers", name)
        c.obj(path, e)
        for k in _LAYER_NUMBERS:
            if k in e:
                c.num(f"{path}.{k}", e[k])
        for k in _LAYER_STRINGS:
            if k in e:
                c.string(f"{path}.{k}", e[k])
        if "head" in e:
            c.integer(f"{path}.head", e["head"], null=True)
        if "exponent_moments" in e:
            c.string(f"{path}.exponent_moments", e["exponent_moments"], choices=EXPONENT_MOMENTS)
        if e.get("identity") is not None:
            ip = f"{path}.identity"
            ident = c.obj(ip, e["identity"])
            c.string(f"{ip}.on", ident.get("on"), choices=("cov", "second_moment"))
            for k in ("H_b", "G_a"):
                for f, v in c.obj(f"{ip}.{k}", ident.get(k), null=True).items():
                    c.num(f"{ip}.{k}.{f}", v)
            raw = c.obj(f"{ip}.raw", ident.get("raw"), null=True)
            if "weight_change" in raw:
                c.num(f"{ip}.raw.weight_change", raw["weight_change"])
            if "source" in raw:
                c.string(f"{ip}.raw.source", raw["source"])
        if e.get("verdict") is not None:
            _check_verdict(c, f"{path}.verdict", e["verdict"])
        if e.get("se") is not None:
            _check_se(c, f"{path}.se", e["se"])
        if "n" in e:
            c.integer(f"{path}.n", e["n"])
        if "streams" in e:
            c.str_list(f"{path}.streams", e["streams"], choices=_STREAMS)
        for k in ("phase_holds", "warnings"):
            if k in e:
                c.str_list(f"{path}.{k}", e[k])
        for k in ("n_streams", "n_skipped", "dims"):
            if k in e:
                c.int_map(f"{path}.{k}", e[k])
        if "shared" in e:
            for s, owner in c.obj(f"{path}.shared", e["shared"]).items():
                c.string(_key(f"{path}.shared", s), owner, null=False)
        for k in ("alpha_cov", "alpha_second", "mean_ratio"):
            if k in e:
                c.num_map(f"{path}.{k}", e[k])
        if "spectra" in e:
            for s, lam in c.obj(f"{path}.spectra", e["spectra"], null=True).items():
                c.num_list(_key(f"{path}.spectra", s), lam, null=False)
        if e.get("exponents") is not None:
            ex = c.obj(f"{path}.exponents", e["exponents"])
            xp = f"{path}.exponents"
            for k in ("p", "q"):
                if k in ex:
                    c.fit(f"{xp}.{k}", ex[k])
            if "forward" in ex:
                c.fit(f"{xp}.forward", ex["forward"], null=True)
            if "pairing" in ex:
                for k, lam in c.obj(f"{xp}.pairing", ex["pairing"], null=True).items():
                    c.num_list(_key(f"{xp}.pairing", k), lam)
            for k in ("z", "h", "g", "hb", "gb"):
                if k in ex:
                    c.num_list(f"{xp}.{k}", ex[k])
            if "commutation" in ex:
                c.num(f"{xp}.commutation", ex["commutation"])
            if ex.get("support") is not None:
                for i, x in enumerate(c.lst(f"{xp}.support", ex["support"])):
                    if not isinstance(x, bool):
                        c.fail(f"{xp}.support[{i}]", "true or false", x)


def _downsize(m: np.ndarray, size: int) -> np.ndarray:
    """Block-average a square matrix to at most ``size`` × ``size`` (float32)."""
    d = m.shape[0]
    if d <= size:
        return m.astype(np.float32)
    f = math.ceil(d / size)
    starts = np.arange(0, d, f)
    counts = np.diff(np.append(starts, d)).astype(np.float64)
    s = np.add.reduceat(np.add.reduceat(m, starts, axis=0), starts, axis=1)
    return (s / np.outer(counts, counts)).astype(np.float32)


def _f64(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.device.type == "mps":
        t = t.cpu()
    return t.double()


def _second64(m) -> torch.Tensor:
    """``E[x xᵀ]`` of a Moments' counted rows, composed in float64 (scatter/n + μμᵀ)."""
    mu = _f64(m.mean)
    return _f64(m.scatter) / m.n + torch.outer(mu, mu)


def _raw_moments(st, mom):
    """``({"W": W̃, "H_a": E[h̃_a h̃_aᵀ], "G_b": E[g_b g_bᵀ], "why", "source", "n"}, "")`` in
    float64 when the layer has raw second moments (docs/spec.md §4), else ``(None, why not)``.

    Two sources: the raw streams of ``Collector(raw_moments=True)``; or, without them, the
    ordinary H_a and G_b when they are raw already (``normalize=False`` and H_a has the bias
    column wherever the module has a bias)."""
    if st.adapter is None:
        return None, "no weight"
    ha, gb = getattr(st, "H_a_raw", None), getattr(st, "G_b_raw", None)
    if getattr(st, "raw", False):
        missing = [k for k, m in (("h_a_raw", ha), ("g_b_raw", gb)) if m is None or m.n == 0]
        if missing:
            return None, (f"the raw streams have no rows ({', '.join(missing)}"
                          + (": no pass with gradients)" if missing == ["g_b_raw"] else ")"))
        return {"W": _f64(st.raw_weight()), "H_a": _second64(ha), "G_b": _second64(gb),
                "source": "raw_moments", "n": int(ha.n),
                "why": "raw second moments E[h̃_a h̃_aᵀ] and E[g_b g_bᵀ] (bias folded in: "
                       "h̃_a = (h_a, 1), W̃ = [W | b]) of Collector(raw_moments=True); "
                       "H_b = W̃ H̃_a W̃ᵀ and G̃_a = W̃ᵀ G_b W̃ exactly"}, ""
    ha, gb = mom.get("h_a"), mom.get("g_b")
    if ha is None or gb is None or ha.normalize or gb.normalize:
        return None, "no raw moments kept (Collector(raw_moments=True))"
    W = st.weight()
    if tuple(W.shape) != tuple(st.raw_weight().shape):
        return None, ("H_a lacks the bias column (normalize=False without include_bias=True); "
                      "no raw moments kept (Collector(raw_moments=True))")
    return {"W": _f64(W), "H_a": _second64(ha), "G_b": _second64(gb),
            "source": "normalize=False streams", "n": int(ha.n),
            "why": "raw second moments of the collector's own unnormalized H_a (bias column "
                   "included) and G_b; H_b = W̃ H_a W̃ᵀ and G_a = W̃ᵀ G_b W̃ exactly"}, ""


def _kind_why(kind: str, st, raw_why: str) -> str:
    which = ("covariances" if kind == "cov" else "second moments") + " of the " + (
        "normalized " if getattr(st.H_a, "normalize", True) else "") + "rows"
    if raw_why == "kind":
        return f"{which} (exponent_moments='kind' was asked for)"
    return (f"{which}, not raw moments: {raw_why}; the lines assume H_b = W H_a Wᵀ and "
            f"G_a = Wᵀ G_b W, see identity")


def _identity(A, st, W, mom, mat, kind, raw) -> dict:
    """The layer's ``identity`` entry: residuals on the covariances α uses, and the raw source."""
    cov = mat if kind == "cov" else {_ATTR[s]: _f64(m.cov()) for s, m in mom.items()}
    out = {"on": "cov"}
    out.update(A.identity_residual(W, cov.get("H_a"), cov.get("H_b"), cov.get("G_a"),
                                   cov.get("G_b")))
    if raw is None:
        out["raw"] = None
        return out
    info = {"source": raw["source"], "weight_change": None}
    w0 = getattr(st, "raw_weight0", None)
    if raw["source"] == "raw_moments" and w0 is not None:
        w = raw["W"]
        nw = float(torch.linalg.matrix_norm(w))
        change = float(torch.linalg.matrix_norm(w - _f64(w0).to(w.device)))
        info["weight_change"] = change / nw if nw > 0 else (0.0 if change == 0 else float("inf"))
        if info["weight_change"] > _WEIGHT_CHANGE_NOTE:
            warnings.warn(f"W changed by {info['weight_change']:.2g} (relative Frobenius, from "
                          f"the first raw row to now) while the raw moments accumulated: the "
                          f"identities behind the exponents are taken with the final W and hold "
                          f"for the accumulated rows only approximately", RuntimeWarning)
    out["raw"] = info
    return out


#: a relative change of W (first raw row → report) above fp32 rounding is worth a warning
_WEIGHT_CHANGE_NOTE = 1e-6


def _larger_residual(ident) -> Optional[float]:
    if ident is None:
        return None
    vals = [d["residual"] for k, d in ident.items() if k in ("H_b", "G_a") and d is not None
            and d["residual"] is not None and math.isfinite(d["residual"])]
    return max(vals) if vals else None


def _num(v) -> str:
    return "?" if not isinstance(v, (int, float)) else f"{v:.3g}"


def _phase_cell(e) -> str:
    """The table's phase cell: the gated exponent phase; "undet:<gates>" names failed gates."""
    ph = e.get("phase")
    if ph is None:
        return "-"
    if ph == "undetermined":
        failed = ((e.get("verdict") or {}).get("exponent") or {}).get("failed") or []
        return "undet:" + ",".join(failed) if failed else "undet"
    return ph


def _verdict(A, st, entry, view, mom, mat, kind, W, raw, exps, gates, intervals=None) -> None:
    """The layer's verdict with its evidence (issue 13; :func:`~crh_kernels.analysis.
    layer_verdict`): ``entry["verdict"]``, and ``phase``/``phase_explanation``/``phase_holds``
    from its exponent reading (a phase is named only through the gates).

    The α reading uses ``alpha_cov`` (the paper's headline) against baselines at the effective
    ranks of the six covariances / Grams; the white-input test uses cov(ĥ_a) and its n; the
    exponent reading gates the fit the report made (raw moments or ``kind`` matrices), with
    the commutation error of that fit's G_a beside H_a's. ``intervals``: the jackknife
    intervals of a collector with blocks (:func:`_standard_errors`), read by both readings."""
    cov = {}
    for s, m in mom.items():
        cov[_ATTR[s]] = mat[_ATTR[s]] if kind == "cov" else _f64(m.cov())
    # eigenvalues the report already has of these covariances (no second eigh of big layers)
    known = {}
    if kind == "cov":
        known.update({k: v for k, v in (entry.get("spectra") or {}).items() if v is not None})
        if exps is not None and entry.get("exponent_moments") == "cov":
            names = {"lambda_H": "H_a", "lambda_G": "G_a", "lambda_Hb": "H_b", "lambda_Gb": "G_b"}
            known.update({names[k]: v for k, v in exps.pairing.items() if k in names})
    eranks = {}
    for k, m in cov.items():
        eranks[k] = (A.effective_rank_of_spectrum(known[k]) if k in known
                     else A.effective_rank(m))
    if W is not None:
        d_out, d_in = W.shape
        dims = {"a": int(d_in), "b": int(d_out)}
        if exps is not None and entry.get("exponent_moments") != "raw":
            eranks["Z_a"] = A.effective_rank_of_spectrum(exps.z)  # z = s² of this W
        else:
            small = view.Z_a() if d_in <= d_out else view.Z_b()  # same nonzero spectrum
            eranks["Z_a"] = A.effective_rank(_f64(small))
        eranks["Z_b"] = eranks["Z_a"]
    else:
        dims = {"a": (st.dims or {}).get("h_a"), "b": (st.dims or {}).get("h_b")}
    baselines = A.relation_baselines(dims, eranks)
    iso = None
    if "H_a" in cov and "h_a" in mom:
        iso = A.isotropy(cov["H_a"], int(mom["h_a"].n))
    comm_g = None
    if exps is not None:
        try:
            if entry.get("exponent_moments") == "raw" and raw is not None:
                wf = raw["W"]
                comm_g = A.commutation_error(wf, wf.T @ raw["G_b"] @ wf, side="a")
            elif W is not None and "G_a" in mat:
                comm_g = A.commutation_error(W, mat["G_a"], side="a")
        except (ValueError, RuntimeError) as exc:
            warnings.warn(f"commutation error of G_a failed: {exc}", RuntimeWarning)
    alphas = {k: (float("nan") if v is None else v) for k, v in entry["alpha_cov"].items()}
    v = A.layer_verdict(alphas, dims=dims, fit=exps, baselines=baselines, isotropy_a=iso,
                        commutation_g=comm_g, applicable=W is not None,
                        no_fit_reason=entry.get("phase_explanation") or "no exponent fit",
                        gates=gates, intervals=intervals)
    d = v.to_dict()
    d["isotropy_a"] = iso
    d["effective_ranks"] = eranks
    entry["verdict"] = d
    if exps is not None:
        ex = v.exponent
        entry["phase"] = ex["phase"]
        entry["phase_explanation"] = ex["reason"]
        entry["phase_holds"] = list(ex["holds"])


def _leave_one_out(st) -> Optional[list]:
    """The layer's K leave-one-out views (``LayerStats.leave_one_out()``), None without blocks."""
    fn = getattr(st, "leave_one_out", None)
    if fn is None or not getattr(st, "n_blocks", None):
        return None
    views = fn()
    return None if views is None else list(views)


def _jackknife_meta(col, layers) -> Optional[dict]:
    """``meta["jackknife"]``: how the standard errors were computed; None without blocks."""
    ks = sorted({e["se"]["k"] for e in layers.values() if e.get("se")})
    if not ks:
        return None
    from .analysis import errors as E
    k = ks[0] if len(ks) == 1 else None
    blocks = (getattr(col, "meta", None) or {}).get("blocks") or {}
    by = getattr(col, "block_by", None) or blocks.get("by")
    return {"k": k if k is not None else ks, "by": by, "method": E.METHOD, "level": E.LEVEL,
            "z": None if k is None else E.multiplier(k),
            "quantile": "Student's t with K − 1 degrees of freedom",
            "interval": "(value − bias) ± z·se: Tukey's jackknife interval around the "
                        "bias-corrected estimate (se.interval of each layer)"}


def _standard_errors(A, entry, loo, why_not: Optional[str] = None) -> tuple:
    """``(entry["se"], intervals)`` from the light entries ``loo`` of the K leave-one-out views
    (:func:`crh_kernels.analysis.errors.jackknife`).

    ``se``: ``{"alpha_cov": {relation: se}, "alpha_second": {..}, "p", "q", "forward_slope",
    "pairing_slope", "effective_rank_h", "effective_rank_g", "k"}`` (None where the quantity or
    its standard error is undefined), plus ``bias`` and ``interval`` of the same shape (the
    jackknife bias, the 95 % interval around the bias-corrected value) and ``reasons``
    (``{"p": why, "alpha_cov.forward_RGA": why}`` where a defined quantity has no se).
    ``intervals``: what :func:`~crh_kernels.analysis.layer_verdict` reads, the α on covariances,
    p, q and the signed distance of (p, q) to each line. ``why_not``: the blocks cannot give
    standard errors (:func:`~crh_kernels.analysis.errors.empty_blocks`): every se is None with
    this reason."""
    from .analysis import errors as E
    k = len(loo)
    m = E.multiplier(k)
    se, bias, interval, reasons = {"k": k}, {}, {}, {}

    def one(path, full, vals):
        j = E.jackknife(full, vals, why_not)
        iv = j.interval(m)
        if j.value is not None and j.se is None:
            reasons[path] = j.reason
        return j, {"lo": None if iv is None else iv[0], "hi": None if iv is None else iv[1],
                   "se": j.se, "reason": j.reason}

    ivs = {}
    for key in ("alpha_cov", "alpha_second"):
        se[key], bias[key], interval[key] = {}, {}, {}
        for rel, v in entry[key].items():
            j, iv = one(f"{key}.{rel}", v, [(e.get(key) or {}).get(rel) for e in loo])
            se[key][rel], bias[key][rel] = j.se, j.bias
            interval[key][rel] = None if iv["lo"] is None else [iv["lo"], iv["hi"]]
            if key == "alpha_cov":
                ivs.setdefault("alpha", {})[rel] = iv
    for key in SE_NUMBERS:
        j, iv = one(key, entry.get(key), [e.get(key) for e in loo])
        se[key], bias[key] = j.se, j.bias
        interval[key] = None if iv["lo"] is None else [iv["lo"], iv["hi"]]
        if key in ("p", "q"):
            ivs[key] = iv
    ivs["lines"] = {}
    for rel, ln in A.LINES.items():
        def signed(e):
            p, q = e.get("p"), e.get("q")
            if p is None or q is None:
                return None
            return (ln.a * float(p) + ln.b * float(q) - ln.c) / math.hypot(ln.a, ln.b)
        ivs["lines"][rel] = one(f"line.{rel}", signed(entry), [signed(e) for e in loo])[1]
        reasons.pop(f"line.{rel}", None)
    se.update(bias=bias, interval=interval, reasons=reasons)
    return se, ivs


class _View:
    """What the analysis functions see of a layer: streams with rows (else None), cached Z.
    ``grams``: a view of the same layer whose Z it shares (a leave-one-out view has the
    layer's W: the weights are not blocked)."""

    def __init__(self, st, grams: Optional["_View"] = None):
        self._st = st
        for s, attr in _ATTR.items():
            m = getattr(st, attr, None)
            setattr(self, attr, m if (m is not None and m.n > 0) else None)
        self._z = {} if grams is None else grams._z

    def _gram(self, which):
        if which not in self._z:
            fn = getattr(self._st, which, None)
            self._z[which] = None if fn is None else fn()
        return self._z[which]

    def Z_a(self):
        return self._gram("Z_a")

    def Z_b(self):
        return self._gram("Z_b")


class Report:
    """Per-layer CRH numbers; build with ``Collector.report()`` or :meth:`from_json`.

    Attributes:
        layers: ``{layer name: dict}`` (keys in the module docstring).
        meta: configuration, analysis settings and notes.
        alpha_series: the six α per layer over training (module docstring), or None.
        matrices: ``{layer name: {"H_a", "G_a", "Z_a", "H_b", "G_b", "Z_b": ndarray}}`` for
            heatmaps (in memory only; empty after :meth:`from_json`).
    """

    def __init__(self, layers: Dict[str, dict], meta: Optional[dict] = None,
                 matrices: Optional[Dict[str, Dict[str, np.ndarray]]] = None,
                 alpha_series: Optional[dict] = None):
        self.layers = layers
        self.meta = dict(meta or {})
        self.matrices = matrices or {}
        self.alpha_series = alpha_series

    # ------------------------------------------------------------- building
    @classmethod
    def from_collector(cls, col, *, floor: float = 1e-6, tol: float = 0.25, kind: str = "cov",
                       heatmap_size: int = 128, exponent_moments: str = "auto",
                       gates=None) -> "Report":
        """Analyse every layer of ``col`` (see the module docstring).

        Args:
            floor: relative eigenvalue floor of the exponent fits.
            tol: distance to a line within which a relation holds (phase classifier).
            kind: ``"cov"`` or ``"second_moment"``: which matrices the exponents, effective ranks,
                spectra and heatmaps use (both α variants are always reported).
            heatmap_size: the largest side of a kept heatmap matrix.
            exponent_moments: ``"auto"``: exponents and phases on a layer's raw second moments
                when the collector has them (docs/spec.md §4: the identities behind the lines hold for
                those), else on the ``kind`` matrices; ``"kind"``: on the ``kind`` matrices
                always (to compare).
            gates: the :class:`~crh_kernels.analysis.VerdictGates` of each layer's verdict
                (default: the documented values, with ``tol``); written to
                ``meta["verdict_gates"]``.
        """
        from . import analysis as A
        if gates is None:
            gates = A.VerdictGates(tol=tol)
        elif not isinstance(gates, A.VerdictGates):
            raise TypeError(f"gates must be a crh_kernels.analysis.VerdictGates, got "
                            f"{type(gates).__name__}")
        if kind not in A.KINDS:
            raise ValueError(f"kind must be one of {A.KINDS}, got {kind!r}")
        if exponent_moments not in ("auto", "kind"):
            raise ValueError(f"exponent_moments must be 'auto' or 'kind', got {exponent_moments!r}")
        layers, matrices = {}, {}
        opts = dict(floor=floor, tol=tol, kind=kind, heatmap_size=heatmap_size,
                    use_raw=exponent_moments == "auto", gates=gates)
        for name, st in col.layers.items():
            view = _View(st)
            loo = None
            why_not, views = None, None
            if getattr(st, "n_blocks", None):
                why_not = A.empty_blocks(st.block_counts())
            if why_not is not None:
                loo = [{} for _ in range(st.n_blocks)]   # no analyses: every se None, with why
            else:
                views = _leave_one_out(st)
            if views is not None:
                # light analyses of the K leave-one-out views, with the same functions as the
                # point estimate; their warnings repeat the layer's own and are not kept
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        loo = [cls._analyse(A, v, view=_View(v, grams=view), light=True,
                                            **opts)[0] for v in views]
                finally:   # the K merges are not kept: rebuilt if a report asks again
                    release = getattr(st, "release_leave_one_out", None)
                    if release is not None:
                        release()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                entry, mats = cls._analyse(A, st, view=view, loo=loo, loo_why=why_not, **opts)
            entry["warnings"] = sorted({str(w.message) for w in caught})
            layers[name] = _clean(entry)
            matrices[name] = mats
        meta = dict(col.meta)
        meta["jackknife"] = _jackknife_meta(col, layers)
        meta.update({
            "kind": kind, "floor": floor, "tol": tol, "n_layers": len(layers),
            "exponent_moments": exponent_moments,
            "verdict_gates": gates.to_dict(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
        })
        meta["crh_kernels"] = __version__
        series = getattr(col, "alpha_series", None)
        series = None if series is None else _clean(series.to_dict())
        return cls(layers, _clean(meta), matrices, alpha_series=series)

    @staticmethod
    def _analyse(A, st, *, floor, tol, kind, heatmap_size, use_raw=True, gates=None, view=None,
                 light=False, loo=None, loo_why=None):
        """One layer's entry and heatmap matrices. ``light``: the numbers only (a leave-one-out
        view: no identity, verdict nor heatmaps); ``loo``: the light entries of the layer's
        leave-one-out views, whose jackknife gives ``se`` and the verdict's intervals."""
        view = _View(st) if view is None else view
        streams = [s for s in ("h_a", "h_b", "g_a", "g_b") if getattr(view, _ATTR[s]) is not None]
        mom = {s: getattr(view, _ATTR[s]) for s in streams}
        entry = {"kind": st.kind, "parent": st.parent, "head": st.head, "streams": streams,
                 "shared": dict(st.shared), "dims": dict(st.dims)}
        entry["n_streams"] = {s: int(m.n) for s, m in mom.items()}
        entry["n_skipped"] = {s: int(m.n_skipped) for s, m in mom.items()}
        first = "h_a" if "h_a" in mom else (streams[0] if streams else None)
        entry["n"] = int(mom[first].n) if first else 0
        entry["alpha_cov"] = A.six_alignments(view, "cov")
        entry["alpha_second"] = A.six_alignments(view, "second_moment")
        entry["mean_ratio"] = {s: m.mean_ratio() for s, m in mom.items()}
        # float64 on the states' own device (a GPU makes the eigendecompositions of big layers
        # fast); MPS has no float64, so it goes through the CPU.
        mat = {_ATTR[s]: _f64(getattr(m, kind)()) for s, m in mom.items()}

        def side(letter):
            for s in _SIDE[letter]:
                if s in mom:
                    return s
            return None

        for letter in ("h", "g"):
            s = side(letter)
            entry[f"r_{letter}"] = None if s is None else mom[s].mean_ratio()
            entry[f"effective_rank_{letter}"] = None if s is None else A.effective_rank(mat[_ATTR[s]])
            entry[f"side_{letter}"] = s

        W = st.weight()
        W = None if W is None else _f64(W)
        exps = None
        raw, raw_why = _raw_moments(st, mom) if use_raw else (None, "kind")
        if not light:
            entry["identity"] = None if W is None else _identity(A, st, W, mom, mat, kind, raw)
            entry["identity_residual"] = _larger_residual(entry["identity"])
        try:
            if W is not None and raw is not None:
                Wr, Ha, Gb = raw["W"], raw["H_a"], raw["G_b"]
                exps = A.fit_exponents(Wr, Ha, Wr.T @ Gb @ Wr, Wr @ Ha @ Wr.T, Gb, floor=floor)
                entry["exponent_moments"] = "raw"
                entry["exponent_moments_why"] = raw["why"]
            elif W is not None and "H_a" in mat and "G_a" in mat:
                exps = A.fit_exponents(W, mat["H_a"], mat["G_a"], mat.get("H_b"), mat.get("G_b"),
                                       floor=floor)
                entry["exponent_moments"] = kind
                entry["exponent_moments_why"] = _kind_why(kind, st, raw_why)
        except (ValueError, RuntimeError) as exc:
            warnings.warn(f"fit_exponents failed: {exc}", RuntimeWarning)
        if exps is None:
            entry["exponent_moments"] = entry["exponent_moments_why"] = None
        entry["exponents"] = None if exps is None or light else exps.to_dict()
        spectra = {}
        if exps is not None and entry["exponent_moments"] == "raw":
            # spectra and the pairing slope (the paper's Fig. 3) stay on the kind matrices
            spectra = {k: A.eigh(m)[0].cpu().numpy() for k, m in mat.items()}
        if exps is not None:
            entry["p"], entry["q"] = exps.p.slope, exps.q.slope
            entry["commutation"] = exps.commutation
            if exps.forward is not None:
                entry["forward_slope"] = exps.forward.slope
                entry["forward_slope_source"] = "W basis"
            else:
                entry["forward_slope"], entry["forward_slope_source"] = None, None
        else:
            entry.update({"p": None, "q": None, "commutation": None, "forward_slope": None,
                          "forward_slope_source": None, "phase": None, "phase_holds": []})
            if st.kind == "head":
                why = ("per-head streams (no weight): only the forward RGA applies; no "
                       "exponents and no raw moments")
            elif W is not None and ("H_a" not in mat or "G_a" not in mat):
                why = "needs H_a and G_a (missing: " + ", ".join(
                    k for k in ("H_a", "G_a") if k not in mat) + ")"
            else:
                why = "no exponents"
            entry["phase_explanation"] = why
            if st.kind == "head":
                entry["exponent_moments_why"] = ("no exponents: a head has no weight W (no singular "
                                                 "basis, no identities, no raw moments)")
            spectra = {k: A.eigh(m)[0].cpu().numpy() for k, m in mat.items()}
        entry["spectra"] = spectra or None
        # The paper's Fig. 3 quantity: sorted eigenvalues of H_b against those of G_b.
        lam = spectra if spectra else ({} if exps is None else {
            "H_b": exps.pairing.get("lambda_Hb"), "G_b": exps.pairing.get("lambda_Gb")})
        fit = None
        if lam.get("H_b") is not None and lam.get("G_b") is not None:
            fit = A.pairing_fit(lam["H_b"], lam["G_b"], floor)
        entry["pairing_slope"] = None if fit is None else fit[0]
        if entry["forward_slope"] is None and fit is not None and st.kind == "head":
            entry["forward_slope"], entry["forward_slope_source"] = fit[0], "sorted spectra"

        if light:
            return entry, {}
        intervals = None
        entry["se"] = None
        if loo is not None:
            entry["se"], intervals = _standard_errors(A, entry, loo, loo_why)
        _verdict(A, st, entry, view, mom, mat, kind, W, raw, exps, gates, intervals)

        mats = {k: _downsize(m.cpu().numpy(), heatmap_size) for k, m in mat.items()}
        if W is not None:
            for key, fn in (("Z_a", view.Z_a), ("Z_b", view.Z_b)):
                z = fn()
                if z is not None:
                    mats[key] = _downsize(z.detach().double().cpu().numpy(), heatmap_size)
        return entry, mats

    # ----------------------------------------------------------------- views
    def spectra(self, name: str) -> Dict[str, np.ndarray]:
        """Eigenvalues (descending) per matrix (``H_a``, ``G_a``, ``H_b``, ``G_b``) of a layer."""
        e = self.layers[name]
        out = {}
        ex = e.get("exponents")
        if ex and ex.get("pairing"):
            names = {"lambda_H": "H_a", "lambda_G": "G_a", "lambda_Hb": "H_b", "lambda_Gb": "G_b"}
            for k, v in ex["pairing"].items():
                if k in names and v is not None:
                    out[names[k]] = np.array([np.nan if x is None else x for x in v], dtype=float)
        for k, v in (e.get("spectra") or {}).items():
            out[k] = np.array([np.nan if x is None else x for x in v], dtype=float)
        return out

    def to_dict(self) -> dict:
        d = {"format": _FORMAT, "meta": self.meta, "layers": self.layers}
        if self.alpha_series is not None:
            d["alpha_series"] = self.alpha_series
        return d

    def to_json(self, path) -> str:
        """Write the report (numbers only, strict JSON); returns the path."""
        path = os.fspath(path)
        d = os.path.dirname(path)
        if d:
            os.makedirs(d, exist_ok=True)
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1, allow_nan=False)
        return path

    @classmethod
    def from_json(cls, path) -> "Report":
        """Read a report written by :meth:`to_json`. The file is checked before anything uses
        it (:func:`read_json`, :func:`check_report_dict`): a malformed one raises ``ValueError``
        with a one-line message naming the file and the offending field."""
        path = os.fspath(path)
        d = read_json(path)
        check_report_dict(d, os.path.basename(path) or path)
        return cls(d["layers"], d.get("meta", {}), alpha_series=d.get("alpha_series"))

    # ----------------------------------------------------------------- table
    def table(self, legend: bool = True) -> str:
        """A readable fixed-width table: one row per layer, then the settings, the notes and
        (``legend``) what every column and phase name means (:meth:`legend`)."""
        cols = [("layer", None), ("kind", None), ("n", None),
                ("fRGA", "forward_RGA"), ("fRWA", "forward_RWA"), ("fGWA", "forward_GWA"),
                ("bRGA", "backward_RGA"), ("bRWA", "backward_RWA"), ("bGWA", "backward_GWA"),
                ("r_h", "r_h"), ("r_g", "r_g"), ("erank_h", "effective_rank_h"),
                ("erank_g", "effective_rank_g"), ("p", "p"), ("q", "q"),
                ("fslope", "forward_slope"), ("phase", "phase"), ("comm", "commutation"),
                ("fit", "exponent_moments"), ("ident", "identity_residual"),
                ("agree", "agree"), ("verdict", "verdict")]

        def num(v, digits=2):
            if v is None:
                return "-"
            if isinstance(v, float):
                if abs(v) >= 1000:
                    return f"{v:.3g}"
                return f"{v:.{digits}f}"
            return str(v)

        def pm(v, se):
            """``v±se`` (issue 16: the jackknife standard error), 2 decimals, 3 when se < 0.01."""
            if v is None or se is None or not isinstance(v, float):
                return num(v)
            d = 2 if se >= 0.01 or abs(v) >= 1000 else 3
            return f"{num(v, d)}±{se:.{d}f}"

        rows = []
        for name, e in self.layers.items():
            row = [name, e.get("kind", "?"), str(e.get("n", 0))]
            se = e.get("se") or {}
            for label, key in cols[3:]:
                if key in ("forward_RGA", "forward_RWA", "forward_GWA", "backward_RGA",
                           "backward_RWA", "backward_GWA"):
                    row.append(pm((e.get("alpha_cov") or {}).get(key),
                                  (se.get("alpha_cov") or {}).get(key)))
                elif key in ("p", "q", "forward_slope"):
                    row.append(pm(e.get(key), se.get(key)))
                elif key == "effective_rank_h" or key == "effective_rank_g":
                    row.append(num(e.get(key), 1))
                elif key in ("r_h", "r_g", "commutation", "identity_residual"):
                    row.append(num(e.get(key), 3))
                elif key == "exponent_moments":
                    row.append(_FIT_LABEL.get(e.get(key), "-"))
                elif key == "phase":
                    row.append(_phase_cell(e))
                elif key == "agree":
                    row.append((e.get("verdict") or {}).get("agree") or "-")
                elif key == "verdict":
                    row.append((e.get("verdict") or {}).get("label") or "-")
                else:
                    row.append(num(e.get(key)))
            rows.append(row)
        header = [c[0] for c in cols]
        widths = [max(len(header[i]), *(len(r[i]) for r in rows)) if rows else len(header[i])
                  for i in range(len(header))]
        widths[0] = min(widths[0], 40)

        def fmt(r):
            cells = []
            for i, c in enumerate(r):
                c = c if len(c) <= widths[i] else "…" + c[-(widths[i] - 1):]
                left = i < 2 or header[i] == "verdict"
                cells.append(c.ljust(widths[i]) if left else c.rjust(widths[i]))
            return "  ".join(cells).rstrip()

        lines = [fmt(header), "  ".join("-" * w for w in widths)]
        lines += [fmt(r) for r in rows]
        m = self.meta
        lines.append("")
        lines.append(f"α on {'covariances' if m.get('kind', 'cov') == 'cov' else 'second moments'} "
                     f"of the {'normalized ' if m.get('normalize', True) else ''}rows; "
                     f"steps={m.get('steps')}, normalize={m.get('normalize')}, "
                     f"phase tol={m.get('tol')}")
        fits = [e.get("exponent_moments") for e in self.layers.values() if e.get("exponent_moments")]
        if fits:
            n_raw = sum(f == "raw" for f in fits)
            lines.append(f"exponents, comm and phase on raw second moments (bias folded in) for "
                         f"{n_raw} of {len(fits)} layers"
                         + ("" if n_raw == len(fits) else
                            f"; on the {'covariances' if m.get('kind', 'cov') == 'cov' else 'second moments'}"
                            f" of the {'normalized ' if m.get('normalize', True) else ''}rows for "
                            f"the rest (no raw moments: Collector(raw_moments=True))"))
        jk = m.get("jackknife")
        if jk:
            lines.append(f"± : {jk.get('method')} standard error over K={jk.get('k')} blocks "
                         f"(by {jk.get('by')}); 95 % interval = (value − bias) ± {_num(jk.get('z'))}·se "
                         f"(t with K − 1 dof; report.json: se.interval, se.bias)")
        for note in m.get("notes", []):
            lines.append(f"note: {note}")
        if legend:
            lines += ["", self.legend()]
        return "\n".join(lines)

    def legend(self) -> str:
        """What each column of :meth:`table` and each phase name means (docs/spec.md §1, §3, §4), as
        the lines printed under the table."""
        from .analysis import PHASES, VerdictGates
        shown = {str(e.get("phase")) for e in self.layers.values() if e.get("phase")}
        gd = dict(VerdictGates().to_dict())
        gd.update({k: v for k, v in (self.meta.get("verdict_gates") or {}).items() if k in gd})
        gate_text = (f"modes: at least {gd['min_modes']} modes in the fit; p, q: R² ≥ "
                     f"{gd['min_r2']:g} or residual scatter ≤ {gd['max_scatter']:g}·sd(log z); "
                     f"commutation: error of H_a and of G_a with Z_a ≤ {gd['max_commutation']:g}")
        rows = [
            ("layer", "module name (per-head layers: <module>.head<i>)"),
            ("kind", "linear, conv2d, conv1d (Hugging Face Conv1D) or head (one attention head's output)"),
            ("n", "rows counted (of h_a; heads: of h_b): samples × tokens or positions"),
            ("fRGA fRWA fGWA", "forward side = the layer's output side (h_b, g_b, Z_b = W Wᵀ): "
                               "α(H_b, G_b), α(H_b, Z_b), α(G_b, Z_b)"),
            ("bRGA bRWA bGWA", "backward side = the layer's input side (h_a, g_a, Z_a = Wᵀ W): "
                               "α(H_a, G_a), α(H_a, Z_a), α(G_a, Z_a)"),
            ("", "RGA, RWA, GWA: representation–gradient, representation–weight, gradient–weight "
                 "alignment; α = Pearson correlation of the two matrices' entries, in [-1, 1], 1 "
                 "when proportional; two random rank-40 covariances of dimension 200 give ≈ 0.14"),
            ("r_h r_g", "‖E[x]‖² / tr E[x xᵀ] of the normalized activations h and gradients g of the "
                        "input side (heads: output side): 0 = zero mean, 1 = every row the same "
                        "(paper Fig. 10)"),
            ("erank_h erank_g", "effective rank of H and G (same side): exp of the entropy of the "
                                "normalized eigenvalues"),
            ("p q", "exponents h_i ~ z_i^p and g_i ~ z_i^q in W's singular basis: z_i = s_i², "
                    "h_i = v_iᵀ H_a v_i, g_i = v_iᵀ G_a v_i (input side)"),
            ("fslope", "forward slope: log u_iᵀH_b u_i against log u_iᵀG_b u_i in W's left singular "
                       "basis (heads: of the sorted spectra); (p+1)/(q-1) when the matrices commute"),
            ("comm", "how far H_a is from commuting with Z_a (off-diagonal energy of VᵀH_aV, 0 to 1): "
                     "p, q and the phase can be trusted only when it is small"),
            ("fit", "the matrices p, q, fslope, comm and the phase were fitted on: raw = raw second "
                    "moments with the bias folded in (h_a → (h_a, 1), W → [W | b]), for which "
                    "H_b = W H_a Wᵀ and G_a = Wᵀ G_b W hold exactly; cov = the normalized "
                    "covariances α uses (the collector kept no raw moments); sm = their second "
                    "moments"),
            ("ident", "identity residual: how far the covariances α uses are from H_b = W H_a Wᵀ "
                      "and G_a = Wᵀ G_b W, the identities the (p, q) lines rest on (the larger "
                      "of min_c ‖B − c·M‖_F / ‖B‖_F over the two, 0 to 1): near 0, the lines "
                      "apply to those covariances too; large, they describe the raw moments "
                      "only (report.json's identity also has α(B, M) per identity)"),
            ("phase", "exponent reading: the phase of the paper's Table 1 that (p, q) indicate, "
                      "named only when the fit passes the gates (" + gate_text + "); a relation "
                      "holds within tol of its line:"),
        ]
        for name, ph in PHASES.items():
            where = "" if ph.point is None else f", at (p, q) = ({ph.point[0]:g}, {ph.point[1]:g})"
            rows.append((f"  {name}", ph.description + where))
        rows.append(("  none", "(p, q) near no phase: no backward line crosses a forward line "
                               "there (partial CRH at most)"))
        rows.append(("  flat", f"z is flat on the effective support (the largest modes carrying "
                               f"{gd['support_energy']:.0%} of ‖Z‖²_F = Σ z_i², max z / min z ≤ "
                               f"{math.exp(gd['flat_log_span']):.3g}): Z ∝ a projection there, "
                               f"the exponents are undefined; Table 1 allows CRH and phases 1–3"))
        rows.append(("  undet:…", "undetermined: the fit failed the gates listed (modes, p, q, "
                                  "commutation; report.json's verdict.exponent.gates has each "
                                  "value and limit), so no phase is named"
                     + ("; interval: with standard errors, a line holds only when the 95 % "
                        "interval of (p, q)'s signed distance to it lies within ±tol, and "
                        "lines whose interval crosses ±tol could name different phases"
                        if self.meta.get("jackknife") else "")))
        for other in sorted(shown - set(PHASES) - {"none", "flat", "undetermined"}):
            rows.append((f"  {other}", "see phase_explanation in report.json"))
        rows.append(("-", "undefined: a stream not collected, a constant matrix, no weight (heads) "
                          "or a fit on fewer than 2 modes above the floor (report.json's "
                          "phase_explanation says which)"))
        rows.append(("agree", "do the two readings name the same Table 1 row? yes, no, ? (the "
                              "exponent reading names none: undetermined, or a flat z beside a "
                              "phase that has a (p, q) point), - (trivial layer)"))
        rows.append(("verdict", f"α reading: a relation holds when α ≥ max({gd['alpha_threshold']:g}, "
                                f"baseline + {gd['alpha_margin']:g}), the baseline being α of two "
                                f"random covariances of the layer's dimension and of the two "
                                f"matrices' effective ranks; named by the Table 1 row with the "
                                f"most relations that all hold (CRH: all six), +X: relations that "
                                f"hold beyond it, partial: some hold but no row, none: none hold, "
                                f"undefined: no α (e.g. no gradients seen); "
                                f"trivial: not classified (d_out=1, d_in=1, tiny: a dimension ≤ "
                                f"{gd['tiny_dim']}, white input: H_a ∝ I); report.json's verdict "
                                f"holds both readings, every gate and the reasons"
                                + ("; with standard errors (±) a relation holds only when its "
                                   "whole 95 % interval clears the bar, ?X: X's interval "
                                   "straddles the bar (undetermined), undet: A/B: the row "
                                   "depends on undetermined relations"
                                   if self.meta.get("jackknife") else "")))
        if self.meta.get("jackknife"):
            rows.append(("±", "jackknife standard error (Collector(blocks=K): the states kept as "
                              "K sub-states, each number recomputed without each block; "
                              "docs/usage.md \"Standard errors\")"))
        width = max(len(k) for k, _ in rows)
        out = ["Legend (docs/spec.md §1, §3, §4):"]
        for k, text in rows:
            out += textwrap.wrap(text, 100, initial_indent=f"  {k.ljust(width)}  ",
                                 subsequent_indent=" " * (width + 4),
                                 break_on_hyphens=False)
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()

    # ----------------------------------------------------------------- plots
    def plot(self, out_dir, *, heatmaps: bool = True, max_heatmaps: Optional[int] = None) -> List[str]:
        """Write the figures as PNGs under ``out_dir``; returns their paths.

        ``alpha.png`` (six α per layer, covariance and second-moment panels), ``spectra.png``
        (eigenvalue log-log scatter with fitted slopes, paper Fig. 3), ``exponents.png`` (h, g
        against z with the fitted p, q), ``phase.png`` (the (p, q) diagram with the six lines
        and each layer as a point), ``alpha_series.png`` (the six α against the step per layer)
        when the report has an α series and, when the matrices are in memory, one
        ``heatmap_<layer>.png`` per layer (H, G, Z; paper Fig. 2). Needs matplotlib.
        """
        from . import plots
        return plots.plot_report(self, os.fspath(out_dir), heatmaps=heatmaps,
                                 max_heatmaps=max_heatmaps)

    def __repr__(self) -> str:
        return f"Report({len(self.layers)} layers, phases={[e.get('phase') for e in self.layers.values()]})"
