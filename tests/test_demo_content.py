"""The demo shows what the bundled model knows: real photos of its own classes, each with its
source and a licence that allows bundling, and the model names every one of them."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from i2e_deploy.apps.stream import run_demo
from i2e_deploy.artifacts import read_card
from i2e_deploy.assets import DEFAULT_MODEL, DEMO_PHOTOS
from i2e_deploy.images import preprocess
from i2e_deploy.runtime.sources import DemoSource, demo_intro, demo_manifest
from i2e_deploy.targets import resolve_runner

BUNDLABLE = {"public domain", "CC0-1.0"}  # no attribution or share-alike terms to carry


@pytest.fixture(scope="module")
def card():
    return read_card(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def runner():
    with resolve_runner("default", backend="torch", threads=1) as opened:
        yield opened


def test_manifest_lists_each_bundled_photo_with_its_source_and_licence():
    manifest = demo_manifest()
    bundled = {p.name for p in DEMO_PHOTOS.iterdir() if p.suffix == ".jpg"}
    assert bundled == {photo["file"] for photo in manifest}  # nothing unlisted, nothing missing
    for photo in manifest:
        assert photo["licence"] in BUNDLABLE, photo["file"]
        for key in ("subject", "package", "original_file", "origin", "author"):
            assert photo[key].strip(), (photo["file"], key)
        with Image.open(photo["path"]) as image:
            assert max(image.size) <= 384 and image.mode == "RGB"
    assert sum(photo["path"].stat().st_size for photo in manifest) < 512 * 1024


def test_photos_are_of_the_bundled_models_classes(card):
    labels = [photo["label"] for photo in demo_manifest()]
    assert set(labels) <= set(card.class_names)
    assert len(set(labels)) >= 4
    assert DemoSource().labels == labels


@pytest.mark.slow
def test_bundled_model_names_every_demo_photo(card, runner):
    """Top-1 on each photo as the stream preprocesses it, and on the demo clip's own frames
    of it; what the manifest claims is what the model says."""
    names = card.class_names
    clip = DemoSource()
    frames = [frame.image for frame in clip]
    n = clip.frames_per_image
    for index, (photo, entry) in enumerate(zip(clip.photos, demo_manifest())):
        label = names.index(entry["label"])
        probs = softmax(runner.infer(preprocess(photo, card)[None]))[0]
        assert probs.argmax() == label, (entry["file"], names[probs.argmax()])
        assert entry["model_top1"] == entry["label"]
        assert entry["model_prob"] == pytest.approx(probs[label], abs=0.02)
        views = np.stack([preprocess(f, card) for f in frames[index * n : (index + 1) * n]])
        right = (runner.infer(views).argmax(1) == label).mean()
        assert right >= 0.9, (entry["file"], right)
        assert entry["demo_frames_right"] == pytest.approx(right, abs=0.05)


def test_demo_first_line_names_the_classes_and_the_photos():
    notes: list[str] = []
    stats, _ = run_demo(output=["none"], max_frames=2, backend="torch", threads=1, log=notes.append)
    assert stats.frames == 2 and notes[1].startswith("runner: PyTorch")
    assert notes[0] == (
        "model knows 10 classes: airplane, automobile, bird, cat, deer, dog, frog, horse, "
        "ship, truck; the demo shows photos of cat, horse, bird, deer"
    )


def test_demo_claims_nothing_for_a_model_of_other_classes():
    other = demo_intro(["apple", "cat"], 2)
    assert other.startswith("model knows 2 classes: apple, cat;")
    assert "are not all of its classes" in other and "shows photos of" not in other
    unnamed = demo_intro(None, 5)
    assert unnamed.startswith("model knows 5 unnamed classes;") and "cannot be matched" in unnamed


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)
