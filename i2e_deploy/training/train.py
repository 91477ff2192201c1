"""Train and fine-tune MS-ResNets with the paper's recipes (SGD + cosine, label smoothing,
on-the-fly I2E conversion with random directions), on image folders or I2E event datasets,
on one device or many through torchrun."""

from __future__ import annotations

import copy
import csv
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from ..card import ARCHS, ModelCard, default_resolution
from ..errors import I2EError
from ..images import Readable, skip_unreadable
from ..model.checkpoint import load_checkpoint, save_checkpoint
from ..model.msresnet import MSResNet, build_model
from . import data as D
from . import distributed as dist_util
from .eventsets import EventFolder, is_event_folder
from .precision import Precision, resolve_precision

RECIPES = ("baseline-i", "baseline-ii", "transfer")
LOG_EVERY = 50  # steps between log lines when no progress bar is shown


@dataclass
class TrainConfig:
    data: str
    output: str = "runs/train"
    recipe: str = "baseline-ii"
    arch: str = "msresnet18"
    imgsz: int | None = None
    ratio: float | None = None
    epochs: int = 256
    batch: int = 64  # global batch, split evenly over torchrun processes
    lr: float = 0.1
    min_lr: float = 5e-5
    momentum: float = 0.9
    weight_decay: float | None = None  # 2e-4 CIFAR-style, 1e-5 ImageNet-style
    label_smoothing: float = 0.1
    augment: str | None = None  # cifar | imagenet | none (default from recipe and image size)
    val_split: float = 0.0  # held-out count (>= 1) or fraction of a single folder
    val_data: str | None = None
    seed: int = 0
    workers: int = 2
    device: str = "cpu"
    from_checkpoint: str | None = None
    events: bool = False  # the trained model takes events (its card says input 'events')
    resume: bool = False
    max_steps: int | None = (
        None  # stop early (tests, smoke runs); the schedule still spans all epochs
    )
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (see training.precision)
    time_budget: float | None = None  # minutes: as many epochs as fit, the schedule fitted to them
    class_names: list[str] | None = field(default=None)
    mixup: bool = False  # CutMix or MixUp per batch for the first 2/3 of the epochs
    tensorboard: bool = False  # also log scalars to OUTPUT/tensorboard


def build_card(
    arch: str, classes: list[str], imgsz: int | None, ratio: float | None, events: bool = False
) -> ModelCard:
    """The card of a new model: the paper's size and ratio for the class count unless given."""
    default_size, default_ratio, _ = default_resolution(len(classes))
    imgsz = imgsz or default_size
    resize = imgsz if len(classes) < 1000 else max(imgsz, round(imgsz * 256 / 224))
    return ModelCard(
        arch=arch,
        input="events" if events else "images",
        num_classes=len(classes),
        class_names=list(classes),
        ratio=ratio if ratio is not None else default_ratio,
        imgsz=imgsz,
        resize=resize,
    )


def _initial_model(cfg: TrainConfig, card: ModelCard, log) -> MSResNet:
    """A fresh model, or one fine-tuned from ``--from``: every weight but a head of the wrong
    size is copied, so an image-trained checkpoint also starts an event-input model."""
    model = build_model(card)
    if cfg.from_checkpoint:
        source, source_card = load_checkpoint(cfg.from_checkpoint)
        if source_card.arch != card.arch:
            raise I2EError(
                f"--from {cfg.from_checkpoint} is a {source_card.arch}; pass "
                f"--arch {source_card.arch}"
            )
        target = model.state_dict()
        state = {
            k: v
            for k, v in source.state_dict().items()
            if not (k.startswith("fc.") and v.shape != target[k].shape)
        }
        model.load_state_dict(state, strict=False)
        head = "new head" if "fc.weight" not in state else "its head"
        log(
            f"fine-tuning from {cfg.from_checkpoint} ({source_card.input} input, "
            f"{source_card.num_classes} classes) with {head}"
        )
    return model


class TrainForward(nn.Module):
    """Routes a batch of images ([B, 3, H, W] / uint8 NHWC, converted by the model's I2E
    layer) or of event samples ([B, T, 2, H, W]) through one module, whatever input the
    model's card names, so DistributedDataParallel sees a single forward."""

    def __init__(self, model: MSResNet):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 5:
            events = x.transpose(0, 1).float()
        else:
            events = self.model.i2e(x)
        return self.model.forward_events(events)


