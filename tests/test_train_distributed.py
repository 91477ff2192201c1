"""Distributed training: two CPU processes with gloo (as torchrun would start them) end with
identical weights, and only rank 0 writes."""

from __future__ import annotations

import csv
import os
import socket

import torch
import torch.multiprocessing as mp
from training_data import cifar_folder

from i2e_deploy.model.checkpoint import load_checkpoint
from i2e_deploy.training.train import TrainConfig, run_training

WORLD = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, cfg: TrainConfig, port: int, results: str) -> None:
    os.environ.update(
        {
            "RANK": str(rank),
            "WORLD_SIZE": str(WORLD),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    torch.set_num_threads(1)
    result = run_training(cfg, log=lambda _: None)
    torch.save(result.model.state_dict(), os.path.join(results, f"rank{rank}.pt"))


def test_two_gloo_processes_end_identical(tmp_path):
    data = cifar_folder(tmp_path)
    cfg = TrainConfig(
        data=str(data),
        output=str(tmp_path / "run"),
        imgsz=32,
        ratio=0.2,
        epochs=2,
        batch=6,
        lr=0.05,
        val_split=6,
        workers=0,
        seed=0,
    )
    mp.spawn(_worker, args=(cfg, _free_port(), str(tmp_path)), nprocs=WORLD, join=True)

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    # Rank 0 wrote the checkpoint: the same weights, and the run's shape in its card.
    model, card = load_checkpoint(tmp_path / "run" / "last.pt")
    for key, value in model.state_dict().items():
        assert torch.equal(value, ranks[0][key]), key
    assert card.provenance["processes"] == WORLD
    assert card.provenance["heldout_images"] == 6  # all-reduced over both shards
    # 18 training images, global batch 6 -> 3 per rank and step, 3 steps per epoch.
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["train_state"]
    assert state["scheduler"]["last_epoch"] == 6
    with open(tmp_path / "run" / "log.csv") as fh:
        assert [row["epoch"] for row in csv.DictReader(fh)] == ["1", "2"]
