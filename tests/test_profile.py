"""`i2e-deploy profile` and the counts behind it, against independent references: MACs and
SOPs worked out by hand, firing rates of the paper's SpikingJelly model on the same input, and
a conv's SOPs against a direct count of the accumulates its input spikes trigger."""

from __future__ import annotations

import json
import re

import cv2
import numpy as np
import pytest
import torch
from runtime_models import (
    SHARED,
    one_torch_thread,  # noqa: F401  (autouse fixture)
    released_checkpoint,
    shared_model,
)
from typer.testing import CliRunner

from i2e_deploy.apps.profile import profile_inputs, run_profile
from i2e_deploy.apps.stream import run_stream
from i2e_deploy.card import ModelCard
from i2e_deploy.cli import app
from i2e_deploy.images import synthetic_images
from i2e_deploy.model.profile import Layer, count_macs, layer_table
from i2e_deploy.runtime.activity import ActivityCounter, SpikeReader, totals
from i2e_deploy.runtime.layer_times import layer_times
from i2e_deploy.runtime.runners import load_runner

T = 8
cli = CliRunner()

# MS-ResNet-18 at 32 px, per time step, by hand (SPEC §3): the stem maps 32 -> 16 px, the
# max-pool -> 8; stages 2-4 halve it (4, 2, 1 px).
MACS_32 = {
    "conv1": 64 * 16 * 16 * 2 * 7 * 7,
    **{f"layer1.{b}.conv{c}": 64 * 8 * 8 * 64 * 9 for b in (0, 1) for c in (1, 2)},
    "layer2.0.conv1": 128 * 4 * 4 * 64 * 9,
    "layer2.0.conv2": 128 * 4 * 4 * 128 * 9,
    "layer2.0.downsample.1": 128 * 4 * 4 * 64,
    "layer2.1.conv1": 128 * 4 * 4 * 128 * 9,
    "layer2.1.conv2": 128 * 4 * 4 * 128 * 9,
    "layer3.0.conv1": 256 * 2 * 2 * 128 * 9,
    "layer3.0.conv2": 256 * 2 * 2 * 256 * 9,
    "layer3.0.downsample.1": 256 * 2 * 2 * 128,
    "layer3.1.conv1": 256 * 2 * 2 * 256 * 9,
    "layer3.1.conv2": 256 * 2 * 2 * 256 * 9,
    "layer4.0.conv1": 512 * 1 * 1 * 256 * 9,
    "layer4.0.conv2": 512 * 1 * 1 * 512 * 9,
    "layer4.0.downsample.1": 512 * 1 * 1 * 256,
    "layer4.1.conv1": 512 * 1 * 1 * 512 * 9,
    "layer4.1.conv2": 512 * 1 * 1 * 512 * 9,
    "fc": 10 * 512,
}
# LIF neurons per time step at 32 px: (channels x pixels) of each layer's input.
LIF_32 = {
    **{f"layer1.{b}.sn{s}": 64 * 64 for b in (0, 1) for s in (1, 2)},
    "layer2.0.sn1": 64 * 64,
    "layer2.0.sn2": 128 * 16,
    "layer2.0.downsample.0": 64 * 64,
    "layer2.1.sn1": 128 * 16,
    "layer2.1.sn2": 128 * 16,
    "layer3.0.sn1": 128 * 16,
    "layer3.0.sn2": 256 * 4,
    "layer3.0.downsample.0": 128 * 16,
    "layer3.1.sn1": 256 * 4,
    "layer3.1.sn2": 256 * 4,
    "layer4.0.sn1": 256 * 4,
    "layer4.0.sn2": 512,
    "layer4.0.downsample.0": 256 * 4,
    "layer4.1.sn1": 512,
    "layer4.1.sn2": 512,
    "sn": 512,
}
CARD_32 = ModelCard(imgsz=32, resize=32)