def train_step(
    net: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    precision: Precision,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step; returns (loss, logits)."""
    with precision.autocast():
        logits = net(inputs)
        loss = criterion(logits, targets)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss, logits


def accuracy(logits: torch.Tensor, targets: torch.Tensor, k: int = 1) -> int:
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return int((top == targets[:, None]).any(dim=1).sum())


@torch.no_grad()
def evaluate(forward: nn.Module, loader: Iterable, device: torch.device) -> list[float]:
    """(top-1 correct, top-5 correct, count) on this process's share of the held-out set."""
    forward.eval()
    correct1 = correct5 = total = 0
    for inputs, targets in loader:
        logits = forward(inputs.to(device, non_blocking=True))
        targets = targets.to(device)
        correct1 += accuracy(logits, targets, 1)
        correct5 += accuracy(logits, targets, 5)
        total += len(targets)
    return [correct1, correct5, total]


@dataclass
class _Data:
    train: D.Subset | torch.utils.data.Subset
    heldout: D.HeldOut | torch.utils.data.Subset | None
    card: ModelCard
    style: str  # augmentation, or 'events'


def _prepare_data(cfg: TrainConfig, shard: slice) -> _Data:
    """Datasets and the new model's card. ``shard`` picks this process's held-out share."""
    if is_event_folder(cfg.data):
        return _event_data(cfg, shard)
    folder = D.image_folder(cfg.data)
    src_size = D.source_size(folder)
    classes = cfg.class_names or folder.classes
    if len(classes) != len(folder.classes):
        raise I2EError(f"{len(classes)} class names given for {len(folder.classes)} class folders")
    card = build_card(cfg.arch, classes, cfg.imgsz, cfg.ratio, cfg.events)
    style = cfg.augment or (
        "none" if cfg.recipe == "baseline-i" else "cifar" if src_size <= 64 else "imagenet"
    )
    if cfg.val_data:
        val_folder = D.image_folder(cfg.val_data)
        if val_folder.classes != folder.classes:
            raise I2EError(f"--val-data {cfg.val_data} has other class folders than {cfg.data}")
        train_idx, val_idx = list(range(len(folder))), list(range(len(val_folder)))
    else:
        val_folder = folder
        train_idx, val_idx = D.split_indices(folder.targets, cfg.val_split, cfg.seed)
    train_set = D.Subset(folder, train_idx, D.train_transform(card, style, src_size))
    heldout = D.HeldOut([val_folder.samples[i] for i in val_idx[shard]], card) if val_idx else None
    return _Data(train_set, heldout, card, style)


def _event_data(cfg: TrainConfig, shard: slice) -> _Data:
    folder = EventFolder(cfg.data)
    steps, _, height, width = folder.sample_shape
    if height != width:
        raise I2EError(f"{cfg.data}: event samples are {height}x{width}; models take square input")
    if cfg.imgsz and cfg.imgsz != height:
        raise I2EError(
            f"--imgsz {cfg.imgsz} differs from the event samples' size {height}; "
            "convert the dataset at the size you want"
        )
    ratio = cfg.ratio if cfg.ratio is not None else folder.meta.get("ratio")
    card = build_card(cfg.arch, cfg.class_names or folder.classes, height, ratio, cfg.events)
    if steps != card.T:
        raise I2EError(f"{cfg.data}: samples have {steps} time steps, models take {card.T}")
    if cfg.val_data:
        heldout_folder = EventFolder(cfg.val_data)
        train_idx, val_idx = list(range(len(folder))), list(range(len(heldout_folder)))
    else:
        heldout_folder = folder
        train_idx, val_idx = D.split_indices(folder.targets, cfg.val_split, cfg.seed)
    train_set = torch.utils.data.Subset(folder, train_idx)
    heldout = torch.utils.data.Subset(heldout_folder, val_idx[shard]) if val_idx else None
    return _Data(train_set, heldout, card, "events")


def _mixer(num_classes: int):
    from torchvision.transforms import v2

    return v2.RandomChoice([v2.CutMix(num_classes=num_classes), v2.MixUp(num_classes=num_classes)])


def _mix(mixer, inputs: torch.Tensor, targets: torch.Tensor):
    if inputs.dim() == 5:  # event samples: torchvision treats [B, T, C, H, W] as videos
        from torchvision import tv_tensors

        mixed, soft = mixer(tv_tensors.Video(inputs.float()), targets)
        return mixed.as_subclass(torch.Tensor), soft
    return mixer(inputs, targets)


def _tensorboard(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise I2EError(
            "--tensorboard needs the tensorboard package: pip install tensorboard"
        ) from None
    return SummaryWriter(str(path))


class _Reporter:
    """A rich progress bar on a terminal; a log line every LOG_EVERY steps otherwise."""

    def __init__(self, console, log, enabled: bool):
        self.log = log
        self.bar = None
        if enabled and console is not None and console.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(
                TextColumn("epoch {task.fields[epoch]}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeRemainingColumn(),
                console=console,
            )
            self.bar.start()
            self.task = self.bar.add_task("train", total=0, epoch="", stats="")
        self.enabled = enabled

    def epoch(self, label: str, steps: int) -> None:
        self.label = label
        if self.bar:
            self.bar.reset(self.task, total=steps, epoch=label, stats="")

    def step(self, step: int, total: int, stats: Callable[[], str]) -> None:
        """``stats`` is called only when shown (it reads values off the device)."""
        if self.bar:
            self.bar.update(self.task, advance=1, stats=stats())
        elif self.enabled and step % LOG_EVERY == 0:
            self.log(f"epoch {self.label} step {step}/{total} {stats()}")

    def close(self) -> None:
        if self.bar:
            self.bar.stop()


class CosineSchedule:
    """Cosine decay from the base learning rate to ``floor`` x base over ``total`` steps, as
    a LambdaLR factor; ``total`` may change during training (``--time``)."""

    def __init__(self, total: int, floor: float):
        self.total, self.floor = total, floor

    def __call__(self, step: int) -> float:
        progress = min(step / max(self.total, 1), 1.0)
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * progress))


class Budget:
    """``--time``: after each epoch, as many epochs as the mean epoch time lets fit in the
    budget (as Ultralytics' ``time``), with the cosine schedule stretched or cut to them."""

    def __init__(self, minutes: float, steps_per_epoch: int, schedule: CosineSchedule):
        self.seconds, self.steps_per_epoch, self.schedule = minutes * 60, steps_per_epoch, schedule
        self.spent = 0.0

    def fit(self, first_epoch: int, epochs_done: int, epoch_seconds: float) -> int:
        """The total epoch count, given the epochs done (``first_epoch`` of them before this
        run, whose time the budget does not know)."""
        self.spent += epoch_seconds
        this_run = epochs_done - first_epoch
        epochs = first_epoch + max(this_run, int(self.seconds * this_run / self.spent))
        self.schedule.total = epochs * self.steps_per_epoch
        return epochs


@dataclass
class TrainResult:
    best: Path
    last: Path
    model: MSResNet  # this process's final weights


def train(cfg: TrainConfig, log=print, console=None) -> Path:
    """Run a training job; returns the path of the best checkpoint."""
    return run_training(cfg, log, console).best


def run_training(cfg: TrainConfig, log=print, console=None) -> TrainResult:
    """Run a training job. Under torchrun every process runs this; rank 0 alone logs and
    writes, and every process returns its own final model."""
    if cfg.recipe not in RECIPES:
        raise I2EError(f"unknown recipe {cfg.recipe!r}; choose one of {', '.join(RECIPES)}")
    if cfg.arch not in ARCHS:
        raise I2EError(f"unknown arch {cfg.arch!r}; choose one of {', '.join(ARCHS)}")
    if cfg.time_budget is not None and not cfg.time_budget > 0:
        raise I2EError(f"--time must be a positive number of minutes, got {cfg.time_budget:g}")
    if cfg.recipe == "transfer" and not cfg.from_checkpoint:
        raise I2EError("--recipe transfer needs --from CHECKPOINT")
    ctx, device = dist_util.setup(cfg.device)
    try:
        return _train(cfg, ctx, device, log if ctx.main else (lambda msg: None), console)
    finally:
        dist_util.teardown(ctx)


def _train(
    cfg: TrainConfig, ctx: dist_util.Context, device: torch.device, log, console
) -> TrainResult:
    if cfg.batch % ctx.world:
        raise I2EError(f"--batch {cfg.batch} does not split evenly over {ctx.world} processes")
    torch.manual_seed(cfg.seed)
    data = _prepare_data(cfg, slice(ctx.rank, None, ctx.world))
    card = data.card
    style = data.style
    wd = (
        cfg.weight_decay
        if cfg.weight_decay is not None
        else (2e-4 if style != "imagenet" else 1e-5)
    )
    batch = cfg.batch // ctx.world
    loader_kw: dict[str, Any] = dict(
        batch_size=batch,
        num_workers=cfg.workers,
        collate_fn=skip_unreadable,
        persistent_workers=cfg.workers > 0,
        pin_memory=device.type == "cuda",
    )
    sampler: DistributedSampler | None = (
        DistributedSampler(
            data.train, ctx.world, ctx.rank, shuffle=True, seed=cfg.seed, drop_last=True
        )
        if ctx.enabled
        else None
    )
    train_loader = DataLoader(
        data.train, shuffle=sampler is None, sampler=sampler, drop_last=True, **loader_kw
    )
    train_batches = Readable(train_loader, cfg.data)
    val_loader = (
        Readable(DataLoader(data.heldout, shuffle=False, **loader_kw), cfg.val_data or cfg.data)
        if data.heldout
        else None
    )
    if len(train_loader) == 0:
        raise I2EError(
            f"{len(data.train)} training samples are fewer than one batch of {cfg.batch}"
        )

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv kernels
        # Held-out evaluation runs in float32 as deployment does, not TF32 (10-bit mantissa
        # moves membranes across the threshold); the training steps follow --precision.
        torch.backends.cudnn.allow_tf32 = False
    model = _initial_model(cfg, card, log).to(device).to(memory_format=torch.channels_last)
    forward = TrainForward(model)
    net = (
        nn.parallel.DistributedDataParallel(
            forward, device_ids=[device.index] if device.type == "cuda" else None
        )
        if ctx.enabled
        else forward
    )
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=wd
    )
    schedule = CosineSchedule(cfg.epochs * len(train_loader), cfg.min_lr / cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    precision = resolve_precision(cfg.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.scaled)
    log(f"training in {precision.name} on {device}")
    mixer = _mixer(card.num_classes) if cfg.mixup else None

    out = Path(cfg.output)
    if ctx.main:
        out.mkdir(parents=True, exist_ok=True)
    start_epoch, best, step = 0, -math.inf, 0
    last_path, best_path = out / "last.pt", out / "best.pt"
    if cfg.resume:
        if not last_path.is_file():
            raise I2EError(f"--resume: no {last_path} to resume from")
        state = torch.load(last_path, map_location="cpu", weights_only=True)
        model.load_state_dict(
            {k: v.float() if v.is_floating_point() else v for k, v in state["state_dict"].items()}
        )
        optimizer.load_state_dict(state["train_state"]["optimizer"])
        scheduler.load_state_dict(state["train_state"]["scheduler"])
        schedule.total = state["train_state"].get("total_steps", schedule.total)
        if precision.scaled and "scaler" in state["train_state"]:
            scaler.load_state_dict(state["train_state"]["scaler"])
        start_epoch, best = state["train_state"]["epoch"] + 1, state["train_state"]["best"]
        step = scheduler.last_epoch
        if "rng" in state["train_state"]:  # same shuffles and directions as an unbroken run
            torch.set_rng_state(state["train_state"]["rng"])
        log(f"resumed from {last_path} at epoch {start_epoch + 1}")

    heldout_images = dist_util.sum_across(ctx, [len(data.heldout or ())], device)[0]
    card.provenance = {
        "trained_by": "i2e-deploy train",
        "recipe": cfg.recipe,
        "augment": style,
        "data": Path(cfg.data).name,
        "train_images": len(data.train),
        "heldout_images": int(heldout_images),
        "val_split": cfg.val_split,
        "seed": cfg.seed,
        "epochs": cfg.epochs,
        "batch": cfg.batch,
        "lr": cfg.lr,
        "weight_decay": wd,
        "processes": ctx.world,
        "mixup": cfg.mixup,
        "precision": precision.name,
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
        **({"time_budget_min": cfg.time_budget} if cfg.time_budget else {}),
    }
    if cfg.from_checkpoint:
        card.provenance["fine_tuned_from"] = Path(cfg.from_checkpoint).name
    board = _tensorboard(out / "tensorboard") if cfg.tensorboard and ctx.main else None
    reporter = _Reporter(console, log, enabled=ctx.main)
    log_path = out / "log.csv"
    new_log = not (cfg.resume and log_path.is_file())
    log_file = open(log_path, "w" if new_log else "a", newline="") if ctx.main else None
    try:
        writer = csv.writer(log_file) if log_file else None
        if writer and new_log:
            writer.writerow(
                ["epoch", "train_loss", "train_top1", "val_top1", "val_top5", "lr", "seconds"]
            )
        budget = Budget(cfg.time_budget, len(train_loader), schedule) if cfg.time_budget else None
        epoch, epochs = start_epoch, cfg.epochs
        while epoch < epochs:
            if sampler is not None:
                sampler.set_epoch(epoch)
            net.train()
            reporter.epoch(f"{epoch + 1}/{epochs}", len(train_loader))
            mixing = mixer is not None and epoch < math.ceil(epochs * 2 / 3)
            began, seen = time.time(), 0
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), dtype=torch.long, device=device)
            for inputs, targets in train_batches:
                inputs = inputs.to(device, non_blocking=True)
                targets = targets.to(device, non_blocking=True)
                labels = targets
                if mixing:
                    inputs, targets = _mix(mixer, inputs, targets)
                    labels = targets.argmax(dim=1)
                loss, logits = train_step(
                    net, inputs, targets, criterion, optimizer, scaler, precision
                )
                scheduler.step()
                step += 1
                # Running sums stay on the device: no host sync per step on a GPU.
                loss_sum += loss.detach().float() * len(labels)
                correct += (logits.detach().argmax(1) == labels).sum()
                seen += len(labels)
                reporter.step(
                    step,
                    schedule.total,
                    lambda: (  # called within this step
                        f"loss {float(loss_sum) / seen:.4f} "  # noqa: B023
                        f"top1 {100 * int(correct) / seen:.2f} "  # noqa: B023
                        f"{seen * ctx.world / (time.time() - began):.1f} img/s"  # noqa: B023
                    ),
                )
                if cfg.max_steps and step >= cfg.max_steps:
                    break
            train_batches.report()  # one warning line about unreadable files, once
            dist_util.average_batchnorm(ctx, model)
            total_loss, total_correct, total_seen = dist_util.sum_across(
                ctx, [float(loss_sum), int(correct), seen], device
            )
            metrics: dict[str, float] = {}  # held-out top-1/top-5, when there is a held-out set
            if val_loader is not None:
                # A contiguous copy: the layout deployment runs (channels_last convolutions
                # round differently and flip a few spikes), so `val` reproduces this number.
                reference = TrainForward(
                    copy.deepcopy(model).to(memory_format=torch.contiguous_format)
                )
                c1, c5, n = dist_util.sum_across(
                    ctx, evaluate(reference, val_loader, device), device
                )
                val_loader.report()
                metrics = {"top1": 100.0 * c1 / max(n, 1), "top5": 100.0 * c5 / max(n, 1)}
            seconds = time.time() - began
            train_loss = total_loss / max(total_seen, 1)
            train_top1 = 100 * total_correct / max(total_seen, 1)
            lr = scheduler.get_last_lr()[0]
            if budget is not None:  # every process decides on the same (mean) epoch time
                pace = dist_util.sum_across(ctx, [seconds], device)[0] / ctx.world
                epochs = budget.fit(start_epoch, epoch + 1, pace)
            heldout = (
                f"held-out top1 {metrics['top1']:.2f} top5 {metrics['top5']:.2f}"
                if metrics
                else f"train top1 {train_top1:.2f} (no held-out set)"
            )
            log(
                f"epoch {epoch + 1}/{epochs}: train loss {train_loss:.4f}, {heldout} "
                f"({seconds:.0f} s)"
            )
            # Without held-out data the latest epoch counts as the best.
            score = metrics["top1"] if metrics else float(epoch)
            if ctx.main:
                if writer is not None and log_file is not None:
                    writer.writerow(
                        [
                            epoch + 1,
                            f"{train_loss:.4f}",
                            f"{train_top1:.2f}",
                            *(f"{metrics[k]:.2f}" if metrics else "" for k in ("top1", "top5")),
                            f"{lr:.6f}",
                            f"{seconds:.0f}",
                        ]
                    )
                    log_file.flush()
                if board:
                    for name, value in (
                        ("train/loss", train_loss),
                        ("train/top1", train_top1),
                        *((f"heldout/{k}", v) for k, v in metrics.items()),
                        ("lr", lr),
                    ):
                        board.add_scalar(name, value, epoch + 1)
                    board.flush()
                card.provenance.update(
                    {
                        "epochs": epochs,
                        "epochs_done": epoch + 1,
                        **{f"heldout_{k}": v for k, v in metrics.items()},
                    }
                )
                train_state = {
                    "epoch": epoch,
                    "best": max(best, score),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "config": asdict(cfg),
                    "total_steps": schedule.total,
                    "rng": torch.get_rng_state(),
                }
                if precision.scaled:
                    train_state["scaler"] = scaler.state_dict()
                save_checkpoint(last_path, model, card, extra={"train_state": train_state})
                if score > best:
                    save_checkpoint(best_path, model, card)
            best = max(best, score)
            epoch += 1
            if cfg.max_steps and step >= cfg.max_steps:
                break
    finally:
        reporter.close()
        if log_file:
            log_file.close()
        if board:
            board.close()
    log(f"best checkpoint: {best_path}")
    return TrainResult(best_path, last_path, model)
