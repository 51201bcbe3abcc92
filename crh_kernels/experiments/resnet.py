"""resnet: ResNet-18 (CIFAR stem, width multiplier) on Fashion-MNIST padded to 32×32 (paper res1,
Fig. 1, Fig. 19).

res1 trains ResNet-18 on CIFAR-10 with SGD (learning rate 0.01, momentum 0.9, cosine annealing,
batch 128, standard augmentation) and measures, on test points, the six relations of the two
fully connected layers after the convolutional blocks (penultimate ``fc1`` and output ``fc2``).
CIFAR-10 is not available offline here; Fashion-MNIST (Debian ``dataset-fashion-mnist``) is, with
the same 10-class, 32×32 input shape after padding (1 channel). The CPU default is a 1/8-width
net trained for a fraction of an epoch; ``cuda`` is the full-width net and several epochs.

The measurement collector accumulates raw moments (``raw_moments=True``: the report's exponents
and phases use them); ``--set blocks=K`` also gives it K blocks, so that the report carries
jackknife standard errors and a one-seed claim on an α gets an interval; ``--seeds N`` trains N
seeds and gives every claim an interval over them.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List

import torch
import torch.nn.functional as F

from ..plots import figure, save_figure
from . import claims as C
from .claims import layer_summary, rga
from .data import fashion_mnist
from .fcnet import QUOTE_EXPONENTS
from .models import ResNet18
from .runs import Context, ExperimentError, RunResult, make_collector, measure, record_loss, seed_everything

NAME = "resnet"
#: extras.json keys every run writes and the claims and figures read (`crh report` checks them)
EXTRAS = ("history", "test_accuracy")
DESCRIPTION = "ResNet-18 (CIFAR stem) on Fashion-MNIST 32×32 (res1): six α of the two FC layers (Fig. 1)"

_BASE = {
    "width": 0.125, "steps": 600, "batch_size": 64, "lr": 0.01, "momentum": 0.9,
    "weight_decay": 5e-4, "cosine": True, "augment": True,
    "n_train": 60_000, "n_measure": 2000, "measure_batch": 500, "checkpoints": 4,
    "modules": ["fc1", "fc2"], "streams": ["h_a", "h_b", "g_a", "g_b"], "state_dtype": "float64",
    "data_dir": None, "high_alpha": 0.7, "threads": 1, "seeds": 1, "blocks": 0,
}

PROFILES: Dict[str, Dict[str, Any]] = {
    "cpu": dict(_BASE),
    "cuda": dict(_BASE, width=1.0, steps=20_000, batch_size=128, n_measure=10_000, measure_batch=1000,
                 checkpoints=10, threads=0),
    "tiny": dict(_BASE, width=0.0625, steps=6, batch_size=16, n_train=256, n_measure=64, measure_batch=32,
                 checkpoints=2),
}


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop with 4-pixel zero padding (in the standardised pixel space) and horizontal flip."""
    b, _, h, w = x.shape
    pad = F.pad(x, (4, 4, 4, 4), value=float(x.min()))
    i = torch.randint(0, 9, (b,), generator=gen)
    j = torch.randint(0, 9, (b,), generator=gen)
    rows = (i[:, None] + torch.arange(h))[:, :, None].expand(b, h, w)
    cols = (j[:, None] + torch.arange(w))[:, None, :].expand(b, h, w)
    out = pad[torch.arange(b)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
    flip = torch.rand(b, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out.contiguous()


def collector_options(cfg: Dict[str, Any], n_batches: int) -> Dict[str, Any]:
    """The measurement collector's options every experiment of this package shares: raw moments
    (the report's exponents and phases use them) and, with ``cfg["blocks"] = K ≥ 2``, K blocks
    for the report's jackknife standard errors — dealt by step (whole batches, so that the rows
    of one image or sentence stay in one block) when the pass has at least K batches, else by
    row. ``blocks`` 0 (the default): none."""
    k = cfg.get("blocks") or 0
    if isinstance(k, bool) or not isinstance(k, int) or k < 0 or k == 1:
        raise ExperimentError(f"setting 'blocks' must be 0 (none) or an integer ≥ 2, got {k!r}")
    opts: Dict[str, Any] = {"raw_moments": True}
    if k:
        opts.update(blocks=k, block_by="step" if n_batches >= k else "row")
    return opts


def block_batch_size(cfg: Dict[str, Any], n: int, batch_size: int) -> int:
    """The measurement batch size for ``n`` samples: ``batch_size``, or smaller so that the pass
    has at least ``cfg["blocks"]`` batches (blocks are then dealt by batch, and the rows of one
    image or sequence stay in one block) as long as a batch keeps at least 2 samples."""
    k = cfg.get("blocks") or 0
    if isinstance(k, int) and not isinstance(k, bool) and k >= 2 and math.ceil(n / batch_size) < k:
        return max(min(batch_size, n // k), 2) if n >= 2 * k else batch_size
    return batch_size


def _measure(model, cfg, ctx, x_test, y_test, desc):
    n = x_test.shape[0]
    bs = block_batch_size(cfg, n, cfg["measure_batch"])
    col = make_collector(model, ctx, modules=cfg["modules"], streams=cfg["streams"],
                         state_dtype=cfg["state_dtype"], what=f"{desc} collector",
                         **collector_options(cfg, math.ceil(n / bs)))
    correct = [0]

    def step(i):
        xb = x_test[i:i + bs].to(ctx.device)
        yb = y_test[i:i + bs].to(ctx.device)
        logits = model(xb)
        correct[0] += int((logits.argmax(1) == yb).sum())
        return F.cross_entropy(logits, yb)

    was = model.training
    model.eval()
    try:
        rep = measure(col, range(0, n, bs), step, ctx, desc=desc, total=math.ceil(n / bs), model=model)
    finally:
        model.train(was)
    return rep, correct[0] / max(n, 1)


def run(cfg: Dict[str, Any], ctx: Context) -> RunResult:
    x_train, y_train = fashion_mnist("train", cfg["data_dir"], limit=cfg["n_train"])
    x_test, y_test = fashion_mnist("test", cfg["data_dir"], limit=cfg["n_measure"])
    seed_everything(ctx.seed)
    model = ResNet18(num_classes=10, in_channels=1, width=cfg["width"]).to(ctx.device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                          weight_decay=cfg["weight_decay"])
    steps = cfg["steps"]
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps) if cfg["cosine"] else None
    gen = torch.Generator().manual_seed(ctx.seed + 1)
    marks = sorted({int(round(steps * k / cfg["checkpoints"])) for k in range(cfg["checkpoints"] + 1)}
                   if cfg["checkpoints"] > 0 else {steps})
    history, curve = [], []
    n = x_train.shape[0]
    perm = torch.randperm(n, generator=gen)
    pos = 0
    rep = acc = None

    def checkpoint(step):
        nonlocal rep, acc
        rep, acc = _measure(model, cfg, ctx, x_test, y_test, desc=f"measure@{step}")
        history.append({"step": step, "test_accuracy": acc, "layers": layer_summary(rep)})

    model.train()
    with ctx.progress(total=steps, desc="train ResNet-18", leave=False) as bar:
        if 0 in marks:
            checkpoint(0)
        for step in range(1, steps + 1):
            if pos + cfg["batch_size"] > n:
                perm, pos = torch.randperm(n, generator=gen), 0
            idx = perm[pos:pos + cfg["batch_size"]]
            pos += cfg["batch_size"]
            xb = x_train[idx]
            if cfg["augment"]:
                xb = _augment(xb, gen)
            with ctx.timed("train"):
                loss = F.cross_entropy(model(xb.to(ctx.device)), y_train[idx].to(ctx.device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
            record_loss(loss, step, curve, bar)
            if step in marks:
                checkpoint(step)
    extras = {"history": history, "loss_curve": curve[:: max(len(curve) // 200, 1)],
              "test_accuracy": acc, "epochs": steps * cfg["batch_size"] / n,
              "parameters": sum(p.numel() for p in model.parameters())}
    ctx.log(f"test accuracy {acc:.3f} after {extras['epochs']:.2f} epochs")
    return RunResult(rep, extras, cfg)


#: The paper's words behind each resnet claim (verbatim; tests check them against the paper's text).
QUOTE_SIX = "We see that all six relations hold significantly across two fully connected layers."
QUOTE_LEVEL = ("very good alignment $\\alpha > 0.7$ is achieved quite early in the training, and continues to "
               "improve during the later stage of training.")


def _short(rel: str) -> str:
    side, what = rel.split("_")
    return f"{side[0]}{what}"


def fc_layers(rep) -> List[str]:
    return [n for n in ("fc1", "fc2") if n in rep.layers] or list(rep.layers)


def claims(rep, extras: Dict[str, Any], cfg: Dict[str, Any]) -> List[C.Claim]:
    """The claims of one run (:func:`claims_over_seeds` of that run alone)."""
    return claims_over_seeds([(None, rep, extras)], cfg)


def claims_over_seeds(runs, cfg: Dict[str, Any]) -> List[C.Claim]:
    """Fig. 1, §6 CRH and the exponent range on the two FC layers over ``runs`` =
    ``[(seed, report, extras)]``: every number an interval over seeds (one seed: the report's
    jackknife interval, bias-corrected α ± z·se, where it carries standard errors, else
    undetermined), the improvement over training a least-squares slope over every
    (checkpoint, seed) point."""
    rep0 = runs[0][1]
    layers = fc_layers(rep0)
    out: List[C.Claim] = []
    out.append(C.significance_claim(
        runs, [(f"{n} {_short(r)}", n, r) for n in layers for r in C.RELATIONS],
        claim="all six relations hold significantly in the penultimate and output FC layers",
        source="Fig. 1, C.7", quote=QUOTE_SIX))
    thr = float(cfg.get("high_alpha", 0.7))
    level = C.level_claim(runs, layers, thr, claim=f"very good alignment (RGA > {thr}) in the FC layers",
                          source="§6 CRH (Fig. 19)", quote=QUOTE_LEVEL)
    level.measured += f"; test accuracy {C.fmt(C.mean(ex.get('test_accuracy') for _, _, ex in runs))}"
    out.append(level)
    xs, ys, by = [], [], {}
    for _, _, ex in runs:
        for h in ex.get("history", []):
            if h["step"] <= 0:
                continue
            y = C.mean(rga(h["layers"][n]) for n in layers if n in h["layers"])
            x = h["step"] / max(cfg["steps"], 1)
            xs.append(x)
            ys.append(y)
            by.setdefault(x, []).append(y)
    out.append(C.trend_claim(
        "alignment keeps improving during training", "§6 CRH, Fig. 19", xs, ys,
        x_name="training (step / steps)", y_name="mean RGA of the FC layers", quote=QUOTE_LEVEL, by_x=by,
        x_label=lambda x: f"step {x * cfg['steps']:.0f}"))
    items = [("fc1 bwd", "fc1", "a"), ("fc1 fwd", "fc1", "b"), ("fc2 bwd", "fc2", "a")]
    out.append(C.pairing_exponent_claim(runs, [i for i in items if i[1] in rep0.layers] or
                                        [(n, n, "a") for n in layers], source="§5, §6", quote=QUOTE_EXPONENTS))
    return out


def figures(rep, extras: Dict[str, Any], cfg: Dict[str, Any], out_dir: Path) -> List[str]:
    hist = extras.get("history") or []
    if not hist:
        return []
    fig = figure(10, 4)
    axes = fig.subplots(1, 2)
    layers = [n for n in ("fc1", "fc2") if n in hist[-1]["layers"]]
    steps = [h["step"] for h in hist]
    colors = {"forward_RGA": "#d62728", "forward_RWA": "#ff7f0e", "forward_GWA": "#bcbd22",
              "backward_RGA": "#1f77b4", "backward_RWA": "#17becf", "backward_GWA": "#9467bd"}
    for ax, name in zip(axes, layers):
        for rel in C.RELATIONS:
            ax.plot(steps, [h["layers"][name]["alpha"].get(rel) if h["layers"][name]["alpha"].get(rel) is not None
                            else float("nan") for h in hist], "o-", color=colors[rel], label=rel.replace("_", " "))
        ax2 = ax.twinx()
        ax2.plot(steps, [h["test_accuracy"] for h in hist], "k--", lw=1)
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("test accuracy (dashed)")
        ax.set_title(f"{name} ({'penultimate' if name == 'fc1' else 'output'} FC layer)")
        ax.set_xlabel("step")
        ax.set_ylabel("α")
        ax.set_ylim(-0.2, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"ResNet-18 (width {cfg['width']:g}) on Fashion-MNIST: six α over training (paper Figs. 1, 19)")
    return [save_figure(fig, Path(out_dir) / "alpha_over_training.png")]