def test_layer_table_macs_and_inputs_by_hand():
    table = layer_table(CARD_32)
    macs = {layer.name: layer.macs for layer in table if layer.macs}
    assert macs == {name: T * value for name, value in MACS_32.items()}
    sizes = {layer.name: int(np.prod(layer.shape)) for layer in table if layer.kind == "lif"}
    assert sizes == LIF_32
    sources = {layer.name: layer.source for layer in table if layer.macs}
    assert sources["conv1"] == "i2e" and sources["fc"] == "sn"
    assert sources["layer2.0.downsample.1"] == "layer2.0.downsample.0"
    assert sources["layer3.1.conv2"] == "layer3.1.sn2"
    assert [layer.kind for layer in table].count("residual") == 8
    assert count_macs(CARD_32) == T * sum(MACS_32.values())
    events = layer_table(ModelCard(imgsz=32, resize=32, input="events"))
    assert events[0] == Layer("input", "events", shape=(2, 32, 32))
    assert events[1].source == "input"


def test_sops_and_energy_by_hand():
    """The converter fires everywhere at t0 only (rate 1/8), the head's LIF fires everywhere
    at t3 only, nothing else: the stem then does a full step of accumulates, fc one step."""
    table = layer_table(CARD_32)
    maps = {
        layer.name: np.zeros((T, 2, *layer.shape), bool)
        for layer in table
        if layer.kind in ("lif", "events")
    }
    maps["i2e"][0] = True
    maps["sn"][3, 1] = True  # second image only
    counter = ActivityCounter(table, T)
    counts = counter.add(maps)
    sops = counter.sops()
    assert sops["conv1"] == pytest.approx(64 * 16 * 16 * 2 * 49)  # per image: both fire
    assert sops["fc"] == pytest.approx(10 * 512 / 2)  # one image of two
    assert sum(sops.values()) == pytest.approx(64 * 16 * 16 * 2 * 49 + 2560)
    rates = counter.rates()
    np.testing.assert_allclose(rates["i2e"], [1, 0, 0, 0, 0, 0, 0, 0])
    neurons = sum(LIF_32.values())
    found = totals(table, rates, sops, energy_ac=2.0, energy_mac=5.0)
    assert found.firing_rate == pytest.approx(512 / 2 / (neurons * T))
    assert found.energy_snn_pj == pytest.approx(2.0 * (64 * 16 * 16 * 2 * 49 + 2560))
    assert found.energy_ann_pj == pytest.approx(5.0 * T * sum(MACS_32.values()))
    rate, ops = counter.per_image(counts)
    np.testing.assert_allclose(rate, [0, 512 / (neurons * T)])
    np.testing.assert_allclose(ops, [64 * 16 * 16 * 2 * 49, 64 * 16 * 16 * 2 * 49 + 5120])


def direct_accumulates(
    spikes: np.ndarray, out_channels: int, kernel: int, stride: int, padding: int
) -> int:
    """Accumulates a conv does for binary input ``[C, H, W]``: each spike adds its weight to
    every output position whose window covers it, once per output channel (windows at the
    border cover fewer pixels)."""
    _, height, width = spikes.shape
    out_h = (height + 2 * padding - kernel) // stride + 1
    out_w = (width + 2 * padding - kernel) // stride + 1

    def covering(pos: int, out: int) -> int:
        return sum(0 <= pos + padding - o * stride < kernel for o in range(out))

    rows = [covering(y, out_h) for y in range(height)]
    cols = [covering(x, out_w) for x in range(width)]
    total = 0
    for _, y, x in zip(*np.nonzero(spikes)):
        total += rows[y] * cols[x] * out_channels
    return total


