"""Train and fine-tune MS-ResNets with the paper's recipes (SGD + cosine, label smoothing,
on-the-fly I2E conversion with random directions)."""
from __future__ import annotations

import csv
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..card import ARCHS, ModelCard, default_resolution
from ..errors import I2EError
from ..model.checkpoint import load_checkpoint, save_checkpoint
from ..model.msresnet import MSResNet, build_model
from . import data as D

RECIPES = ("baseline-i", "baseline-ii", "transfer")


@dataclass
class TrainConfig:
    data: str
    output: str = "runs/train"
    recipe: str = "baseline-ii"
    arch: str = "msresnet18"
    imgsz: int | None = None
    ratio: float | None = None
    epochs: int = 256
    batch: int = 64
    lr: float = 0.1
    min_lr: float = 5e-5
    momentum: float = 0.9
    weight_decay: float | None = None  # 2e-4 CIFAR-style, 1e-5 ImageNet-style
    label_smoothing: float = 0.1
    augment: str | None = None  # cifar | imagenet | none (default from recipe and image size)
    val_split: float = 0.0      # held-out count (>= 1) or fraction of a single folder
    val_data: str | None = None
    seed: int = 0
    workers: int = 2
    device: str = "cpu"
    from_checkpoint: str | None = None
    events: bool = False
    resume: bool = False
    max_steps: int | None = None  # stop early (tests, smoke runs); the schedule still spans all epochs
    class_names: list[str] | None = field(default=None)


def _device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise I2EError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return torch.device(name)


def _card(cfg: TrainConfig, classes: list[str]) -> ModelCard:
    imgsz, ratio, resize = default_resolution(len(classes))
    imgsz = cfg.imgsz or imgsz
    resize = imgsz if len(classes) < 1000 else max(imgsz, round(imgsz * 256 / 224))
    return ModelCard(arch=cfg.arch, input="images", num_classes=len(classes),
                     class_names=list(classes), ratio=cfg.ratio if cfg.ratio is not None else ratio,
                     imgsz=imgsz, resize=resize)


def _initial_model(cfg: TrainConfig, card: ModelCard) -> MSResNet:
    model = build_model(card)
    if cfg.from_checkpoint:
        source, _ = load_checkpoint(cfg.from_checkpoint)
        state = {k: v for k, v in source.state_dict().items()
                 if not (k.startswith("fc.") and v.shape != model.state_dict()[k].shape)}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) - {"fc.weight", "fc.bias"}:
            raise I2EError(f"--from {cfg.from_checkpoint}: architecture differs from --arch "
                           f"{cfg.arch}")
    return model


def accuracy(logits: torch.Tensor, targets: torch.Tensor, k: int = 1) -> int:
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return int((top == targets[:, None]).any(dim=1).sum())


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
    model.eval()
    correct1 = correct5 = total = 0
    for images, targets in loader:
        logits = model(images.to(device, non_blocking=True))
        targets = targets.to(device)
        correct1 += accuracy(logits, targets, 1)
        correct5 += accuracy(logits, targets, 5)
        total += len(targets)
    return {"top1": 100.0 * correct1 / max(total, 1), "top5": 100.0 * correct5 / max(total, 1)}


