"""Small models and real images shared by the runner, parity and benchmark tests."""

from __future__ import annotations

import atexit
import functools
import shutil
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from i2e_deploy.card import CIFAR10_CLASSES, ModelCard
from i2e_deploy.model.checkpoint import save_checkpoint
from i2e_deploy.model.msresnet import build_model

SHARED = Path(__file__).resolve().parents[2] / "shared"
CIFAR_TAR = SHARED / "data" / "cifar10-train.tar.gz"


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """PyTorch on one thread while a module runs: its OpenMP threads wait on each other, and
    on a busy 2-core machine (CI trains in the background) two threads ran 10x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@functools.cache
def _session_dir() -> Path:
    """One folder per test session for models several test files share (exports are the
    slow part of these tests)."""
    path = Path(tempfile.mkdtemp(prefix="i2e-runtime-tests-"))
    atexit.register(shutil.rmtree, path, True)
    return path


def active_model(card: ModelCard, seed: int = 0) -> nn.Module:
    """A random MS-ResNet whose neurons fire (5-20 % per layer) and whose logits differ per
    image: untrained BatchNorm statistics leave a fresh model silent, which would make any
    comparison vacuous."""
    torch.manual_seed(seed)
    model = build_model(card)
    randomize_batchnorm(model, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.mul_(4)
    return model.eval()


@torch.no_grad()
def randomize_batchnorm(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """Random BN affine and running statistics (in module order, so two builds of the same
    architecture get the same values): a fresh model's are identities, which would hide
    folding and ordering mistakes."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.copy_(torch.rand(n, generator=gen) * 0.6 - 0.2)
            m.running_mean.copy_(torch.rand(n, generator=gen) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
    return model


def save_active(path: Path, imgsz: int = 32, events: bool = False, seed: int = 0) -> Path:
    card = ModelCard(
        imgsz=imgsz,
        resize=imgsz,
        input="events" if events else "images",
        class_names=list(CIFAR10_CLASSES),
    )
    save_checkpoint(path, active_model(card, seed), card)
    return path


def export(checkpoint: Path, output: Path, **options) -> Path:
    """The project's ONNX export (verification off: the tests compare themselves)."""
    from i2e_deploy.export.onnx import export_onnx

    export_onnx(checkpoint, output, **options)
    return output


@functools.cache
def shared_model(name: str) -> Path:
    """Session-wide tiny models (32 px): 'ckpt', 'onnx' (uint8 input), 'float.onnx',
    'static.onnx' (batch fixed to 2), 'converter.onnx', 'events.ckpt', 'events.onnx'."""
    root = _session_dir()
    if name == "ckpt":
        return save_active(root / "tiny.pt")
    if name == "events.ckpt":
        return save_active(root / "events.pt", events=True)
    # The variants skip the exporter's simplification pass (slow, and not what they test).
    if name == "events.onnx":
        return export(shared_model("events.ckpt"), root / "events.onnx", simplify=False)
    options = {
        "onnx": {},
        "float.onnx": {"input_format": "float", "simplify": False},
        "static.onnx": {"batch": 2, "dynamic": False, "simplify": False},
        "converter.onnx": {"converter_only": True, "simplify": False},
    }[name]
    return export(shared_model("ckpt"), root / name.replace("onnx", "tiny.onnx"), **options)


def corrupt(source: Path, target: Path, op_type: str, index: int, scale: float) -> Path:
    """Scale the constant second input of one ``op_type`` node (a weight, or a threshold;
    an initializer or a Constant node): a wrong graph that still loads and runs."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(source))
    constants = {init.name: init for init in model.graph.initializer}
    constants.update(
        {
            n.output[0]: n.attribute[0].t
            for n in model.graph.node
            if n.op_type == "Constant" and n.attribute[0].name == "value"
        }
    )
    nodes = [n for n in model.graph.node if n.op_type == op_type and n.input[1] in constants]
    tensor = constants[nodes[index].input[1]]
    tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * scale, tensor.name))
    onnx.save(model, str(target))
    return target


def released_checkpoint(path: Path, arch: str, num_classes: int, seed: int = 0) -> Path:
    """A random active model saved as the paper's release saves its files (``module.`` keys,
    epoch, best_acc1): size and ratio are inferred from the class count on loading."""
    from i2e_deploy.card import default_resolution

    imgsz, ratio, resize = default_resolution(num_classes)
    card = ModelCard(arch=arch, num_classes=num_classes, imgsz=imgsz, ratio=ratio, resize=resize)
    state = active_model(card, seed).state_dict()
    torch.save(
        {
            "epoch": 100,
            "state_dict": {f"module.{k}": v for k, v in state.items()},
            "best_acc1": torch.tensor(50.0),
        },
        path,
    )
    return path


@functools.cache
def shared_cifar() -> Path:
    """Two real CIFAR-10 images per class (skips without ../shared)."""
    return cifar_folder(_session_dir() / "cifar", per_class=2)


def cifar_folder(root: Path, per_class: int) -> Path:
    """``per_class`` real CIFAR-10 JPEGs per class from ../shared in ImageFolder layout."""
    if not CIFAR_TAR.is_file():
        pytest.skip("../shared/data/cifar10-train.tar.gz not present")
    counts: dict[str, int] = {}
    with tarfile.open(CIFAR_TAR) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3 or not member.name.endswith(".jpg"):
                continue
            label = parts[-2]
            if counts.get(label, 0) >= per_class:
                continue
            counts[label] = counts.get(label, 0) + 1
            target = root / label / parts[-1]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())
    return root


@functools.cache
def heldout_cifar(count: int = 200) -> Path:
    """``count`` of the 5,000 CIFAR-10 training images the bundled model's card holds out
    (``train --val-split 5000 --seed 0`` on the 50,000-image folder, in ImageFolder order),
    spread evenly over the split, in ImageFolder layout (skips without ../shared)."""
    from i2e_deploy.assets import DEFAULT_MODEL
    from i2e_deploy.model.checkpoint import load_checkpoint
    from i2e_deploy.training.data import split_indices

    if not CIFAR_TAR.is_file():
        pytest.skip("../shared/data/cifar10-train.tar.gz not present")
    card = load_checkpoint(DEFAULT_MODEL)[1]
    with tarfile.open(CIFAR_TAR) as tar:
        names = sorted(m.name for m in tar if m.isfile() and m.name.endswith(".jpg"))
    # ImageFolder order: classes sorted, files sorted within each class.
    samples = sorted((Path(n).parts[-2], Path(n).name, n) for n in names)
    classes = sorted({c for c, _, _ in samples})
    targets = [classes.index(c) for c, _, _ in samples]
    if len(samples) != card.provenance["train_images"] + card.provenance["heldout_images"]:
        pytest.skip("the shared CIFAR-10 copy is not the folder the bundled model was trained on")
    _, held = split_indices(targets, card.provenance["val_split"], card.provenance["seed"])
    picks = {samples[held[i]][2] for i in np.linspace(0, len(held) - 1, count).astype(int)}
    root = _session_dir() / f"heldout{count}"
    with tarfile.open(CIFAR_TAR) as tar:
        for member in tar:
            if member.name in picks:
                target = root / Path(member.name).parts[-2] / Path(member.name).name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
    return root
