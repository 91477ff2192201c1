"""Checkpoint loading: released / bare / own formats, inference of the card, clean errors,
safety."""

from __future__ import annotations

import copy
import os
import pickle
from pathlib import Path

import pytest
import torch

from i2e_deploy import I2EError, ModelCard, load_checkpoint, save_checkpoint
from i2e_deploy.model.msresnet import msresnet18, msresnet34


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    model = msresnet18(10, 0.07).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def files(reference, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    state = reference.state_dict()
    released = root / "cifar10_baseline.pth.tar"
    torch.save(
        {
            "epoch": 199,
            "state_dict": {f"module.{k}": v for k, v in state.items()},
            "best_acc1": torch.tensor(85.07),
        },
        released,
    )
    bare = root / "bare.pt"
    torch.save({k: v for k, v in state.items() if k != "i2e.weight"}, bare)
    ours = root / "ours.pt"
    card = ModelCard(
        num_classes=10, ratio=0.09, imgsz=64, resize=64, class_names=[f"c{i}" for i in range(10)]
    )
    save_checkpoint(ours, reference, card)
    return {"released": released, "bare": bare, "ours": ours, "root": root}


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_released_format(reference, files):
    model, card = load_checkpoint(files["released"])
    assert not model.training
    assert same_weights(model, reference)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    assert (card.arch, card.input, card.num_classes) == ("msresnet18", "images", 10)
    assert (card.imgsz, card.ratio, card.resize) == (128, 0.07, 128)
    assert card.provenance["format"] == "released"
    assert card.provenance["epoch"] == 199
    assert card.provenance["best_acc1"] == pytest.approx(85.07)
    assert len(card.provenance["sha256"]) == 64
    assert any("ratio" in note for note in card.inferred)


def test_bare_state_dict(reference, files):
    model, card = load_checkpoint(files["bare"])
    assert same_weights(model, reference)
    assert card.provenance["format"] == "state_dict"


def test_own_format_round_trip(reference, files):
    payload = torch.load(files["ours"], weights_only=True)  # safe to load by construction
    assert payload["format"] == "i2e-deploy"
    model, card = load_checkpoint(files["ours"])
    assert same_weights(model, reference)
    assert (card.ratio, card.imgsz, card.label(3)) == (0.09, 64, "c3")
    assert model.i2e.ratio == 0.09
    assert card.inferred == []
    x = torch.rand(2, 3, 32, 32)
    reference.i2e.ratio = 0.09
    try:
        with torch.no_grad():
            assert torch.equal(model(x), reference(x))
    finally:
        reference.i2e.ratio = 0.07
    # Saving what was loaded gives the same card again.
    again = files["root"] / "again.pt"
    save_checkpoint(again, model, card)
    model2, card2 = load_checkpoint(again)
    assert same_weights(model2, model)
    assert {k: v for k, v in card2.to_dict().items() if k != "provenance"} == {
        k: v for k, v in card.to_dict().items() if k != "provenance"
    }


def test_own_format_half(reference, files):
    path = files["root"] / "half.pt"
    save_checkpoint(path, reference, ModelCard(), weights="float16")
    assert path.stat().st_size < 0.6 * files["ours"].stat().st_size
    model, _ = load_checkpoint(path)
    loaded, original = model.state_dict(), reference.state_dict()
    for key, value in original.items():
        if key.endswith(("weight", "bias")) and value.is_floating_point():
            assert torch.equal(loaded[key], value.half().float()), key
        else:
            assert torch.equal(loaded[key], value), key


def test_own_format_int8_is_lossless_for_int8_exact_weights(reference, files):
    from i2e_deploy.calibration.qat import grid_error, snap_to_int8_grid

    exact = snap_to_int8_grid(copy.deepcopy(reference))
    path = files["root"] / "int8.pt"
    save_checkpoint(path, exact, ModelCard(), weights="int8")
    assert path.stat().st_size < 0.3 * files["ours"].stat().st_size
    stored = torch.load(path, weights_only=True)
    assert stored["int8_weights"]["layer1.0.conv1.weight"].dtype == torch.int8
    assert stored["state_dict"]["layer1.0.bn1.weight"].dtype == torch.float32
    # Code that knows nothing of INT8 storage fails loudly instead of loading integers.
    with pytest.raises(RuntimeError, match="Missing key"):
        copy.deepcopy(reference).load_state_dict(stored["state_dict"])
    model, _ = load_checkpoint(path)
    assert grid_error(model) < 1e-3
    for key, value in exact.state_dict().items():
        assert torch.allclose(model.state_dict()[key], value, rtol=1e-6, atol=0), key
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), exact(x), atol=1e-5)


