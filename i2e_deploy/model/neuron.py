"""Multi-step LIF neuron (SPEC §2) with the arctan surrogate gradient.

One definition serves training and inference: :class:`LIF` runs the whole time sequence of
a layer in one autograd function (:class:`MultiStepLIF`). Its forward keeps only the
membrane before the spike, in float32; its backward runs the time recursion once, backwards.
The membrane is float32 whatever the input dtype, and spikes come out in the input dtype
(0 and 1 are exact in bfloat16 and float16).
"""

from __future__ import annotations

import math

import torch
from torch import nn

TAU = 2.0
V_THRESHOLD = 1.0
SURROGATE_ALPHA = 2.0


def surrogate_gradient(
    membrane_minus_threshold: torch.Tensor, alpha: float = SURROGATE_ALPHA
) -> torch.Tensor:
    """d spike / d h of the arctan surrogate: ``(alpha/2) / (1 + (pi/2 * alpha * x)^2)``."""
    scaled = membrane_minus_threshold * (math.pi / 2 * alpha)
    return scaled.square_().add_(1.0).reciprocal_().mul_(alpha / 2)


def _as_steps(x: torch.Tensor, T: int | None) -> torch.Tensor:
    """``[T*B, ...]`` (T-major, ``T`` given) or ``[T, ...]`` -> a ``[T, ...]`` view."""
    return x if T is None else x.unflatten(0, (T, -1))


def lif_forward(
    x: torch.Tensor,
    T: int | None,
    decay: float,
    v_threshold: float,
    membrane: torch.Tensor | None = None,
) -> torch.Tensor:
    """Spikes of ``x`` (layout as :func:`_as_steps`), in ``x``'s dtype and memory format.

    ``membrane``, when given (float32, ``x``'s shape), receives ``h`` of every step: the
    membrane before the spike decision, which is all the backward pass needs.
    """
    steps = _as_steps(x, T)
    spikes = torch.empty_like(x)
    spike_steps = _as_steps(spikes, T)
    h_steps = None if membrane is None else _as_steps(membrane, T)
    v: torch.Tensor | None = None
    for t in range(steps.shape[0]):
        h_out = None if h_steps is None else h_steps[t]
        if v is None:
            h = steps[t].to(torch.float32, copy=True) if h_out is None else h_out.copy_(steps[t])
        else:
            # decay = 1/2 for tau = 2: x + decay*v is exact, as v*decay + x in the SPEC.
            h = torch.add(steps[t], v, alpha=decay, out=h_out)
        fired = h >= v_threshold
        spike_steps[t].copy_(fired)
        if t + 1 < steps.shape[0]:  # hard reset to 0 (h itself is kept when saved)
            v = h.masked_fill(fired, 0.0) if h_out is not None else h.masked_fill_(fired, 0.0)
    return spikes


class MultiStepLIF(torch.autograd.Function):
    """The LIF over a whole sequence; backward with the arctan surrogate and detached reset.

    With ``h_t = decay * v_{t-1} + x_t``, ``s_t = H(h_t - thr)`` and ``v_t = h_t (1 - s_t)``
    (reset detached): ``dL/dh_t = dL/ds_t * sg(h_t) + decay * [h_t < thr] * dL/dh_{t+1}``
    and ``dL/dx_t = dL/dh_t``.
    """

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, T: int | None, decay: float, v_threshold: float
    ) -> torch.Tensor:
        membrane = torch.empty_like(x, dtype=torch.float32)
        spikes = lif_forward(x, T, decay, v_threshold, membrane)
        ctx.save_for_backward(membrane)
        ctx.T, ctx.decay, ctx.v_threshold = T, decay, v_threshold
        return spikes

    @staticmethod
    def backward(ctx, grad_spikes: torch.Tensor):
        (membrane,) = ctx.saved_tensors
        grad_h = surrogate_gradient(membrane - ctx.v_threshold).mul_(grad_spikes)
        carry = (membrane < ctx.v_threshold).float().mul_(ctx.decay)
        grad_steps, carry_steps = _as_steps(grad_h, ctx.T), _as_steps(carry, ctx.T)
        for t in range(grad_steps.shape[0] - 2, -1, -1):
            grad_steps[t].addcmul_(carry_steps[t], grad_steps[t + 1])
        return grad_h.to(grad_spikes.dtype), None, None, None


class LIF(nn.Module):
    """Multi-step LIF; the membrane starts at 0 on every call (no state between calls).

    With ``T=None`` the input is time-major ``[T, ...]``. With ``T`` set, the input has time
    folded into the batch ``[T*B, ...]`` (T-major), as every other layer of the network sees
    it, and the output keeps that layout (and memory format).
    """

    def __init__(self, T: int | None = None, tau: float = TAU, v_threshold: float = V_THRESHOLD):
        super().__init__()
        self.T = T
        self.tau = tau
        self.v_threshold = v_threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        decay = 1.0 - 1.0 / self.tau
        if torch.is_grad_enabled() and x.requires_grad:
            return MultiStepLIF.apply(x, self.T, decay, self.v_threshold)
        return lif_forward(x, self.T, decay, self.v_threshold)

    def extra_repr(self) -> str:
        return f"T={self.T}, tau={self.tau}, v_threshold={self.v_threshold}"
