"""A small encoder with every layer kind the QAT code handles: Conv2d subsampling (stride 2),
Linear, LayerNorm, pointwise/depthwise/grouped-dilated Conv1d, softmax attention, a Linear head.
Input x [B, T, F]; output [B, T', V]."""

import torch
from torch import nn


class ToyEncoder(nn.Module):
    def __init__(self, feats: int = 16, d: int = 32, vocab: int = 12):
        super().__init__()
        self.sub = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.proj = nn.Linear(4 * ((feats + 1) // 2), d)
        self.norm = nn.LayerNorm(d)
        self.pointwise = nn.Conv1d(d, 2 * d, 1)
        self.depthwise = nn.Conv1d(d, d, 5, padding=2, groups=d)
        self.grouped = nn.Conv1d(d, d, 3, padding="same", groups=4, dilation=2)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, x):
        b = x.shape[0]
        h = torch.relu(self.sub(x.unsqueeze(1)))  # [B, 4, T/2, F/2]
        h = self.proj(h.permute(0, 2, 1, 3).reshape(b, h.shape[2], -1))
        c = self.norm(h).transpose(1, 2)
        c = nn.functional.glu(self.pointwise(c), dim=1)
        h = h + self.grouped(torch.nn.functional.silu(self.depthwise(c))).transpose(1, 2)
        q, k, v = self.qkv(self.norm(h)).chunk(3, dim=-1)
        a = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1) @ v
        h = h + self.out(a)
        return self.head(h)


def toy_batches(n: int = 4, t: int = 40, feats: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, t + 3 * i, feats, generator=g) for i in range(n)]


def train_toy(model: nn.Module, steps: int, *, seed: int = 0, start: int = 0, opt=None, after_step=None) -> nn.Module:
    """`steps` optimizer steps (default SGD, lr 5e-2) of `model` on `toy_batches(steps, seed=seed)`, minimizing
    its squared output; `after_step(model, step)` runs after each (e.g. `update_masks`), steps counted from
    `start` + 1. Returns the model in eval mode."""
    opt = opt if opt is not None else torch.optim.SGD(model.parameters(), lr=5e-2)
    model.train()
    for step, x in enumerate(toy_batches(steps, seed=seed), start=start):
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step(model, step + 1)
    return model.eval()
