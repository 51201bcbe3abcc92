"""simclr: self-supervised contrastive training of the small ResNet on Fashion-MNIST (paper res2,
Fig. 6, §6 "Self-Supervised Learning", C.4).

res2 trains ResNet-18 on CIFAR-10/100 with SimCLR (Chen et al., 2020): the output layer becomes the
128-dimensional projection, batch 512, γ = 5·10⁻⁵, 1000 epochs; Fig. 6 shows α of five layers
over training, "Layers 1-3 are convolutional layers, and layers 4-5 are fully connected ones".
Here: the ResNet-18 of :mod:`.models` (CIFAR stem, width multiplier) with ``fc2`` a
``proj_dim``-dimensional projection, on Fashion-MNIST padded to 32×32 (CIFAR is not available
offline; torchvision does not import here), trained with the NT-Xent loss (temperature τ) on
two views of each image made by cheap augmentations in torch (:func:`augment`: random resized
crop and horizontal flip through one affine resampling, brightness and contrast jitter,
Gaussian noise), SGD with momentum and cosine annealing.

Measured:

* over training, the six α of the five layers of Fig. 6 (the last 3×3 convolution of stages
  2, 3, 4 of the net, then ``fc1`` and ``fc2``) from a collector on the training batches
  (``alpha_every``: the collector's α series, :mod:`crh_kernels.collect.series`); the collector
  is reset after each point, so a point is the α of the rows of the ``alpha_every`` steps
  before it (a window, not everything since step 0); conv layers keep ``max_rows`` random rows
  (positions) per call;
* at the end, the same layers on held-out test images (two views each, the same loss, the net
  in eval mode) with raw moments (``raw_moments=True``: the report's exponents and phases use
  them); ``--set blocks=K`` adds jackknife standard errors (blocks dealt by measurement batch, so
  that the positions of one image stay in one block: the pass is cut into at least K batches
  where the images allow it, which changes the loss's negatives per batch);
* the quality of the learned representation: k-nearest-neighbour accuracy (cosine, ``knn_k``)
  of the test images from ``n_bank`` training images in the backbone's features, at
  initialization and at the end;
* optionally (``weight_decays``, ``batch_sizes``: empty in the cpu profile) a sweep of γ and B,
  each value a full training run, for the paper's "increased α values if we decrease the batch
  size and increase γ".

CPU default: a 1/8-width net, 400 steps of 64 pairs (0.43 epoch): 180 s on one thread here with
the machine shared (67 s of CPU time; NOTES.md).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..plots import figure, save_figure
from . import claims as C
from .claims import layer_summary
from .data import fashion_mnist
from .fcnet import QUOTE_EXPONENTS
from .models import ResNet18
from .resnet import block_batch_size, collector_options
from .runs import Context, ExperimentError, RunResult, make_collector, measure, record_loss, seed_everything

NAME = "simclr"
#: extras.json keys every run writes and the claims and figures read (`crh report` checks them)
EXTRAS = ("series", "conv_layers", "fc_layers", "knn_accuracy", "sweep")
DESCRIPTION = ("SimCLR (NT-Xent) ResNet on Fashion-MNIST (res2): α of 3 conv and 2 FC layers over "
               "training (Fig. 6)")

_BASE = {
    "width": 0.125, "proj_dim": 128, "steps": 400, "batch_size": 64, "temperature": 0.5,
    "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-5, "cosine": True,
    "crop_scale": 0.5, "jitter": 0.4, "noise": 0.1,
    "n_train": 60_000, "n_measure": 512, "measure_batch": 128, "n_bank": 2000, "knn_k": 20,
    "alpha_every": 20, "max_rows": 1024,
    "conv_modules": ["layer2.1.conv2", "layer3.1.conv2", "layer4.1.conv2"], "fc_modules": ["fc1", "fc2"],
    "streams": ["h_a", "h_b", "g_a", "g_b"], "state_dtype": "float64",
    "weight_decays": [], "batch_sizes": [],
    "data_dir": None, "threads": 1, "seeds": 1, "blocks": 0,
}

PROFILES: Dict[str, Dict[str, Any]] = {
    "cpu": dict(_BASE),
    # a GPU-sized run: the full-width net, the paper's batch and γ, a fraction of its 1000 epochs
    "cuda": dict(_BASE, width=1.0, steps=20_000, batch_size=512, n_measure=5000, measure_batch=500,
                 n_bank=10_000, alpha_every=200, max_rows=4096, threads=0),
    # the paper's setting (res2): batch 512, γ = 5e-5, 1000 epochs of the 60 000 training images
    "paper": dict(_BASE, width=1.0, steps=1000 * 60_000 // 512, batch_size=512, n_measure=10_000,
                  measure_batch=500, n_bank=10_000, alpha_every=1000, max_rows=4096, threads=0),
    "tiny": dict(_BASE, width=0.0625, steps=6, batch_size=8, n_train=64, n_measure=32, measure_batch=16,
                 n_bank=64, knn_k=5, alpha_every=2, max_rows=256, weight_decays=[1e-3], batch_sizes=[4]),
}


# ----------------------------------------------------------------------------- augmentations, loss
def augment(x: torch.Tensor, gen: torch.Generator, crop_scale: float = 0.5, jitter: float = 0.4,
            noise: float = 0.1) -> torch.Tensor:
    """A random view of each image of ``x`` ``(B, C, H, W)`` (standardised pixels): a random
    resized crop (side fraction ``s ~ U[√crop_scale, 1]``, so an area in [crop_scale, 1], at a
    random position inside the image) with a horizontal flip half of the time, both through one
    bilinear affine resampling; then contrast and brightness jitter (``x·(1 + u₁) + u₂``,
    ``u ~ U[−jitter, jitter]`` per image) and Gaussian noise of std ``noise``. Draws from ``gen``
    only."""
    if not 0.0 < crop_scale <= 1.0:
        raise ExperimentError(f"crop_scale must be in (0, 1], got {crop_scale!r}")
    b = x.shape[0]
    lo = math.sqrt(crop_scale)
    s = lo + (1.0 - lo) * torch.rand(b, generator=gen)
    tx = (1.0 - s) * (2.0 * torch.rand(b, generator=gen) - 1.0)
    ty = (1.0 - s) * (2.0 * torch.rand(b, generator=gen) - 1.0)
    flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = s * flip
    theta[:, 0, 2] = tx
    theta[:, 1, 1] = s
    theta[:, 1, 2] = ty
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid.to(x.device), mode="bilinear", padding_mode="border", align_corners=False)
    u = (2.0 * torch.rand(2, b, 1, 1, 1, generator=gen) - 1.0).to(x) * jitter
    out = out * (1.0 + u[0]) + u[1]
    if noise > 0:
        out = out + noise * torch.randn(out.shape, generator=gen).to(x)
    return out.contiguous()


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent loss of the projections of two views ``(B, d)`` each: cross-entropy of
    each of the 2B normalized projections against the other 2B − 1 (cosine similarity / τ), its
    own other view the positive; the mean over the 2B anchors."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    sim = (z @ z.T) / temperature
    eye = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(eye, float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


# ----------------------------------------------------------------------------- quality of the features
@torch.no_grad()
def knn_accuracy(model, x_bank, y_bank, x_test, y_test, k: int, device, batch: int = 500) -> float:
    """k-nearest-neighbour accuracy (cosine similarity of the backbone's features, majority
    vote, ties to the nearest) of ``x_test`` from the labelled ``x_bank``; the net in eval mode."""
    was = model.training
    model.eval()
    try:
        def feats(x):
            return torch.cat([F.normalize(model.features(x[i:i + batch].to(device)), dim=1).cpu()
                              for i in range(0, x.shape[0], batch)])
        fb, ft = feats(x_bank), feats(x_test)
    finally:
        model.train(was)
    k = max(1, min(int(k), fb.shape[0]))
    sim = ft @ fb.T
    top = sim.topk(k, dim=1).indices
    votes = y_bank[top]                                    # (N, k), nearest first
    n_cls = int(max(int(y_bank.max()), int(y_test.max()))) + 1
    counts = torch.zeros(votes.shape[0], n_cls).scatter_add_(1, votes, torch.ones(votes.shape))
    # ties: a small bonus for the nearer neighbours' class
    counts.scatter_add_(1, votes[:, :1], torch.full((votes.shape[0], 1), 0.5))
    return float((counts.argmax(1) == y_test).float().mean())


# ----------------------------------------------------------------------------- one training run
def _layers(cfg) -> List[str]:
    return list(cfg["conv_modules"]) + list(cfg["fc_modules"])


def _view_pairs(x, gen, cfg):
    return (augment(x, gen, cfg["crop_scale"], cfg["jitter"], cfg["noise"]),
            augment(x, gen, cfg["crop_scale"], cfg["jitter"], cfg["noise"]))


def _final_measure(model, cfg, ctx, x_test, desc, seed):
    """The report of the measured layers on held-out images: two views each (a fixed generator),
    the NT-Xent loss of each measurement batch, the net in eval mode, raw moments on."""
    n = x_test.shape[0]
    bs = block_batch_size(cfg, n, cfg["measure_batch"])  # with blocks: ≥ K batches where possible
    gen = torch.Generator().manual_seed(seed + 777)
    batches = [_view_pairs(x_test[i:i + bs], gen, cfg) for i in range(0, n, bs)]
    col = make_collector(model, ctx, modules=_layers(cfg), streams=cfg["streams"], state_dtype=cfg["state_dtype"],
                         what=f"{desc} collector", **collector_options(cfg, len(batches)))
    losses = []

    def step(views):
        v1, v2 = views
        z = model(torch.cat([v1, v2]).to(ctx.device))
        loss = nt_xent(z[:v1.shape[0]], z[v1.shape[0]:], cfg["temperature"])
        losses.append(float(loss.detach()))
        return loss

    was = model.training
    model.eval()
    try:
        rep = measure(col, batches, step, ctx, desc=desc, total=len(batches), model=model)
    finally:
        model.train(was)
    return rep, C.mean(losses)


def train_one(cfg: Dict[str, Any], ctx: Context, data, *, weight_decay: float, batch_size: int,
              series: bool, label: str) -> Tuple[Any, Dict[str, Any]]:
    """Train one net from scratch (seeded by ``ctx.seed``) and measure it: ``(report, record)``;
    with ``series`` the training collector keeps the α series (attached to the report)."""
    x_train, x_test, y_test, x_bank, y_bank = data
    seed_everything(ctx.seed)
    model = ResNet18(num_classes=cfg["proj_dim"], in_channels=1, width=cfg["width"]).to(ctx.device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=weight_decay)
    steps = cfg["steps"]
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps) if cfg["cosine"] else None
    gen = torch.Generator().manual_seed(ctx.seed + 1)
    n = x_train.shape[0]
    if batch_size < 2 or batch_size > n:
        raise ExperimentError(f"batch_size must be in [2, {n}] (n_train), got {batch_size}")
    record: Dict[str, Any] = {"weight_decay": weight_decay, "batch_size": batch_size}
    if series:
        with ctx.timed("knn"):
            record["knn_init"] = knn_accuracy(model, x_bank, y_bank, x_test, y_test, cfg["knn_k"], ctx.device)
    col = None
    if series:
        col = make_collector(model, ctx, modules=_layers(cfg), streams=cfg["streams"],
                             state_dtype=cfg["state_dtype"], what="training collector",
                             alpha_every=cfg["alpha_every"], max_rows=cfg["max_rows"] or None)
    perm, pos, curve = torch.randperm(n, generator=gen), 0, []
    model.train()
    try:
        if col is not None:
            col.start()
        with ctx.progress(total=steps, desc=f"train SimCLR {label}".rstrip(), leave=False) as bar:
            for step in range(1, steps + 1):
                if pos + batch_size > n:
                    perm, pos = torch.randperm(n, generator=gen), 0
                idx = perm[pos:pos + batch_size]
                pos += batch_size
                v1, v2 = _view_pairs(x_train[idx], gen, cfg)
                with ctx.timed("train"):
                    z = model(torch.cat([v1, v2]).to(ctx.device))
                    loss = nt_xent(z[:batch_size], z[batch_size:], cfg["temperature"])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if col is not None:
                        col.step()
                        if col.alpha_series is not None and col.alpha_series.due(col.steps):
                            col.reset()  # the next point: the rows of the next window only
                    opt.step()
                    if sched is not None:
                        sched.step()
                record_loss(loss, step, curve, bar, f"SimCLR training {label}".rstrip())
    finally:
        if col is not None:
            col.stop()
    rep, loss = _final_measure(model, cfg, ctx, x_test, f"measure {label}".rstrip(), ctx.seed)
    if col is not None and col.alpha_series is not None:
        rep.alpha_series = col.alpha_series.to_dict()
    record.update(loss_curve=curve[:: max(len(curve) // 200, 1)], measure_loss=loss, layers=layer_summary(rep))
    if series:
        with ctx.timed("knn"):
            record["knn_final"] = knn_accuracy(model, x_bank, y_bank, x_test, y_test, cfg["knn_k"], ctx.device)
    return rep, record


def _rga_mean(layers: Dict[str, Any]) -> float:
    return C.mean(C.rga(v) for v in layers.values())


def run(cfg: Dict[str, Any], ctx: Context) -> RunResult:
    for key in ("conv_modules", "fc_modules"):
        if not isinstance(cfg[key], (list, tuple)) or not all(isinstance(m, str) for m in cfg[key]):
            raise ExperimentError(f"setting {key!r} must be a list of module names, got {cfg[key]!r}")
    if not cfg["alpha_every"] or cfg["alpha_every"] < 1:
        raise ExperimentError(f"setting 'alpha_every' must be a positive integer, got {cfg['alpha_every']!r}")
    x_train, _ = fashion_mnist("train", cfg["data_dir"], limit=cfg["n_train"])
    x_test, y_test = fashion_mnist("test", cfg["data_dir"], limit=cfg["n_measure"])
    x_bank, y_bank = fashion_mnist("train", cfg["data_dir"], limit=cfg["n_bank"])
    data = (x_train, x_test, y_test, x_bank, y_bank)
    base_wd, base_b = float(cfg["weight_decay"]), int(cfg["batch_size"])
    rep, base = train_one(cfg, ctx, data, weight_decay=base_wd, batch_size=base_b, series=True, label="")
    ctx.log(f"kNN accuracy {base['knn_init']:.3f} at initialization, {base['knn_final']:.3f} after "
            f"{cfg['steps']} steps")
    sweep = [dict(base, sweep="base")]
    sweep[0].pop("loss_curve", None)
    reports = {}
    for key, values in (("weight_decay", cfg["weight_decays"]), ("batch_size", cfg["batch_sizes"])):
        for v in values:
            wd = float(v) if key == "weight_decay" else base_wd
            b = int(v) if key == "batch_size" else base_b
            if (wd, b) == (base_wd, base_b):
                continue
            tag = f"{'wd' if key == 'weight_decay' else 'b'}_{v:g}"
            r, rec = train_one(cfg, ctx, data, weight_decay=wd, batch_size=b, series=False, label=tag)
            rec.pop("loss_curve", None)
            sweep.append(dict(rec, sweep=key))
            reports[tag] = r
    extras = {"series": rep.alpha_series, "conv_layers": list(cfg["conv_modules"]),
              "fc_layers": list(cfg["fc_modules"]),
              "knn_accuracy": {"init": base["knn_init"], "final": base["knn_final"]},
              "measure_loss": base["measure_loss"], "loss_curve": base["loss_curve"], "sweep": sweep,
              "epochs": cfg["steps"] * base_b / x_train.shape[0]}
    return RunResult(rep, extras, cfg, reports)


# ----------------------------------------------------------------------------- claims
#: The paper's words behind each claim (verbatim; tests check them against the paper's text).
QUOTE_FC_CONV = ("We see that the RGA holds well for the fully connected layers, but not so strongly for the "
                 "conv layers.")
QUOTE_CONV = "They have significant alignments"
QUOTE_SWEEP = "Experiments do show increased α values if we decrease the batch size and increase γ"


def _present(rep, names: Sequence[str]) -> List[str]:
    return [n for n in names if n in rep.layers]


def _sweep_claim(runs, key: str, *, increasing: bool, claim: str) -> C.Claim:
    """The RGA (mean over the measured layers) against log10 γ or log2 B over the sweep's runs
    (the base run and those of ``key``), a least-squares slope over every (value, seed) point."""
    xs, ys, by = [], [], {}
    for _, _, ex in runs:
        for r in ex["sweep"]:
            if r["sweep"] not in ("base", key):
                continue
            x = r[key]
            y = _rga_mean(r["layers"])
            xs.append(math.log10(x) if key == "weight_decay" else math.log2(x))
            ys.append(y)
            by.setdefault(x, []).append(y)
    name = "log10 γ" if key == "weight_decay" else "log2 B"
    setting = "weight_decays" if key == "weight_decay" else "batch_sizes"
    if len(by) < 2:
        return C.make_claim(
            claim, "§6 res2", f"not run in this profile: --set {setting}=… trains one more net per value",
            f"95 % interval of the slope {'>' if increasing else '<'} 0 over {name}", C.NA, quote=QUOTE_SWEEP)
    label = (lambda g: f"γ={g:g}") if key == "weight_decay" else (lambda b: f"B={b:g}")
    return C.trend_claim(claim, "§6 res2", xs, ys, x_name=name, y_name="RGA (mean over the measured layers)",
                         increasing=increasing, quote=QUOTE_SWEEP, by_x=by, x_label=label)


def claims(rep, extras: Dict[str, Any], cfg: Dict[str, Any]) -> List[C.Claim]:
    """The claims of one run (:func:`claims_over_seeds` of that run alone)."""
    return claims_over_seeds([(None, rep, extras)], cfg)


def claims_over_seeds(runs, cfg: Dict[str, Any]) -> List[C.Claim]:
    """§6 res2 and C.4 over ``runs`` = ``[(seed, report, extras)]``, on the final measurement:
    every number an interval over seeds (one seed: the report's jackknife interval,
    bias-corrected α ± z·se, where it carries standard errors, else undetermined); the γ and B
    trends a least-squares slope over every (value, seed) point of the sweep."""
    rep0, ex0 = runs[0][1], runs[0][2]
    fc = _present(rep0, ex0["fc_layers"])
    conv = _present(rep0, ex0["conv_layers"])
    out: List[C.Claim] = []
    out.append(C.significance_claim(
        runs, [(f"{n} {s[0]}RGA", n, f"{s}_RGA") for n in fc for s in ("forward", "backward")],
        claim="the RGA holds in the fully connected layers (above its own baseline)", source="§6 res2, Fig. 6",
        quote=QUOTE_FC_CONV))
    out.append(C.difference_claim(
        runs, fc, conv, claim="the RGA holds better in the fully connected layers than in the conv layers",
        source="§6 res2, Fig. 6", quote=QUOTE_FC_CONV, better_name="the FC layers", worse_name="the conv layers"))
    out.append(C.significance_claim(
        runs, [(f"{n} {s[0]}RGA", n, f"{s}_RGA") for n in conv for s in ("forward", "backward")],
        claim="the conv layers' representations still align significantly (RGA above its own baseline)",
        source="C.4, Fig. 13", quote=QUOTE_CONV))
    out.append(_sweep_claim(runs, "weight_decay", increasing=True, claim="α increases with the weight decay γ"))
    out.append(_sweep_claim(runs, "batch_size", increasing=False, claim="α increases as the batch size B decreases"))
    items = [(f"{n} {'fwd' if s == 'b' else 'bwd'}", n, s) for n in conv + fc for s in ("a", "b")]
    out.append(C.pairing_exponent_claim(runs, items, source="§5, §6", quote=QUOTE_EXPONENTS))
    return out


# ----------------------------------------------------------------------------- figures
def figures(rep, extras: Dict[str, Any], cfg: Dict[str, Any], out_dir: Path) -> List[str]:
    """Fig. 6: the RGA (forward and backward) of the five layers over training, conv layers
    dashed, FC layers solid, with the training loss; from the run's α series."""
    series = extras.get("series") or {}
    steps = series.get("steps") or []
    if not steps:
        return []
    names = [n for n in list(extras.get("conv_layers", [])) + list(extras.get("fc_layers", []))
             if n in (series.get("layers") or {})]
    fig = figure(11, 4)
    axes = fig.subplots(1, 2)
    for ax, side in zip(axes, ("forward", "backward")):
        for i, name in enumerate(names):
            vals = [float("nan") if v is None else v for v in series["layers"][name][f"{side}_RGA"]]
            conv = name in extras.get("conv_layers", [])
            ax.plot(steps, vals, "--" if conv else "-", marker="o", ms=3,
                    label=f"layer {i + 1}: {name} ({'conv' if conv else 'FC'})")
        ax.set_title(f"{side} RGA α({'H_b, G_b' if side == 'forward' else 'H_a, G_a'})")
        ax.set_xlabel(f"step (each point: the rows of the last {series.get('every')} steps)")
        ax.set_ylabel("α")
        ax.set_ylim(-0.2, 1.02)
        ax.grid(alpha=0.3)
        curve = extras.get("loss_curve") or []
        if curve:
            ax2 = ax.twinx()
            ax2.plot([s for s, _ in curve], [v for _, v in curve], color="grey", lw=0.8, alpha=0.5)
            ax2.set_ylabel("NT-Xent loss (grey)")
    axes[0].legend(fontsize=7, loc="lower right")
    knn = extras.get("knn_accuracy") or {}
    fig.suptitle(f"SimCLR ResNet-18 (width {cfg['width']:g}) on Fashion-MNIST: RGA over training (paper Fig. 6); "
                 f"kNN accuracy {C.fmt(knn.get('init'))} → {C.fmt(knn.get('final'))}")
    return [save_figure(fig, Path(out_dir) / "alpha_over_training_fig6.png")]
