"""Multi-step LIF neuron (SPEC §2) with the arctan surrogate gradient."""
from __future__ import annotations

import math

import torch
from torch import nn

TAU = 2.0
V_THRESHOLD = 1.0
SURROGATE_ALPHA = 2.0


class SpikeATan(torch.autograd.Function):
    """Heaviside step forward; arctan surrogate derivative backward."""

    @staticmethod
    def forward(ctx, membrane_minus_threshold: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(membrane_minus_threshold)
        return (membrane_minus_threshold >= 0).to(membrane_minus_threshold.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        alpha = SURROGATE_ALPHA
        return grad_output * ((alpha / 2) / (1 + (math.pi / 2 * alpha * x).square()))


def lif_step(v: torch.Tensor, x: torch.Tensor, tau: float = TAU,
             v_threshold: float = V_THRESHOLD) -> tuple[torch.Tensor, torch.Tensor]:
    """One timestep: returns (spike, new membrane). Hard reset to 0, reset detached."""
    h = v * (1.0 - 1.0 / tau) + x
    spike = SpikeATan.apply(h - v_threshold)
    return spike, h * (1.0 - spike.detach())


class LIF(nn.Module):
    """Multi-step LIF; the membrane starts at 0 on every call (no state between calls).

    With ``T=None`` the input is time-major ``[T, ...]``. With ``T`` set, the input has time
    folded into the batch ``[T*B, ...]`` (T-major), as every other layer of the network sees
    it, and the output keeps that layout.
    """

    def __init__(self, T: int | None = None, tau: float = TAU, v_threshold: float = V_THRESHOLD):
        super().__init__()
        self.T = T
        self.tau = tau
        self.v_threshold = v_threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x if self.T is None else x.unflatten(0, (self.T, -1))
        v = torch.zeros_like(seq[0])
        spikes = []
        for x_t in seq:
            s, v = lif_step(v, x_t, self.tau, self.v_threshold)
            spikes.append(s)
        out = torch.stack(spikes)
        return out if self.T is None else out.flatten(0, 1)

    def extra_repr(self) -> str:
        return f"T={self.T}, tau={self.tau}, v_threshold={self.v_threshold}"
