"""resnet: ResNet-18 (CIFAR stem, width multiplier) on Fashion-MNIST padded to 32×32 (paper res1,
Fig. 1, Fig. 19).

res1 trains ResNet-18 on CIFAR-10 with SGD (learning rate 0.01, momentum 0.9, cosine annealing,
batch 128, standard augmentation) and measures, on test points, the six relations of the two
fully connected layers after the convolutional blocks (penultimate ``fc1`` and output ``fc2``).
CIFAR-10 is not available offline here; Fashion-MNIST (Debian ``dataset-fashion-mnist``) is, with
the same 10-class, 32×32 input shape after padding (1 channel). The CPU default is a 1/8-width
net trained for a fraction of an epoch; ``cuda`` is the full-width net and several epochs.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List

import torch
import torch.nn.functional as F

from ..plots import figure, save_figure
from . import claims as C
from .claims import baseline_claim, exponent_range_claim, layer_summary, rga
from .data import fashion_mnist
from .models import ResNet18
from .runs import Context, RunResult, make_collector, measure, record_loss, seed_everything

NAME = "resnet"
#: extras.json keys every run writes and the claims and figures read (`crh report` checks them)
EXTRAS = ("history", "test_accuracy")
DESCRIPTION = "ResNet-18 (CIFAR stem) on Fashion-MNIST 32×32 (res1): six α of the two FC layers (Fig. 1)"

_BASE = {
    "width": 0.125, "steps": 600, "batch_size": 64, "lr": 0.01, "momentum": 0.9,
    "weight_decay": 5e-4, "cosine": True, "augment": True,
    "n_train": 60_000, "n_measure": 2000, "measure_batch": 500, "checkpoints": 4,
    "modules": ["fc1", "fc2"], "streams": ["h_a", "h_b", "g_a", "g_b"], "state_dtype": "float64",
    "data_dir": None, "high_alpha": 0.7, "threads": 1,
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


def _measure(model, cfg, ctx, x_test, y_test, desc):
    col = make_collector(model, ctx, modules=cfg["modules"], streams=cfg["streams"],
                         state_dtype=cfg["state_dtype"], what=f"{desc} collector")
    bs = cfg["measure_batch"]
    n = x_test.shape[0]
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


def claims(rep, extras: Dict[str, Any], cfg: Dict[str, Any]) -> List[C.Claim]:
    layers = [n for n in ("fc1", "fc2") if n in rep.layers] or list(rep.layers)
    out: List[C.Claim] = []
    out.append(baseline_claim(rep, layers, C.RELATIONS, source="Fig. 1, C.7",
                              claim="all six relations hold significantly in the penultimate and output FC layers"))
    thr = float(cfg.get("high_alpha", 0.7))
    vals = {n: rga(layer_summary(rep, [n])[n]) for n in layers}
    out.append(C.Claim(
        f"very good alignment (RGA > {thr}) in the FC layers", "§6 CRH (Fig. 19)",
        ", ".join(f"{n} RGA {C.fmt(v)}" for n, v in vals.items()) + f"; test accuracy {C.fmt(extras.get('test_accuracy'))}",
        f"mean of forward and backward RGA ≥ {thr} in every FC layer",
        all(v >= thr for v in vals.values()) if vals and all(v == v for v in vals.values()) else None))
    hist = [h for h in extras.get("history", []) if h["step"] > 0]
    if len(hist) >= 2:
        first = C.mean(rga(hist[0]["layers"][n]) for n in layers if n in hist[0]["layers"])
        last = C.mean(rga(hist[-1]["layers"][n]) for n in layers if n in hist[-1]["layers"])
        out.append(C.Claim(
            "alignment keeps improving during training", "§6 CRH, Fig. 19",
            f"mean FC RGA at step {hist[0]['step']}: {C.fmt(first)}, at step {hist[-1]['step']}: {C.fmt(last)}",
            "last > first", None if (first != first or last != last) else last > first, last - first))
    out.append(exponent_range_claim(rep, layers, source="§5, §6"))
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
