"""Verification on the target (``targets.verify_target``), the one check every runner built
for a device from something other than the reference goes through (TensorRT engines, ONNX
Runtime GPU sessions, PyTorch CUDA graphs, and export itself). On this CPU the same function
runs with real candidates: a faithful ONNX Runtime graph passes and a graph with a corrupted
weight is refused; no runner is mocked. Also: which runner ``--backend auto`` picks here."""

from __future__ import annotations

import json

import pytest
from runtime_models import corrupt, one_torch_thread, shared_model  # noqa: F401
from typer.testing import CliRunner

from i2e_deploy.artifacts import read_card
from i2e_deploy.assets import DEFAULT_MODEL
from i2e_deploy.cache import verdict_path
from i2e_deploy.cli import app
from i2e_deploy.errors import I2EError, VerificationError
from i2e_deploy.runtime.runners import OrtRunner
from i2e_deploy.targets import choose_runner, verify_target

KEY = {"runner": "onnxruntime", "device": "cpu", "gpu": "test"}


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    good = shared_model("onnx")
    # fc weights scaled by 1.5: a graph that loads and runs, and computes another model.
    bad = corrupt(good, root / "broken.onnx", "Gemm", 0, 1.5)
    return {"ckpt": shared_model("ckpt"), "good": good, "bad": bad}


def test_a_faithful_graph_passes_and_is_verified_once(graphs, tmp_path):
    notes: list[str] = []
    key = {**KEY, "sha256": "faithful"}
    with OrtRunner(graphs["good"]) as candidate:
        record = verify_target(
            candidate, graphs["ckpt"], key=key, cache=tmp_path, count=8, log=notes.append
        )
        assert record["passed"] and record["count"] == 8
        assert record["decisive_changes"] == 0 and record["spike_agreement"] > 0.95
        assert record["images"] == "8 frames of the bundled sample photos"
        assert "PyTorch reference" in record["reference"]
        kept = json.loads(verdict_path(key, tmp_path).read_text())
        assert kept["summary"] == record["summary"] and kept["key"] == key
        again = verify_target(
            candidate, graphs["ckpt"], key=key, cache=tmp_path, count=8, log=notes.append
        )
    assert again["when"] == record["when"]  # the verdict kept, not a second comparison
    assert notes[0].startswith("verify: onnxruntime on cpu vs the PyTorch reference")
    assert notes[1].startswith("verified here before")


def test_a_corrupted_graph_is_refused_and_nothing_is_kept(graphs, tmp_path):
    key = {**KEY, "sha256": "corrupted"}
    with (
        OrtRunner(graphs["bad"]) as candidate,
        pytest.raises(VerificationError, match="verification on the target failed") as refused,
    ):
        verify_target(candidate, graphs["ckpt"], key=key, cache=tmp_path, count=8)
    message = str(refused.value)
    assert "median |Δlogit| / logit spread" in message  # the failing check, by name
    assert "not used, nothing cached" in message
    assert all(way in message for way in ("--data DIR", "--tolerance NAME=VALUE", "--no-verify"))
    assert not verdict_path(key, tmp_path).exists()


def test_without_a_checkpoint_the_graph_on_the_cpu_is_the_reference(graphs):
    """A candidate built from an ONNX file alone (``build model.onnx``) is judged against
    that graph on ONNX Runtime on the CPU."""
    with OrtRunner(graphs["good"]) as candidate:
        record = verify_target(candidate, graphs["good"], count=4)
    assert record["passed"] and "ONNX Runtime (CPU)" in record["reference"]
    assert record["spike_agreement"] == 1.0  # the same graph on the same provider
    with OrtRunner(graphs["bad"]) as candidate, pytest.raises(VerificationError):
        verify_target(candidate, graphs["good"], count=4)


def test_a_refused_export_exits_1_and_writes_nothing(graphs, tmp_path):
    """Refusals leave the CLI with exit 1 (as a failing parity check); usage errors exit 2.
    A zero median tolerance cannot be met by BN-folded float arithmetic."""
    output = tmp_path / "strict.onnx"
    result = CliRunner().invoke(
        app, ["export", str(graphs["ckpt"]), "-o", str(output), "--tolerance", "median_rel=0"]
    )
    assert result.exit_code == 1, result.output
    assert "export verification failed" in result.stderr and not output.exists()
    result = CliRunner().invoke(app, ["export", str(graphs["ckpt"]), "--tolerance", "x=1"])
    assert result.exit_code == 2


