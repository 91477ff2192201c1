"""MS-ResNet-18/34 against an independent SpikingJelly build of the released architecture."""

from __future__ import annotations

import pytest
import torch
from paper_model import paper_msresnet18, paper_msresnet34
from runtime_models import randomize_batchnorm
from torch import nn

from i2e_deploy.model.msresnet import msresnet18, msresnet34
from i2e_deploy.model.neuron import LIF

BUILDERS = {
    "msresnet18": (msresnet18, paper_msresnet18),
    "msresnet34": (msresnet34, paper_msresnet34),
}


def randomized(model: nn.Module, seed: int) -> nn.Module:
    """Random BN affine and running statistics, so folding/ordering mistakes would show."""
    gen = torch.Generator().manual_seed(seed)
    randomize_batchnorm(model, gen)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.bias.copy_(torch.randn(m.out_features, generator=gen) * 0.01)
    return model


def firing_rates(model: nn.Module) -> list[float]:
    rates = []
    hooks = [
        m.register_forward_hook(lambda mod, i, out: rates.append(out.mean().item()))
        for m in model.modules()
        if isinstance(m, LIF)
    ]
    return rates, hooks


def pair(arch: str, events: bool, num_classes: int = 10, seed: int = 0):
    ours_builder, paper_builder = BUILDERS[arch]
    torch.manual_seed(seed)
    ours = randomized(ours_builder(num_classes, 0.07, "events" if events else "images"), seed)
    paper = paper_builder(num_classes, 0.07, events=events)
    paper.load_state_dict(ours.state_dict())
    return ours, paper


def sample_input(events: bool, size: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if events:
        return (torch.rand(2, 8, 2, size, size, generator=gen) < 0.08).float()
    return torch.rand(2, 3, size, size, generator=gen)


@pytest.mark.parametrize(
    "arch, events, size",
    [
        ("msresnet18", False, 32),
        ("msresnet18", True, 32),
        ("msresnet34", False, 32),
        ("msresnet34", True, 32),
    ],
)
def test_eval_matches_paper_model(arch, events, size):
    ours, paper = pair(arch, events)
    ours.eval(), paper.eval()
    x = sample_input(events, size)
    rates, hooks = firing_rates(ours)
    with torch.no_grad():
        got = ours(x)
        want = paper(x)
        again = paper(x)  # the reference resets its neurons per call
    for h in hooks:
        h.remove()
    assert got.shape == (2, 10)
    assert (got - want).abs().max().item() <= 1e-5
    assert torch.equal(got.argmax(1), want.argmax(1))
    assert torch.equal(want, again)
    # The comparison only means something if neurons actually fire, and not everywhere.
    mean_rate = sum(rates) / len(rates)
    assert 0.01 < mean_rate < 0.9, mean_rate
    assert (got[0] - got[1]).abs().max() > 1e-4  # outputs depend on the input


def test_state_dict_keys_are_released_layout():
    ours, paper = pair("msresnet34", events=False)
    keys = set(ours.state_dict())
    assert keys == set(paper.state_dict())
    for key in (
        "i2e.weight",
        "conv1.weight",
        "bn1.num_batches_tracked",
        "layer1.2.conv2.weight",
        "layer3.5.bn2.running_var",
        "layer2.0.downsample.1.weight",
        "layer4.0.downsample.2.running_mean",
        "fc.weight",
        "fc.bias",
    ):
        assert key in keys
    assert not any(k.startswith(("layer1.0.downsample", "layer2.1.downsample")) for k in keys)
    ours.load_state_dict(paper.state_dict(), strict=True)


def test_train_mode_outputs_and_gradients_match():
    ours, paper = pair("msresnet18", events=True, seed=3)
    ours.train(), paper.train()
    x = sample_input(True, 32, seed=4)
    target = torch.tensor([3, 7])
    loss_ours = nn.functional.cross_entropy(ours(x), target)
    loss_paper = nn.functional.cross_entropy(paper(x), target)
    assert abs(loss_ours.item() - loss_paper.item()) <= 1e-5
    loss_ours.backward()
    loss_paper.backward()
    grads_paper = dict(paper.named_parameters())
    for name in ("conv1.weight", "layer1.0.conv1.weight", "layer4.1.bn2.weight", "fc.weight"):
        g_ours = dict(ours.named_parameters())[name].grad
        assert g_ours.abs().max() > 0, name
        torch.testing.assert_close(g_ours, grads_paper[name].grad, rtol=1e-4, atol=1e-6)
    # BN running statistics are updated the same way (over T*B).
    torch.testing.assert_close(ours.bn1.running_mean, paper.bn1.running_mean)


def test_uint8_nhwc_input_equals_float():
    ours, _ = pair("msresnet18", events=False)
    ours.eval()
    raw = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(ours(raw), ours(raw.permute(0, 3, 1, 2).float() / 255.0))


def test_event_input_shape_checked():
    ours, _ = pair("msresnet18", events=True)
    with pytest.raises(ValueError):
        ours(torch.zeros(2, 4, 2, 32, 32))


@pytest.mark.parametrize("size, stride", [(1, 1), (1, 2), (2, 2), (2, 1), (4, 2)])
def test_training_conv_skips_padding_only_taps_exactly(size, stride):
    """In training, a padded 3x3 conv on a tiny map leaves out taps that read only padding;
    values and gradients equal the whole-kernel conv (float64: no rounding differences)."""
    from i2e_deploy.model.msresnet import Conv2d

    torch.manual_seed(size * 10 + stride)
    conv = Conv2d(4, 6, 3, stride=stride, padding=1, bias=False).double()
    x = torch.randn(3, 4, size, size, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out = conv(x)
    ref = torch.nn.functional.conv2d(x_ref, conv.weight, None, stride, 1)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    grad_out = torch.randn_like(ref)
    (w_grad,) = torch.autograd.grad(out, conv.weight, grad_out, retain_graph=True)
    (w_ref,) = torch.autograd.grad(ref, conv.weight, grad_out, retain_graph=True)
    torch.testing.assert_close(w_grad, w_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        torch.autograd.grad(out, x, grad_out)[0],
        torch.autograd.grad(ref, x_ref, grad_out)[0],
        rtol=0,
        atol=1e-12,
    )
    if size == 1:  # only the centre tap is live: its neighbours get exactly zero gradient
        assert (
            w_grad[:, :, 1, 1].abs().sum() > 0
            and w_grad.abs().sum() == w_grad[:, :, 1, 1].abs().sum()
        )
