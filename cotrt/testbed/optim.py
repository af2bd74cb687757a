"""The optimizer and schedule every testbed training run uses (train.py's base and valve,
coconut.py's stages): one module both import, so neither imports the other."""
from __future__ import annotations

import math

import torch


def optimizer(params, lr: float, steps: int):
    """AdamW, linear warm-up over 10% of the steps (at most 50), cosine decay to 10%."""
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warm = max(1, min(50, steps // 10))

    def lr_at(s):
        if s < warm:
            return (s + 1) / warm
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