@pytest.mark.parametrize(
    "channels, size, kernel, stride, padding",
    [(16, 32, 3, 1, 1), (16, 32, 3, 2, 1), (16, 16, 1, 1, 0), (16, 32, 1, 2, 0), (2, 128, 7, 2, 3)],
)
def test_conv_sops_against_a_direct_count(channels, size, kernel, stride, padding):
    rng = np.random.default_rng(kernel * 100 + size)
    out_channels = 8
    spikes = rng.random((T, 2, channels, size, size)) < 0.1  # [T, N, C, H, W]
    conv = torch.nn.Conv2d(channels, out_channels, kernel, stride, padding, bias=False)
    out = conv(torch.zeros(1, channels, size, size))
    macs = T * out.numel() * channels * kernel * kernel  # dense, all steps
    table = [
        Layer("in", "lif", shape=(channels, size, size)),
        Layer("conv", "conv", macs, "in", tuple(out.shape[1:])),
    ]
    counter = ActivityCounter(table, T)
    counter.add({"in": spikes})
    direct = (
        sum(
            direct_accumulates(spikes[t, n], out_channels, kernel, stride, padding)
            for t in range(T)
            for n in range(2)
        )
        / 2
    )
    # The direct count again, as a conv of the spikes with all-ones weights.
    ones = torch.nn.functional.conv2d(
        torch.from_numpy(spikes.reshape(-1, channels, size, size)).float(),
        torch.ones(1, channels, kernel, kernel),
        stride=stride,
        padding=padding,
    )
    assert direct == pytest.approx(float(ones.sum()) * out_channels / 2)
    assert counter.sops()["conv"] == pytest.approx(direct, rel=0.05)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Six structured images as PNG files (lossless), as a user's folder would hold them."""
    folder = tmp_path_factory.mktemp("images")
    for i, image in enumerate(synthetic_images(6, CARD_32, seed=5)):
        cv2.imwrite(str(folder / f"{i}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return folder


def paper_rates(state_dict, ratio: float, images: np.ndarray) -> dict[str, np.ndarray]:
    """Firing rate per time step of every LIF layer (and the converter's events) of the
    paper's SpikingJelly model on ``images``, from forward hooks on its own modules."""
    from paper_model import paper_msresnet18
    from spikingjelly.activation_based import neuron

    model = paper_msresnet18(10, ratio).eval()
    model.load_state_dict(state_dict)
    found: dict[str, np.ndarray] = {}
    hooks = [
        m.register_forward_hook(
            lambda _m, _i, out, name=name: found.__setitem__(
                name, out.detach().flatten(2).mean(-1).mean(-1).numpy()
            )
        )
        for name, m in model.named_modules()
        if isinstance(m, neuron.LIFNode) or name == "i2e"
    ]
    with torch.no_grad():
        model(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0)
    for hook in hooks:
        hook.remove()
    return found


@pytest.mark.parametrize("model", ["ckpt", "onnx"])
def test_firing_rates_match_the_paper_model(model, image_folder):
    """PyTorch and ONNX Runtime report the rates the paper's SpikingJelly model fires at on
    the same images, per layer and time step."""
    report = run_profile(shared_model(model), image_folder, limit=6, runs=1, threads=1)
    with load_runner(shared_model("ckpt"), warmup=0) as runner:
        state, ratio = runner.model.state_dict(), runner.card.ratio
        images, _ = profile_inputs(runner.card, image_folder, 6)
    want = paper_rates(state, ratio, images)
    got = {
        row["name"]: row["firing_rate_per_step"]
        for row in report.layers
        if "firing_rate_per_step" in row
    }
    assert set(got) == set(want)
    for name, rates in want.items():
        np.testing.assert_allclose(got[name], rates, atol=2e-3, err_msg=name)
    assert 0.01 < report.total["firing_rate"] < 0.5


def test_json_report_has_the_issue_keys(image_folder, tmp_path):
    out = tmp_path / "p.json"
    result = cli.invoke(
        app,
        [
            "profile",
            str(shared_model("onnx")),
            "--data",
            str(image_folder),
            "--json",
            str(out),
            "--markdown",
            str(tmp_path / "p.md"),
            "--runs",
            "2",
            "--threads",
            "1",
            "--energy-ac",
            "1.5",
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["images"] == 6
    assert set(data["total"]) >= {"macs", "sops", "firing_rate", "energy_snn_pj", "energy_ann_pj"}
    assert data["total"]["energy_snn_pj"] == pytest.approx(1.5 * data["total"]["sops"])
    assert data["total"]["energy_ann_pj"] == pytest.approx(4.6 * data["total"]["macs"])
    rows = {row["name"]: row for row in data["layers"]}
    for row in data["layers"]:
        assert {"name", "kind"} <= set(row)
        if row["kind"] in ("conv", "linear"):
            assert row["macs"] > 0 and 0 < row["sops"] < row["macs"]
        if row["kind"] in ("lif", "events"):
            assert 0 <= row["firing_rate"] <= 1 and len(row["firing_rate_per_step"]) == T
    assert rows["conv1"]["sops"] == pytest.approx(
        rows["i2e"]["firing_rate"] * rows["conv1"]["macs"]
    )
    assert sum(row["sops"] for row in data["layers"] if "sops" in row) == pytest.approx(
        data["total"]["sops"]
    )
    assert "1.5 pJ" in result.output and "4.6 pJ" in result.output
    assert "| layer1.0.conv1 | conv |" in (tmp_path / "p.md").read_text()


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_onnx_runtime_time_lands_on_the_layers(precision, tmp_path):
    """Graphs exported here, FP32, FP16 and INT8 (whose neurons the precision pass
    rewrites): every conv and every LIF layer the graph computes gets profiled time and
    shows its spikes, and little time is left over."""
    graph = shared_model("onnx")
    if precision == "int8":
        from i2e_deploy.calibration.quantize import to_int8

        graph = to_int8(graph, tmp_path / "tiny.int8.onnx", flavour="onnxruntime")
    elif precision == "fp16":
        from i2e_deploy.calibration.half import to_fp16

        graph = to_fp16(graph, tmp_path / "tiny.fp16.onnx")
    with load_runner(graph, threads=1, warmup=0) as runner:
        table = layer_table(runner.card)
        times = layer_times(runner, synthetic_images(1, CARD_32), table, runs=3)
        _, maps = SpikeReader(runner, table)(synthetic_images(2, CARD_32))
    for layer in table:
        if layer.kind in ("conv", "linear", "events") or (
            layer.kind == "lif" and ".downsample." not in layer.name
        ):
            assert times.per_layer.get(layer.name, 0) > 0, layer.name
        if layer.kind in ("lif", "events"):
            assert layer.name in maps, layer.name  # the graph's own spikes, every layer
    assert times.shares["neurons"] > 0.05 * times.total_ms
    assert times.per_layer.get("other", 0) < 0.25 * times.total_ms


def test_torch_profiler_times_every_layer(tmp_path):
    with load_runner(shared_model("ckpt"), warmup=0) as runner:
        table = layer_table(runner.card)
        times = layer_times(runner, synthetic_images(1, CARD_32), table, runs=2)
    assert all(
        times.per_layer.get(layer.name, 0) > 0
        for layer in table
        if layer.kind in ("conv", "linear", "lif", "events")
    )
    assert times.shares["residual sums"] > 0 and times.total_ms > 0


def test_profile_default_with_plot_and_json(image_folder, tmp_path):
    """The bundled model, as from a fresh clone."""
    plot, out = tmp_path / "p.png", tmp_path / "p.json"
    result = cli.invoke(
        app,
        [
            "profile",
            "default",
            "--data",
            str(image_folder),
            "--plot",
            str(plot),
            "--json",
            str(out),
            "--limit",
            "3",
            "--runs",
            "1",
            "--threads",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = cv2.imread(str(plot))
    assert image.shape[0] > 500 and image.shape[1] > 1000
    data = json.loads(out.read_text())
    # auto on a CPU: the INT8-exact bundled model runs through its ONNX Runtime INT8 graph,
    # which shows every LIF layer's spikes.
    assert data["model"]["backend"] == "onnxruntime" and data["images"] == 3
    lifs = [layer for layer in data["layers"] if layer["kind"] == "lif"]
    assert len(lifs) >= 17 and all(layer["firing_rate"] is not None for layer in lifs)
    assert data["total"]["macs"] == count_macs(ModelCard(imgsz=64, resize=64))


@pytest.mark.parametrize("arch", ["msresnet18", "msresnet34"])
def test_released_checkpoints_profile(arch, image_folder, tmp_path):
    path = released_checkpoint(tmp_path / f"cifar10_{arch}.pth.tar", arch, 10)
    out = tmp_path / "p.json"
    result = cli.invoke(
        app,
        [
            "profile",
            str(path),
            "--data",
            str(image_folder),
            "--limit",
            "1",
            "--runs",
            "1",
            "--threads",
            "1",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    lifs = [row for row in data["layers"] if row["kind"] == "lif"]
    assert len(lifs) == {"msresnet18": 20, "msresnet34": 36}[arch]
    assert data["total"]["macs"] == count_macs(ModelCard(arch=arch, imgsz=128, resize=128))


def test_bad_input_is_one_line_and_exit_2(image_folder, tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not a graph")
    empty = tmp_path / "empty"
    empty.mkdir()
    for args in (
        [str(bad), "--data", str(image_folder)],
        [str(shared_model("onnx")), "--data", str(empty)],
        [str(shared_model("onnx")), "--data", str(tmp_path / "missing")],
        [str(shared_model("onnx")), "--data", str(image_folder), "--energy-ac", "0"],
    ):
        result = cli.invoke(app, ["profile", *args])
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), result.output


def test_stream_json_adds_firing_rate_and_sops(image_folder, tmp_path):
    """Per prediction, the stream counts what profile counts over the same images."""
    stats = tmp_path / "stats.json"
    preds = tmp_path / "preds.jsonl"
    run_stream(shared_model("onnx"), [str(image_folder)], [str(preds)], stats_json=stats, threads=1)
    activity = json.loads(stats.read_text())["activity"]
    records = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(records) == 6 and all(r["sops"] > 0 for r in records)
    assert activity["sops_per_prediction"] == pytest.approx(np.mean([r["sops"] for r in records]))
    report = run_profile(shared_model("onnx"), image_folder, limit=6, runs=1, threads=1)
    assert activity["firing_rate"] == pytest.approx(report.total["firing_rate"], rel=1e-6)
    assert activity["sops_per_prediction"] == pytest.approx(report.total["sops"], rel=1e-6)
    run_stream(
        shared_model("onnx"),
        [str(image_folder)],
        [str(preds)],
        stats_json=stats,
        threads=1,
        activity=False,
    )
    assert "activity" not in json.loads(stats.read_text())
    assert "sops" not in preds.read_text()


def test_event_models_take_event_datasets_and_recordings(tmp_path):
    """An event-input model profiles an I2E event dataset (its input events' rate is the
    samples' own) and an event recording (N-MNIST, from ../shared when present)."""
    from i2e_deploy.training.eventsets import write_sample

    rng = np.random.default_rng(2)
    samples = rng.random((4, T, 2, 32, 32)) < 0.07
    for i, events in enumerate(samples):
        (tmp_path / "ds" / str(i % 2)).mkdir(parents=True, exist_ok=True)
        write_sample(tmp_path / "ds" / str(i % 2) / f"{i}.npz", events, "npz")
    model = shared_model("events.onnx")
    report = run_profile(model, tmp_path / "ds", runs=1, threads=1)
    rows = {row["name"]: row for row in report.layers}
    assert report.images == 4
    np.testing.assert_allclose(
        rows["input"]["firing_rate_per_step"], samples.mean(axis=(0, 2, 3, 4))
    )
    assert rows["conv1"]["sops"] == pytest.approx(samples.mean() * rows["conv1"]["macs"])
    recording = SHARED / "data" / "dvs" / "sample_nmnist.bin"
    if recording.is_file():
        report = run_profile(model, recording, limit=2, runs=1, threads=1)
        assert report.images >= 1 and report.total["sops"] > 0


def test_overlay_shows_activity_only_when_asked(image_folder, monkeypatch):
    from i2e_deploy.runtime import loop
    from i2e_deploy.runtime.classify import Classifier
    from i2e_deploy.runtime.sinks import Sink
    from i2e_deploy.runtime.sources import open_source

    class Canvases(Sink):
        needs_canvas = True

        def write(self, frame, prediction, canvas):
            assert canvas.ndim == 3

    statuses: list[str] = []
    draw = loop.annotate
    monkeypatch.setattr(
        loop, "annotate", lambda f, p, status=None: (statuses.append(status), draw(f, p, status))[1]
    )
    with load_runner(shared_model("onnx"), threads=1) as runner:
        for show in (False, True):
            loop.Stream(
                Classifier(runner, activity=True),
                [open_source(str(image_folder))],
                Canvases(),
                max_frames=2,
                show_activity=show,
            ).run()
        plain = Classifier(runner)
        assert plain.activity is None
        assert plain.classify([synthetic_images(1, CARD_32)[0]])[0].sops is None
    assert len(statuses) == 4
    assert not any("SOPs" in s for s in statuses[:2])
    assert all(re.search(r"rate 0\.\d{3}, \d+ M SOPs", s) for s in statuses[2:])
