"""Training precision (bf16 convolutions, float32 neurons and BatchNorm) and the --time budget."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from training_data import cifar_folder, one_thread  # noqa: F401 (autouse fixture)

from i2e_deploy.device import cpu_has_native_bf16
from i2e_deploy.errors import I2EError
from i2e_deploy.model.checkpoint import load_checkpoint
from i2e_deploy.model.msresnet import msresnet18
from i2e_deploy.training.precision import Precision, resolve_precision
from i2e_deploy.training.train import Budget, CosineSchedule, TrainConfig, run_training

CPU = torch.device("cpu")


def test_precision_choices():
    assert resolve_precision("fp32", CPU).dtype is None
    assert resolve_precision("bf16", CPU).dtype == torch.bfloat16
    expected = "bf16" if cpu_has_native_bf16() else "fp32"
    assert resolve_precision("auto", CPU).name == expected
    with pytest.raises(I2EError, match="CUDA GPUs only"):
        resolve_precision("fp16", CPU)
    with pytest.raises(I2EError, match="unknown precision"):
        resolve_precision("int4", CPU)


def test_bf16_runs_convolutions_in_bf16_and_keeps_neurons_and_batchnorm_float32():
    """Under bf16 the convs produce bf16; BatchNorm's running statistics stay float32 and
    the spikes a neuron passes on are exact 0/1 computed from a float32 membrane."""
    torch.manual_seed(0)
    model = msresnet18(10, 0.2).train().to(memory_format=torch.channels_last)
    seen: dict[str, torch.dtype] = {}
    model.layer1[0].conv1.register_forward_hook(lambda m, i, o: seen.update(conv=o.dtype))
    model.layer1[0].sn2.register_forward_hook(
        lambda m, i, o: seen.update(
            spikes=o.dtype,
            values=torch.unique(o.float()).tolist(),
            layout=o.is_contiguous(memory_format=torch.channels_last),
        )
    )
    images = torch.rand(4, 3, 32, 32)
    with Precision("bf16", "cpu").autocast():
        logits = model(images)
    logits.float().sum().backward()
    assert seen["conv"] == torch.bfloat16 and seen["spikes"] == torch.bfloat16
    assert set(seen["values"]) <= {0.0, 1.0} and seen["layout"]
    assert model.layer1[0].bn1.running_mean.dtype == torch.float32
    assert model.conv1.weight.grad.dtype == torch.float32  # float32 master weights


def test_cosine_schedule_by_hand():
    schedule = CosineSchedule(total=100, floor=0.01)
    assert schedule(0) == 1.0
    assert schedule(50) == pytest.approx(0.505)
    assert schedule(100) == pytest.approx(0.01) and schedule(150) == pytest.approx(0.01)


def test_time_budget_fits_epochs_to_the_measured_pace():
    schedule = CosineSchedule(total=1000, floor=0.0)
    budget = Budget(minutes=1.0, steps_per_epoch=10, schedule=schedule)
    assert budget.fit(0, 1, epoch_seconds=10.0) == 6 and schedule.total == 60
    assert budget.fit(0, 2, epoch_seconds=20.0) == 4 and schedule.total == 40  # slowed down
    assert budget.fit(0, 5, epoch_seconds=60.0) == 5  # over budget: stop where it is
    resumed = Budget(minutes=1.0, steps_per_epoch=10, schedule=schedule)
    assert resumed.fit(7, 8, epoch_seconds=15.0) == 11  # 7 before + 4 of 15 s in 60 s


def config(data, output, **overrides) -> TrainConfig:
    base = dict(
        data=str(data),
        output=str(output),
        imgsz=32,
        ratio=0.2,
        epochs=2,
        batch=6,
        lr=0.05,
        val_split=0,
        workers=0,
        augment="none",
        seed=0,
    )
    return TrainConfig(**{**base, **overrides})


def test_time_budget_ends_training_and_is_recorded(tmp_path):
    data = cifar_folder(tmp_path)
    result = run_training(
        config(data, tmp_path / "run", epochs=50, time_budget=1e-4), log=lambda _: None
    )
    with open(tmp_path / "run" / "log.csv") as fh:
        assert [r["epoch"] for r in csv.DictReader(fh)] == ["1"]
    card = load_checkpoint(result.last)[1]
    assert card.provenance["epochs"] == 1 and card.provenance["time_budget_min"] == 1e-4
    state = torch.load(result.last, weights_only=True)["train_state"]
    assert state["total_steps"] == 4  # the schedule was cut to the one epoch that fitted


def test_bf16_training_tracks_fp32(tmp_path):
    """Same seed and data: the bf16 run learns as the fp32 run does. Rounding flips a few
    spikes, so single steps differ; the loss curves stay within a few percent."""
    data = cifar_folder(tmp_path, per_class=12)
    losses = {}
    for precision in ("fp32", "bf16"):
        run_training(
            config(data, tmp_path / precision, epochs=4, precision=precision), log=lambda _: None
        )
        with open(tmp_path / precision / "log.csv") as fh:
            losses[precision] = [float(r["train_loss"]) for r in csv.DictReader(fh)]
    for curve in losses.values():
        assert curve[-1] < 0.9 * curve[0], losses  # both learn
    for fp32, bf16 in zip(losses["fp32"], losses["bf16"]):
        assert math.isclose(fp32, bf16, rel_tol=0.15), losses


@pytest.mark.parametrize("minutes", [0.0, -1.0])
def test_time_budget_must_be_positive(tmp_path, minutes):
    with pytest.raises(I2EError, match="--time must be a positive"):
        run_training(config(tmp_path, tmp_path / "run", time_budget=minutes))
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_cuda_without_a_gpu_is_one_clear_error(tmp_path):
    from i2e_deploy.calibration.qat import finetune_int8

    with pytest.raises(I2EError, match="CUDA is not available"):
        finetune_int8("default", tmp_path, tmp_path / "out.pt", device="cuda")
    with pytest.raises(I2EError, match="CUDA is not available"):
        run_training(config(tmp_path, tmp_path / "run", device="cuda"))
    assert not (tmp_path / "out.pt").exists()
