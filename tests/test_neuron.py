"""The LIF neuron against SPEC §2: hand-computed sequences, surrogate gradient, SpikingJelly."""

from __future__ import annotations

import math

import pytest
import torch
from paper_model import lif as spikingjelly_lif
from spikingjelly.activation_based import functional
from step_lif import lif_step, step_by_step

from i2e_deploy.model.neuron import LIF


def run(inputs: list[float]) -> list[int]:
    x = torch.tensor(inputs).view(-1, 1)
    return LIF()(x).view(-1).int().tolist()


@pytest.mark.parametrize(
    "inputs, spikes",
    [
        # h = v/2 + x; fire at h >= 1, then v = 0.
        ([0.75] * 8, [0, 1, 0, 1, 0, 1, 0, 1]),  # 0.75, 1.125 | 0.75, 1.125 ...
        ([0.6] * 8, [0, 0, 1, 0, 0, 1, 0, 0]),  # 0.6, 0.9, 1.05 | ...
        ([0.5] * 8, [0] * 8),  # 0.5, 0.75, 0.875 ... -> 1 from below
        ([1.0] * 8, [1] * 8),  # exactly the threshold fires
        ([0.5, 0.5, -0.25, 1.0], [0, 0, 0, 1]),  # 0.5, 0.75, 0.125, 1.0625
        ([3.0, 0.5, 0.5, 0.75], [1, 0, 0, 1]),  # reset to 0 after a spike, no carry-over
    ],
)
def test_hand_computed_sequences(inputs, spikes):
    assert run(inputs) == spikes


def test_membrane_values_of_lif_step():
    v = torch.zeros(1)
    expected = [(0, 0.75), (1, 0.0), (0, 0.75), (1, 0.0)]
    for s_want, v_want in expected:
        s, v = lif_step(v, torch.tensor([0.75]))
        assert (s.item(), v.item()) == (s_want, v_want)
    s, v = lif_step(torch.tensor([0.5]), torch.tensor([-0.5]))
    assert (s.item(), v.item()) == (0, -0.25)  # negative membrane is kept, no floor


def test_no_state_between_calls():
    neuron = LIF()
    x = torch.full((1, 4), 0.75)
    first = neuron(x)
    assert first.sum() == 0  # one step of 0.75 stays below threshold...
    assert torch.equal(neuron(x), first)  # ...and again: the membrane did not carry over
    long = torch.rand(8, 3, 5)
    assert torch.equal(neuron(long), neuron(long))


def test_folded_mode_equals_time_major():
    torch.manual_seed(0)
    x = torch.rand(8, 3, 4, 5, 5) * 1.5
    assert torch.equal(LIF(T=8)(x.flatten(0, 1)), LIF()(x).flatten(0, 1))


@pytest.mark.parametrize("h", [1.0, 0.0, 0.5, 1.3, 2.5, -1.0])
def test_surrogate_gradient_is_atan(h):
    x = torch.tensor([[h]], requires_grad=True)
    LIF()(x).sum().backward()
    alpha = 2.0
    expected = (alpha / 2) / (1 + (math.pi / 2 * alpha * (h - 1.0)) ** 2)
    assert x.grad.item() == pytest.approx(expected, rel=1e-6)


def test_matches_spikingjelly_forward_and_backward():
    torch.manual_seed(1)
    x = torch.randn(8, 4, 3, 6) * 0.8 + 0.5
    x_ours = x.clone().requires_grad_()
    x_sj = x.clone().requires_grad_()
    weights = torch.randn(8, 4, 3, 6)
    ours = LIF()(x_ours)
    reference_neuron = spikingjelly_lif()
    functional.reset_net(reference_neuron)
    reference = reference_neuron(x_sj)
    assert torch.equal(ours, reference)
    assert 0.05 < ours.mean() < 0.95
    (ours * weights).sum().backward()
    (reference * weights).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_sj.grad, rtol=1e-5, atol=1e-6)


def _sequence(seed: int, shape=(8, 6, 5, 7, 3)) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(*shape) * 0.8 + 0.5


@pytest.mark.parametrize("seed", range(3))
def test_fused_matches_step_by_step_values_and_gradients(seed):
    x = _sequence(seed)
    weights = torch.randn_like(x)
    x_fused, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    fused, reference = LIF()(x_fused), step_by_step(x_ref)
    assert torch.equal(fused, reference)
    assert 0.05 < fused.mean() < 0.95
    (fused * weights).sum().backward()
    (reference * weights).sum().backward()
    torch.testing.assert_close(x_fused.grad, x_ref.grad, rtol=1e-5, atol=1e-6)


def test_fused_gradient_flows_back_in_time():
    """A hand-computed case: x = [0.6, 0.6], loss = s_1. h_0 = 0.6 (no spike), h_1 = 0.9;
    dL/dx_1 = sg(-0.1), dL/dx_0 = decay * [h_0 < 1] * sg(-0.1) = sg(-0.1) / 2."""
    x = torch.tensor([[0.6], [0.6]], requires_grad=True)
    LIF()(x)[1].sum().backward()
    sg = 1.0 / (1 + (math.pi * -0.1) ** 2)
    assert x.grad.view(-1).tolist() == pytest.approx([sg / 2, sg], rel=1e-6)


def test_folded_channels_last_keeps_layout_and_values():
    x = _sequence(4, (8 * 3, 16, 5, 5)).contiguous(memory_format=torch.channels_last)
    spikes = LIF(T=8)(x)
    assert spikes.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(spikes, step_by_step(x.contiguous().unflatten(0, (8, -1))).flatten(0, 1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_input_keeps_a_float32_membrane(dtype):
    """Spikes out in the input dtype, computed from a float32 membrane: the same spikes as
    float32 on the same (rounded) inputs, and gradients of the input dtype."""
    x = _sequence(5).to(dtype)
    spikes = LIF()(x.requires_grad_())
    assert spikes.dtype == dtype
    assert torch.equal(spikes.float(), step_by_step(x.detach().float()))
    spikes.sum().backward()
    assert x.grad.dtype == dtype


def test_eval_and_training_paths_agree_and_input_is_untouched():
    x = _sequence(6)
    before = x.clone()
    with torch.no_grad():
        inference = LIF()(x)
    assert torch.equal(x, before)
    assert torch.equal(inference, LIF()(x.clone().requires_grad_()))