def test_own_format_int8_refuses_weights_off_the_grid(reference, files):
    path = files["root"] / "offgrid.pt"
    with pytest.raises(I2EError, match="not on a per-channel INT8 grid"):
        save_checkpoint(path, reference, ModelCard(), weights="int8")
    assert not path.exists()


def test_own_format_int8_with_mismatched_scales_is_a_clean_error(reference, files):
    from i2e_deploy.calibration.qat import snap_to_int8_grid

    path = files["root"] / "broken_int8.pt"
    save_checkpoint(path, snap_to_int8_grid(copy.deepcopy(reference)), ModelCard(), weights="int8")
    payload = torch.load(path, weights_only=True)
    payload["weight_scales"]["fc.weight"] = payload["weight_scales"]["fc.weight"][:3]
    torch.save(payload, path)
    with pytest.raises(I2EError, match="does not match its scales"):
        load_checkpoint(path)
    del payload["weight_scales"]["fc.weight"]
    torch.save(payload, path)
    with pytest.raises(I2EError, match="do not match"):
        load_checkpoint(path)


def test_events_flag_and_dvs_name(reference, files):
    _, card = load_checkpoint(files["released"], events=True)
    assert card.input == "events"
    dvs = files["root"] / "dvscifar10_baseline.pth.tar"
    dvs.write_bytes(files["released"].read_bytes())
    model, card = load_checkpoint(dvs)
    assert card.input == "events"
    assert model(torch.zeros(1, 8, 2, 32, 32)).shape == (1, 10)
    _, card = load_checkpoint(dvs, events=False)
    assert card.input == "images"


def test_overrides(files):
    _, card = load_checkpoint(
        files["released"], arch="msresnet18", num_classes=10, ratio=0.1, imgsz=64
    )
    assert (card.ratio, card.imgsz) == (0.1, 64)
    assert not any("ratio" in n or "image size" in n for n in card.inferred)
    with pytest.raises(I2EError, match="msresnet34"):
        load_checkpoint(files["released"], arch="msresnet34")
    with pytest.raises(I2EError, match="unknown arch"):
        load_checkpoint(files["released"], arch="resnet50")
    with pytest.raises(I2EError, match="100"):
        load_checkpoint(files["released"], num_classes=100)
    with pytest.raises(I2EError):
        load_checkpoint(files["released"], ratio=-1.0)


def test_infers_depth_and_imagenet_defaults(tmp_path):
    torch.manual_seed(0)
    state = msresnet34(1000, 0.12).state_dict()
    path = tmp_path / "imagenet_augmentation_34.pth.tar"
    torch.save(
        {"epoch": 1, "state_dict": {f"module.{k}": v for k, v in state.items()}, "best_acc1": 60.5},
        path,
    )
    model, card = load_checkpoint(path)
    assert (card.arch, card.num_classes, card.imgsz, card.ratio, card.resize) == (
        "msresnet34",
        1000,
        224,
        0.12,
        256,
    )
    assert model.fc.out_features == 1000 and len(model.layer3) == 6
    assert card.provenance["best_acc1"] == 60.5