def test_auto_picks_the_fastest_runner_verified_here(graphs):
    exact, plain = read_card(DEFAULT_MODEL), read_card(graphs["ckpt"])
    cpu = choose_runner(exact, "auto", "auto", "cpu")
    assert (cpu.backend, cpu.precision) == ("onnx", "int8") and "INT8-exact" in cpu.why
    for card, backend, precision, expected in (
        (plain, "auto", "auto", ("onnx", "fp32")),
        (exact, "auto", "fp32", ("onnx", "fp32")),
        (exact, "torch", "auto", ("torch", "fp32")),
    ):
        choice = choose_runner(card, backend, precision, "cpu")
        assert (choice.backend, choice.precision) == expected
    forced = choose_runner(plain, "onnx", "int8", "cpu")
    assert (forced.precision, forced.why) == ("int8", "--backend onnx")
    with pytest.raises(I2EError, match="unknown backend"):
        choose_runner(plain, "tvm", "auto", "cpu")


def test_auto_on_cuda_without_tensorrt_or_onnxruntime_gpu_is_cuda_graphs(graphs):
    """The CUDA order is TensorRT, then onnxruntime-gpu, then PyTorch CUDA graphs; which one
    this machine gets depends on what is installed, and the reason says so."""
    from i2e_deploy.export.tensorrt import tensorrt_unavailable
    from i2e_deploy.targets import gpu_onnxruntime

    choice = choose_runner(read_card(graphs["ckpt"]), "auto", "auto", "cuda")
    if tensorrt_unavailable("cuda") is None:
        assert choice.backend == "tensorrt"
    elif gpu_onnxruntime() is None:
        assert choice.backend == "onnx" and "onnxruntime-gpu" in choice.why
    else:
        assert (choice.backend, choice.precision) == ("torch", "fp32")
        assert "CUDA graphs" in choice.why and "no GPU ONNX Runtime" in choice.why
        with pytest.raises(I2EError, match="needs TensorRT or onnxruntime-gpu"):
            choose_runner(read_card(graphs["ckpt"]), "auto", "int8", "cuda")


def _gpu_torch() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_torch(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_runner_is_verified_once_and_info_shows_it(graphs, tmp_path, monkeypatch):
    """Whatever ``--backend auto`` picks on this GPU is verified before it runs; the verdict
    is kept (the second open reuses it) and ``info`` lists it."""
    from i2e_deploy.apps.info import describe_file
    from i2e_deploy.targets import gpu_onnxruntime, resolve_runner

    monkeypatch.setenv("I2E_CACHE", str(tmp_path))
    notes: list[str] = []
    with resolve_runner(graphs["ckpt"], device="cuda", log=notes.append) as run:
        assert run.name in ("torch-cudagraph", "onnxruntime", "tensorrt")
    assert notes[0].startswith("runner: ") and any(n.startswith("verify: ") for n in notes)
    again: list[str] = []
    with resolve_runner(graphs["ckpt"], device="cuda", log=again.append):
        pass
    assert any("verified" in n for n in again)
    assert not any(n.startswith("verify: ") for n in again)
    if run.name == "torch-cudagraph":
        assert describe_file(graphs["ckpt"])["verification"][0]["passed"]
    if gpu_onnxruntime() is None:  # the corrupted graph on this GPU's ONNX Runtime
        with pytest.raises(VerificationError):
            resolve_runner(graphs["bad"], device="cuda").close()


def test_a_refused_runner_falls_back_under_auto_and_the_refusal_is_kept(graphs, tmp_path):
    """A real runner refused: a spike agreement above 1 no graph can reach refuses the ONNX
    Runtime export. ``--backend auto`` moves on to the next runner (on this CPU, PyTorch),
    one line each, and remembers the refusal (no second export); ``--backend onnx`` forced
    exits 1 naming the ways out."""
    from i2e_deploy.targets import resolve_runner

    tight = {"spike_agreement": 1.01}
    notes: list[str] = []
    with resolve_runner(
        graphs["ckpt"], cache=tmp_path, tolerances=tight, log=notes.append, threads=1
    ) as run:
        assert run.name == "torch"
    assert notes[0].startswith("runner: ONNX Runtime fp32 on cpu")
    refused = notes[-1]
    assert refused.startswith("refused: ONNX Runtime fp32 on cpu") and "spike agreement" in refused
    assert "; running on PyTorch fp32 on cpu instead (the reference itself)" in refused
    again: list[str] = []
    with resolve_runner(
        graphs["ckpt"], cache=tmp_path, tolerances=tight, log=again.append, threads=1
    ) as run:
        assert run.name == "torch"
    assert again[0].startswith("runner: PyTorch fp32 on cpu (the reference itself; ONNX ")
    assert "refused here before" in again[0]
    assert not any(n.startswith("exporting") for n in again)
    with pytest.raises(VerificationError, match="--backend auto.*--device cpu"):
        resolve_runner(graphs["ckpt"], backend="onnx", cache=tmp_path, tolerances=tight)
    # The default limits are another configuration: not refused.
    with resolve_runner(graphs["ckpt"], cache=tmp_path, threads=1) as run:
        assert run.name == "onnxruntime"
