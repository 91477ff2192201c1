"""The LIF of SPEC §2 written out step by step, autograd through every op: the independent
reference for the fused neuron's tests, and the "before" path of benchmarks/train_speed.py
(training ran this way before the fused neuron). Nothing here imports i2e_deploy."""

from __future__ import annotations

import math

import torch


class StepSpike(torch.autograd.Function):
    """Heaviside forward; arctan surrogate (alpha = 2) backward."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (1.0 / (1 + (math.pi * x) ** 2))


def lif_step(v, x):
    """One timestep (tau 2, threshold 1, hard reset detached): (spike, new membrane)."""
    h = v * 0.5 + x
    s = StepSpike.apply(h - 1.0)
    return s, h * (1.0 - s.detach())


def step_by_step(x):
    """Spikes of time-major ``x`` ``[T, ...]``: a Python loop of ``lif_step``."""
    v, spikes = torch.zeros_like(x[0]), []
    for x_t in x:
        s, v = lif_step(v, x_t)
        spikes.append(s)
    return torch.stack(spikes)
