"""Faithful exports of released-format MS-ResNet-18/34 at the paper's sizes (128 px with 10
classes, 224 px with 1000) pass verification by default and `parity` on real images, and agree
with the independent SpikingJelly build of the paper's model; a graph with one conv weight
scaled by 1.5 fails both.

The models are random but active (BatchNorm statistics randomized so that every layer fires,
neither silent nor saturated) and saved as the paper's release saves its files; the images are
real CIFAR-10 photos, upscaled by the card's preprocessing.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from paper_model import paper_msresnet18, paper_msresnet34
from runtime_models import (
    corrupt,
    one_torch_thread,  # noqa: F401  (autouse fixture)
    released_checkpoint,
    shared_cifar,
)
from typer.testing import CliRunner

from i2e_deploy.artifacts import read_card
from i2e_deploy.cli import app
from i2e_deploy.compare import judge, limits_for
from i2e_deploy.errors import I2EError
from i2e_deploy.images import load_image_folder
from i2e_deploy.model.checkpoint import load_checkpoint
from i2e_deploy.runtime.runners import load_runner
from i2e_deploy.targets import verify_graph

cli = CliRunner()
PAPER = {"msresnet18": paper_msresnet18, "msresnet34": paper_msresnet34}
REAL_IMAGES = 8


@pytest.mark.slow
@pytest.mark.parametrize(
    "arch, classes",
    [("msresnet18", 10), ("msresnet34", 10), ("msresnet18", 1000), ("msresnet34", 1000)],
)
def test_faithful_export_passes_and_a_wrong_conv_fails(arch, classes, tmp_path):
    data = shared_cifar()
    checkpoint = released_checkpoint(tmp_path / f"{arch}_{classes}.pth.tar", arch, classes)
    exported = cli.invoke(app, ["export", str(checkpoint)])  # verification on by default
    assert exported.exit_code == 0, exported.output
    graph = checkpoint.with_name(f"{arch}_{classes}.onnx")
    card = read_card(graph)
    assert (card.imgsz, card.num_classes) == ((224, 1000) if classes == 1000 else (128, 10))

    code = cli.invoke(
        app,
        ["parity", str(checkpoint), str(graph), "--data", str(data), "--limit", str(REAL_IMAGES)],
    )
    assert code.exit_code == 0, code.output

    # The independent reference: SpikingJelly's build of the paper's model, same weights.
    model, _ = load_checkpoint(checkpoint)
    paper = PAPER[arch](classes, card.ratio).eval()
    paper.load_state_dict(model.state_dict())
    images = load_image_folder(data, card, REAL_IMAGES).images
    with torch.no_grad(), load_runner(graph) as runner:
        want = paper(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0).numpy()
        got = runner.infer(images)
    found = judge(want, got, limits_for("fp32"))
    assert found.passed, found.summary()
    # The logits depend on the image, far beyond float rounding: the check has teeth.
    assert np.abs(want - want.mean(0)).mean() > 0.01 * want.std(1).mean()

    broken = corrupt(graph, tmp_path / "broken.onnx", "Conv", 10, 1.5)
    code = cli.invoke(
        app,
        ["parity", str(checkpoint), str(broken), "--data", str(data), "--limit", str(REAL_IMAGES)],
    )
    assert code.exit_code == 1, code.output
    with pytest.raises(I2EError, match="export verification failed"):
        verify_graph(broken, model, card, count=REAL_IMAGES)
    assert np.isfinite(got).all()
