"""LDSeg: z_dn = z_t - eps_hat (the paper, Eq. 12) vs the proper x0 estimate, at the same small budget.

Trains the LDSeg module directly (no nnU-Net pipeline) on synthetic 2D cases (``make_case``: a disc = label 1 and a
box = label 2 in two noisy channels), whole 64x64 images as patches, then samples the held-out cases with DDIM
(2 steps, 4 samples) and reports the mean foreground Dice (labels 1 and 2). Usage:

    OMP_NUM_THREADS=1 python benchmarks/ldseg_denoised_latent.py --iterations 300 --seeds 0 1
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from diffnnunet.datasets.synthetic import make_case
from diffnnunet.methods import LDSeg, encode_target
from diffnnunet.networks.latent import latent_layout

ARCH = dict(n_stages=5, features_per_stage=[16, 32, 64, 128, 128], conv_op="torch.nn.modules.conv.Conv2d",
            kernel_sizes=[[3, 3]] * 5, strides=[[1, 1]] + [[2, 2]] * 4, n_conv_per_stage=[2] * 5,
            n_conv_per_stage_decoder=[2] * 4, conv_bias=True,
            norm_op="torch.nn.modules.instancenorm.InstanceNorm2d", norm_op_kwargs={"eps": 1e-5, "affine": True},
            dropout_op=None, dropout_op_kwargs=None, nonlin="torch.nn.LeakyReLU", nonlin_kwargs={"inplace": True})
SHAPE = (64, 64)


def make_split(n: int, seed: int):
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for _ in range(n):
        imgs, lab = make_case(SHAPE, rng)
        imgs = np.stack(imgs)
        images.append((imgs - imgs.mean((1, 2), keepdims=True)) / imgs.std((1, 2), keepdims=True))
        labels.append(lab[None])
    return torch.tensor(np.stack(images)).float(), torch.tensor(np.stack(labels)).float()


def dice_fg(pred: torch.Tensor, labels: torch.Tensor) -> float:
    scores = []
    for c in (1, 2):
        p, g = pred == c, labels == c
        scores.append((2 * (p & g).sum() / (p.sum() + g.sum()).clamp(min=1)).item())
    return float(np.mean(scores))


def run(variant: str, seed: int, iterations: int, batch: int) -> tuple[float, float]:
    torch.manual_seed(seed)
    train_x, train_y = make_split(32, seed=100 + seed)
    test_x, test_y = make_split(8, seed=999)
    latent, denoiser = latent_layout(ARCH, SHAPE)
    model = LDSeg(ARCH, 2, 3, {"latent_strides": latent, "denoiser_strides": denoiser, "denoised_latent": variant})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-5)
    gen = torch.Generator().manual_seed(seed)
    start = time.time()
    for _ in range(iterations):
        idx = torch.randint(0, len(train_x), (batch,), generator=gen)
        x0, _ = encode_target(train_y[idx], 3, False, None)
        loss = model.training_loss(train_x[idx], x0, generator=gen)["loss"]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 12)
        opt.step()
    model.eval()
    probs = model.sample(test_x, steps=2, samples=4, generator=torch.Generator().manual_seed(0))
    return dice_fg(probs.argmax(1, keepdim=True), test_y), time.time() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="+", default=["paper", "x0"])
    args = parser.parse_args()
    for variant in args.variants:
        for seed in args.seeds:
            dice, seconds = run(variant, seed, args.iterations, args.batch)
            print(f"denoised_latent={variant:5s} seed={seed} iterations={args.iterations} "
                  f"foreground Dice={dice:.4f} ({seconds:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