def train(cfg: TrainConfig, log=print) -> Path:
    """Run a training job; returns the path of the best checkpoint."""
    if cfg.recipe not in RECIPES:
        raise I2EError(f"unknown recipe {cfg.recipe!r}; choose one of {', '.join(RECIPES)}")
    if cfg.arch not in ARCHS:
        raise I2EError(f"unknown arch {cfg.arch!r}; choose one of {', '.join(ARCHS)}")
    if cfg.recipe == "transfer" and not cfg.from_checkpoint:
        raise I2EError("--recipe transfer needs --from CHECKPOINT")
    torch.manual_seed(cfg.seed)
    device = _device(cfg.device)
    folder = D.image_folder(cfg.data)
    src_size = D.source_size(folder)
    card = _card(cfg, folder.classes)
    style = cfg.augment or ("none" if cfg.recipe == "baseline-i"
                            else "cifar" if src_size <= 64 else "imagenet")
    wd = cfg.weight_decay if cfg.weight_decay is not None else (2e-4 if style != "imagenet" else 1e-5)

    if cfg.val_data:
        val_folder = D.image_folder(cfg.val_data)
        train_idx, val_idx = list(range(len(folder))), list(range(len(val_folder)))
    else:
        val_folder = folder
        train_idx, val_idx = D.split_indices(folder.targets, cfg.val_split, cfg.seed)
    train_set = D.Subset(folder, train_idx, D.train_transform(card, style, src_size))
    val_set = D.Subset(val_folder, val_idx, D.eval_transform(card))
    loader_kw = dict(batch_size=cfg.batch, num_workers=cfg.workers,
                     persistent_workers=cfg.workers > 0, pin_memory=device.type == "cuda")
    train_loader = DataLoader(train_set, shuffle=True, drop_last=True, **loader_kw)
    val_loader = DataLoader(val_set, shuffle=False, **loader_kw) if val_idx else None
    if len(train_loader) == 0:
        raise I2EError(f"{len(train_set)} training images are fewer than one batch of {cfg.batch}")

    model = _initial_model(cfg, card).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=wd)
    total_steps = cfg.epochs * len(train_loader)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total_steps, cfg.min_lr)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")

    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    start_epoch, best, step = 0, -1.0, 0
    last_path, best_path = out / "last.pt", out / "best.pt"
    if cfg.resume:
        if not last_path.is_file():
            raise I2EError(f"--resume: no {last_path} to resume from")
        state = torch.load(last_path, map_location="cpu", weights_only=True)
        model.load_state_dict({k: v.float() if v.is_floating_point() else v
                               for k, v in state["state_dict"].items()})
        optimizer.load_state_dict(state["train_state"]["optimizer"])
        scheduler.load_state_dict(state["train_state"]["scheduler"])
        start_epoch, best = state["train_state"]["epoch"] + 1, state["train_state"]["best"]
        step = start_epoch * len(train_loader)
        log(f"resumed from {last_path} at epoch {start_epoch}")

    card.provenance = {"trained_by": "i2e-deploy train", "recipe": cfg.recipe,
                       "augment": style, "data": Path(cfg.data).name,
                       "train_images": len(train_set), "heldout_images": len(val_set),
                       "val_split": cfg.val_split, "seed": cfg.seed, "epochs": cfg.epochs}
    log_path = out / "log.csv"
    new_log = not (cfg.resume and log_path.is_file())
    with open(log_path, "w" if new_log else "a", newline="") as log_file:
        writer = csv.writer(log_file)
        if new_log:
            writer.writerow(["epoch", "train_loss", "train_top1", "val_top1", "val_top5", "lr",
                             "seconds"])
        for epoch in range(start_epoch, cfg.epochs):
            model.train()
            began, loss_sum, correct, seen = time.time(), 0.0, 0, 0
            for images, targets in train_loader:
                images = images.to(device, non_blocking=True)
                targets = targets.to(device, non_blocking=True)
                with torch.autocast(device.type, enabled=device.type == "cuda"):
                    logits = model(images)
                    loss = criterion(logits, targets)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                step += 1
                loss_sum += loss.item() * len(targets)
                correct += accuracy(logits.detach(), targets)
                seen += len(targets)
                if step % 50 == 0:
                    log(f"epoch {epoch + 1}/{cfg.epochs} step {step}/{total_steps} "
                        f"loss {loss_sum / seen:.4f} top1 {100 * correct / seen:.2f} "
                        f"{seen / (time.time() - began):.1f} img/s")
                if cfg.max_steps and step >= cfg.max_steps:
                    break
            metrics = evaluate(model, val_loader, device) if val_loader else {"top1": math.nan,
                                                                              "top5": math.nan}
            seconds = time.time() - began
            writer.writerow([epoch + 1, f"{loss_sum / max(seen, 1):.4f}",
                             f"{100 * correct / max(seen, 1):.2f}", f"{metrics['top1']:.2f}",
                             f"{metrics['top5']:.2f}", f"{scheduler.get_last_lr()[0]:.6f}",
                             f"{seconds:.0f}"])
            log_file.flush()
            log(f"epoch {epoch + 1}: train loss {loss_sum / max(seen, 1):.4f}, held-out top1 "
                f"{metrics['top1']:.2f} top5 {metrics['top5']:.2f} ({seconds:.0f} s)")
            score = metrics["top1"] if val_loader else -epoch
            card.provenance.update({"epochs_done": epoch + 1, "heldout_top1": metrics["top1"],
                                    "heldout_top5": metrics["top5"]})
            train_state = {"epoch": epoch, "best": max(best, score),
                           "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                           "config": asdict(cfg)}
            save_checkpoint(last_path, model, card, extra={"train_state": train_state})
            if score > best:
                best = score
                save_checkpoint(best_path, model, card)
            if cfg.max_steps and step >= cfg.max_steps:
                break
    return best_path