def one_line_error(path: Path, **kwargs) -> str:
    with pytest.raises(I2EError) as info:
        load_checkpoint(path, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message
    return message


def modified(files, tmp_path, edit) -> Path:
    state = torch.load(files["bare"], weights_only=True)
    edit(state)
    path = tmp_path / "edited.pt"
    torch.save(state, path)
    return path


def test_missing_unexpected_and_misshapen_keys(files, tmp_path):
    path = modified(files, tmp_path, lambda s: s.pop("layer2.1.bn1.running_var"))
    assert "layer2.1.bn1.running_var" in one_line_error(path)
    path = modified(files, tmp_path, lambda s: s.update({"head.extra": torch.zeros(3)}))
    assert "head.extra" in one_line_error(path)
    path = modified(
        files, tmp_path, lambda s: s.update({"layer1.0.conv1.weight": torch.zeros(64, 64, 5, 5)})
    )
    message = one_line_error(path)
    assert "layer1.0.conv1.weight" in message and "[64, 64, 3, 3]" in message
    path = modified(files, tmp_path, lambda s: s.pop("fc.weight"))
    assert "fc.weight" in one_line_error(path)


def test_unrelated_state_dict(tmp_path):
    path = tmp_path / "linear.pt"
    torch.save(torch.nn.Linear(3, 2).state_dict(), path)
    assert "layer1" in one_line_error(path)


@pytest.mark.parametrize(
    "content",
    [b"", b"hello, this is a text file\n", b'{"a": 1}', b"PK\x03\x04junk", b"\x80\x02}q\x00."],
)
def test_garbage_files(tmp_path, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    message = one_line_error(path)
    assert str(path) in message
    assert "refused" not in message  # garbage is not reported as a code-running pickle
    assert ("empty" if not content else "not a") in message


def test_truncated_file(files, tmp_path):
    data = files["released"].read_bytes()
    path = tmp_path / "truncated.pth.tar"
    path.write_bytes(data[: len(data) // 2])
    assert "truncated" in one_line_error(path)


@pytest.mark.parametrize(
    "obj", [[torch.zeros(2)], torch.zeros(3), {}, {"state_dict": 5}, {"epoch": 3, "note": "x"}]
)
def test_non_checkpoint_objects(tmp_path, obj):
    path = tmp_path / "obj.pt"
    torch.save(obj, path)
    one_line_error(path)


def test_missing_file(tmp_path):
    assert "not found" in one_line_error(tmp_path / "nope.pt")


class Exploit:
    marker: Path

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("writer", ["torch_zip", "raw_pickle"])
def test_malicious_pickle_is_refused_without_running(tmp_path, writer):
    marker = tmp_path / "pwned"
    exploit = Exploit()
    exploit.marker = marker
    path = tmp_path / "evil.pth.tar"
    payload = {"epoch": 1, "state_dict": {"module.fc.weight": exploit}}
    if writer == "torch_zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    assert "refused" in one_line_error(path)
    assert not marker.exists()
    pickle.loads(pickle.dumps(exploit))  # control: unpickling it unguarded does run the command
    assert marker.exists()


def test_stale_converter_kernels_in_file_are_ignored(reference, tmp_path):
    # The released code rewrites i2e.weight every forward, so a file may hold the last training
    # draw (or anything); the converter must still use the fixed eval kernels.
    state = {f"module.{k}": v for k, v in reference.state_dict().items()}
    state["module.i2e.weight"] = torch.randn(8, 1, 3, 3)
    path = tmp_path / "stale.pth.tar"
    torch.save({"epoch": 1, "state_dict": state, "best_acc1": 1.0}, path)
    model, _ = load_checkpoint(path)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.i2e(x), reference.i2e(x))


def test_card_validation_and_json():
    card = ModelCard(num_classes=3, class_names=["a", "b", "c"], ratio=0.1)
    assert ModelCard.from_json(card.to_json()) == card
    for bad in (
        '{"arch": "vgg"}',
        '{"input": "audio"}',
        '{"num_classes": 0}',
        '{"imgsz": 8}',
        '{"num_classes": 2, "class_names": ["a"]}',
        '{"colour": 1}',
        "[1]",
        "{oops",
    ):
        with pytest.raises(I2EError):
            ModelCard.from_json(bad)
