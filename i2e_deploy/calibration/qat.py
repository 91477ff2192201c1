"""INT8-exact checkpoints: weights on the per-channel INT8 grid the deploy graph quantizes to.

In the INT8 graph every activation a conv or linear layer reads is exact (0/1), so the only
difference to FP32 is the rounding of the BN-folded weights. A checkpoint whose folded
weights already lie on that grid therefore gives an INT8 graph that computes what its FP32
graph computes. Spiking networks are sensitive to that rounding (a membrane near the
threshold flips a spike, and flips cascade through the membrane shortcuts), so instead of
rounding after training, :func:`finetune_int8` fine-tunes with the rounding in the forward
pass (straight-through gradients, BatchNorm frozen as the deploy graph folds it), distilling
from the original FP32 model, and :func:`snap_to_int8_grid` puts the result exactly on the
grid. Such checkpoints are stored as INT8 weights with per-channel scales, which is lossless
for them (FP16 storage would move the weights off the grid again).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..device import torch_device
from ..errors import I2EError
from ..model.checkpoint import QMAX, load_checkpoint, save_checkpoint
from ..model.msresnet import MSResNet


def conv_bn_pairs(model: MSResNet) -> Iterator[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """Every conv with the BatchNorm the deploy graph folds into it."""
    yield model.conv1, model.bn1
    for stage in range(1, 5):
        for block in getattr(model, f"layer{stage}"):
            yield block.conv1, block.bn1
            yield block.conv2, block.bn2
            if block.downsample is not None:
                yield block.downsample[1], block.downsample[2]


def _fold(bn: nn.BatchNorm2d | None, channels: int, like: torch.Tensor) -> torch.Tensor:
    """Per-output-channel factor BatchNorm folding multiplies the weight by (float64, as
    ``export.deploy.fold_bn``), shaped to broadcast over the weight."""
    if bn is None:
        factor = torch.ones(channels, dtype=torch.float64, device=like.device)
    elif bn.running_var is None:
        raise ValueError("a BatchNorm without running statistics cannot be folded")
    else:
        factor = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    return factor.view(-1, *[1] * (like.dim() - 1))


def fake_quantize(folded: torch.Tensor) -> torch.Tensor:
    """Per-channel symmetric INT8 rounding of folded weights, straight-through gradient."""
    step = folded.detach().abs().flatten(1).amax(1).clamp_min(1e-12) / QMAX
    step = step.view(-1, *[1] * (folded.dim() - 1))
    rounded = torch.clamp(torch.round(folded / step), -QMAX, QMAX) * step
    return folded + (rounded - folded).detach()


class _FoldedInt8(nn.Module):
    """Parametrization: the weight the INT8 graph will use, mapped back through the fold."""

    def __init__(self, bn: nn.BatchNorm2d | None):
        super().__init__()
        self._bn = [bn]  # a list keeps BatchNorm out of this module's state_dict

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        fold = _fold(self._bn[0], weight.shape[0], weight).to(weight.dtype)
        return fake_quantize(weight * fold) / fold


def _layers(model: MSResNet):
    yield from conv_bn_pairs(model)
    yield model.fc, None


@torch.no_grad()
def snap_to_int8_grid(model: MSResNet) -> MSResNet:
    """Move every conv / linear weight (in place) so that, once BatchNorm is folded, it lies
    exactly on its per-channel INT8 grid."""
    for layer, bn in _layers(model):
        fold = _fold(bn, layer.weight.shape[0], layer.weight)
        folded = layer.weight.double() * fold
        step = folded.abs().flatten(1).amax(1).clamp_min(1e-300) / QMAX
        step = step.view_as(fold)
        layer.weight.copy_(
            (torch.clamp(torch.round(folded / step), -QMAX, QMAX) * step / fold).to(
                layer.weight.dtype
            )
        )
    return model


def grid_error(model: MSResNet) -> float:
    """Largest distance of a folded weight from its INT8 grid point, in grid steps (0 for an
    INT8-exact model, up to 0.5 for an arbitrary one)."""
    worst = 0.0
    with torch.no_grad():
        for layer, bn in _layers(model):
            folded = layer.weight.double() * _fold(bn, layer.weight.shape[0], layer.weight)
            step = folded.abs().flatten(1).amax(1).clamp_min(1e-300) / QMAX
            ratio = folded / step.view(-1, *[1] * (folded.dim() - 1))
            worst = max(worst, float((ratio - ratio.round()).abs().max()))
    return worst


def finetune_int8(
    checkpoint: str | os.PathLike,
    data: str | os.PathLike,
    output: str | os.PathLike,
    *,
    steps: int = 500,
    batch: int = 32,
    lr: float = 1e-3,
    temperature: float = 2.0,
    label_weight: float = 0.5,
    workers: int = 2,
    seed: int = 0,
    device: str = "cpu",
    log=print,
) -> Path:
    """Quantization-aware fine-tuning of ``checkpoint`` on the training images of ``data``
    (an ImageFolder; the held-out split named by the card's provenance is excluded), then
    :func:`snap_to_int8_grid`; writes a checkpoint (INT8 weight storage) whose INT8 graph
    equals its FP32 graph (float32 throughout: the rounding is what is learnt). The loss distils
    the original model's logits (temperature-scaled KL) plus
    ``label_weight`` x cross-entropy on the labels."""
    from torch.utils.data import DataLoader

    from ..images import Readable, skip_unreadable
    from ..training.data import Subset, image_folder, source_size, split_indices, train_transform

    if steps < 1 or batch < 1:
        raise I2EError("--steps and --batch must be at least 1")
    torch.manual_seed(seed)
    run_on = torch_device(device)
    teacher, card = load_checkpoint(checkpoint)
    student, _ = load_checkpoint(checkpoint)
    teacher.to(run_on)
    student.to(run_on)
    folder = image_folder(data)
    names = card.class_names or [str(i) for i in range(card.num_classes)]
    unknown = [c for c in folder.classes if c not in names]
    if unknown:
        raise I2EError(
            f"{data}: class folder(s) {', '.join(unknown[:3])} are not classes of "
            f"the model ({', '.join(names[:5])}, ...)"
        )
    to_model_label = torch.tensor([names.index(c) for c in folder.classes], device=run_on)
    train_idx = list(range(len(folder)))
    held = card.provenance.get("val_split")
    if held:
        if (held if held >= 1 else held * len(folder)) >= len(folder):
            raise I2EError(
                f"{data} has {len(folder)} images and the model's card holds out "
                f"{held:g} of its training folder: give the folder it was trained on"
            )
        train_idx, _ = split_indices(folder.targets, held, card.provenance.get("seed", 0))
    style = card.provenance.get("augment", "cifar")
    dataset = Subset(folder, train_idx, train_transform(card, style, source_size(folder)))
    loader = Readable(
        DataLoader(
            dataset,
            batch_size=batch,
            shuffle=True,
            drop_last=True,
            num_workers=workers,
            pin_memory=run_on.type == "cuda",
            collate_fn=skip_unreadable,
        ),
        data,
    )
    for layer, bn in _layers(student):
        parametrize.register_parametrization(layer, "weight", _FoldedInt8(bn))
    # Eval mode throughout: BatchNorm frozen as the deploy graph folds it, the converter's
    # fixed kernels; the surrogate gradient does not depend on the mode.
    teacher.eval().requires_grad_(False)
    student.eval()
    optimizer = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    step, began = 0, time.time()
    while step < steps:
        for images, labels in loader:
            images, labels = images.to(run_on, non_blocking=True), labels.to(run_on)
            with torch.no_grad():
                target = torch.softmax(teacher(images) / temperature, dim=1)
            logits = student(images)
            distill = (
                nn.functional.kl_div(
                    torch.log_softmax(logits / temperature, dim=1), target, reduction="batchmean"
                )
                * temperature**2
            )
            loss = distill + label_weight * nn.functional.cross_entropy(
                logits, to_model_label[labels]
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if step % 25 == 0 or step == steps:
                agree = (logits.argmax(1) == target.argmax(1)).float().mean().item()
                log(
                    f"qat step {step}/{steps}: loss {loss.item():.4f}, batch agreement with "
                    f"the original {agree:.2%} ({(time.time() - began) / step:.2f} s/step)"
                )
            if step >= steps:
                break
        loader.report()
    for layer, _ in _layers(student):
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
    student.cpu()
    snap_to_int8_grid(student)
    card.provenance = {
        **card.provenance,
        "int8_exact": True,
        "qat": {
            "from": Path(checkpoint).name,
            "steps": steps,
            "batch": batch,
            "lr": lr,
            "temperature": temperature,
            "label_weight": label_weight,
            "seed": seed,
        },
    }
    for key in ("sha256", "source", "heldout_top1", "heldout_top5", "heldout_top1_float32"):
        card.provenance.pop(key, None)  # describe the original model, not this one
    card.provenance["weights_dtype"] = "int8 per-channel (INT8-exact), BatchNorm float32"
    save_checkpoint(output, student, card, weights="int8")  # refuses weights off the grid
    return Path(output)
