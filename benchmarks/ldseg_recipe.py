"""LDSeg recipe ablation on the demo's slices: which setting makes the 2-step sampler good at a short budget.

Trains the ``LDSeg`` module directly (no nnU-Net pipeline, no augmentation) on the preprocessed fold-0 training
slices of a demo work directory (run ``diffnnunet_demo --workdir DIR --trainers LDSegTrainer`` once first), with the
configuration's plans plus the overrides given as JSON, and reports on the fold's validation slices (mean Dice of
labels 1 and 2): ``ae`` (decode the true label latent), ``s1``/``s4`` (2-step DDIM, 1 / 4 chains), and per t the
mean square error of the x0 estimate (``err{t}``) and the Dice of decoding it (``d{t}``). Usage:

    OMP_NUM_THREADS=1 python benchmarks/ldseg_recipe.py --workdir DIR --iters 250 \\
        --set '{"prediction": "eps", "latent_stop_gradient": false, "min_latent_size": 2,
                "loss_weights": {"autoencoder": 0}}'
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from diffnnunet.methods import LDSeg
from diffnnunet.networks.latent import latent_layout

LABELS = (1, 2)


def load_cases(folder: str, keys, patch):
    """Preprocessed 2D cases ``(C, 1, H, W)`` zero-padded to ``patch``: images ``(K, C, *patch)``, labels
    ``(K, 1, *patch)``."""
    import blosc2
    ims, segs = [], []
    for k in keys:
        d = np.asarray(blosc2.open(os.path.join(folder, f"{k}.b2nd"), mode="r")[:])[:, 0]
        s = np.asarray(blosc2.open(os.path.join(folder, f"{k}_seg.b2nd"), mode="r")[:])[:, 0]
        s = s.clip(min=0)  # nnU-Net's -1 outside the nonzero mask is background
        pad = (0, patch[1] - d.shape[-1], 0, patch[0] - d.shape[-2])
        ims.append(F.pad(torch.from_numpy(d).float(), pad))
        segs.append(F.pad(torch.from_numpy(s).long(), pad))
    return torch.stack(ims), torch.stack(segs)


def one_hot(y: torch.Tensor, n: int) -> torch.Tensor:
    return F.one_hot(y[:, 0].clamp(min=0), n).movedim(-1, 1).float()


def dice(prob: torch.Tensor, y: torch.Tensor) -> float:
    pred = prob.argmax(1)
    out = []
    for c in LABELS:
        p, t = pred == c, y[:, 0] == c
        out.append((2 * (p & t).sum() / (p.sum() + t.sum()).clamp(min=1)).item())
    return float(np.mean(out))


@torch.no_grad()
def evaluate(m: LDSeg, x: torch.Tensor, y: torch.Tensor, n: int) -> dict:
    m.eval()
    y1 = one_hot(y, n)
    z_l, z_i = m.encode_label(y1), m.encode_image(x)
    r = {"ae": dice(m.decode(z_l), y),
         "s1": dice(m.sample(x, steps=2, samples=1, generator=torch.Generator().manual_seed(1)), y),
         "s4": dice(m.sample(x, steps=2, samples=4, generator=torch.Generator().manual_seed(1)), y)}
    for t in (0, 500, 900, 999):
        tt = torch.full((len(x),), t, dtype=torch.long)
        z_t = m.process.q_sample(z_l, tt, torch.randn(z_l.shape, generator=torch.Generator().manual_seed(2)))
        x0 = m.estimate_x0(m.predict_noise(z_t, z_i, tt), z_t, tt)
        r[f"err{t}"], r[f"d{t}"] = ((x0 - z_l) ** 2).mean().item(), dice(m.decode(x0), y)
    m.train()
    return r


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="a diffnnunet_demo work directory")
    p.add_argument("--dataset", default="Dataset990_ICBM152Slices")
    p.add_argument("--iters", type=int, default=250)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", default="{}", help="JSON overrides of the plans' diffusion section")
    p.add_argument("--json", default=None, help="write the evaluations here")
    a = p.parse_args(argv)
    pre = os.path.join(a.workdir, "nnUNet_preprocessed", a.dataset)
    cfg = json.load(open(os.path.join(pre, "LDSegPlans.json")))["configurations"]["2d"]
    arch, diffusion, patch = cfg["architecture"]["arch_kwargs"], dict(cfg["diffusion"]), cfg["patch_size"]
    over = json.loads(a.set)
    over["loss_weights"] = {**diffusion["loss_weights"], **over.get("loss_weights", {})}
    diffusion.update(over)
    diffusion["latent_strides"], diffusion["denoiser_strides"] = latent_layout(
        arch, patch, diffusion.get("latent_downsampling", 16), diffusion.get("min_latent_size", 2))
    split = json.load(open(os.path.join(pre, "splits_final.json")))[0]
    folder = os.path.join(pre, cfg["data_identifier"])
    x_tr, y_tr = load_cases(folder, split["train"], patch)
    x_va, y_va = load_cases(folder, split["val"], patch)
    n = len(json.load(open(os.path.join(pre, "dataset.json")))["labels"])

    torch.manual_seed(a.seed)
    m = LDSeg(arch, x_tr.shape[1], n, diffusion)
    opt = torch.optim.AdamW(m.parameters(), lr=a.lr, weight_decay=1e-5)
    warm = max(1, a.iters // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: (
        (i + 1) / warm if i < warm else 0.5 * (1 + math.cos(math.pi * (i - warm) / max(1, a.iters - warm)))))
    g = torch.Generator().manual_seed(a.seed)
    start, history = time.perf_counter(), []
    for it in range(a.iters):
        idx = torch.randint(0, len(x_tr), (a.batch,), generator=g)
        x, y = x_tr[idx], y_tr[idx]
        if torch.rand(1, generator=g) < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        loss = m.training_loss(x, one_hot(y, n), None, g)["loss"]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 12)
        opt.step()
        sched.step()
        if (it + 1) % max(1, a.iters // 2) == 0:
            r = evaluate(m, x_va, y_va, n)
            history.append({"iteration": it + 1, **r})
            print(f"it {it + 1} {time.perf_counter() - start:.0f}s " + " ".join(f"{k}={v:.3f}" for k, v in r.items()),
                  flush=True)
    if a.json:
        json.dump({"set": over, "history": history}, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
