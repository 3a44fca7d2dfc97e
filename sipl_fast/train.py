"""SIPL training: the published recipe, resumable, on one process or many (torchrun + DDP).

Recipe defaults (published where known): AdamW at lr 2e-4, linear warm-up then
cosine decay, 128x128 crops, L1 loss, privileged features from the ground truth
(``sipl_training_step``), an EMA of the weights saved as ``params_ema``,
gradient-norm clipping, bf16 autocast on GPUs. Checkpoints are BasicSR files
(``models/net_g_<step>.pth`` with ``params`` and ``params_ema``) that
``load_model`` reads; ``training_states/<step>.state`` holds what a resume
needs, and a resumed run continues the loss curve exactly.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch

from ._files import atomic_path
from .data import TrainingData, clean_images, paired_images
from .distributed import Ranks
from .loops import restore, sipl_training_step
from .metrics import psnr
from .model import SIPL, SIPLConfig


@dataclass
class TrainConfig:
    """Everything a run depends on; a YAML file sets any of these (``model`` is a SIPLConfig mapping)."""

    output: str = "runs/sipl"
    model: dict = field(default_factory=dict)
    images: str = "skimage"  # clean images for synthetic degradations: "skimage" or a folder
    degradations: List[str] = field(default_factory=lambda: ["noise15", "noise25", "noise50", "haze", "lowlight"])
    lq: Optional[str] = None  # paired folders instead of synthetic degradations
    gt: Optional[str] = None
    crop: int = 128
    batch_size: int = 8  # global: split across torchrun processes
    iterations: int = 300_000
    lr: float = 2e-4
    min_lr: float = 1e-6
    weight_decay: float = 1e-4
    warmup: int = 3000
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    precision: str = "auto"  # auto: bf16 autocast on CUDA; fp32 | bf16
    log_every: int = 50  # loss.csv and the progress bar are written this often (one host sync each time)
    val_every: int = 1000
    val_samples: int = 8
    val_iterations: int = 1
    save_every: int = 5000
    seed: int = 0

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}; expected some of {sorted(known)}")
        return cls(**values)


class EMA:
    """Exponential moving average of a model's parameters (BasicSR's ``net_g_ema``)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        ema = list(self.model.parameters())
        torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 1.0 - self.decay)


def scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    """Linear warm-up to ``lr`` over ``warmup`` steps, then cosine decay to ``min_lr``."""
    warmup = min(cfg.warmup, max(cfg.iterations - 1, 0))
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(cfg.iterations - warmup, 1), eta_min=cfg.min_lr)
    if warmup == 0:
        return decay
    ramp = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1e-3, total_iters=warmup)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, decay], milestones=[warmup])


def training_data(cfg: TrainConfig) -> TrainingData:
    if cfg.lq or cfg.gt:
        if not (cfg.lq and cfg.gt):
            raise ValueError("paired training needs both lq and gt folders")
        return TrainingData(cfg.crop, cfg.seed, pairs=paired_images(cfg.lq, cfg.gt))
    return TrainingData(cfg.crop, cfg.seed, clean=clean_images(cfg.images), degradations=cfg.degradations)


def validate(model: SIPL, data: TrainingData, cfg: TrainConfig, device) -> float:
    """Mean PSNR over a fixed batch of samples (step -1) restored with ``val_iterations`` SIPL iterations."""
    lq, gt = data.batch(-1, range(cfg.val_samples))
    out = restore(model, lq.to(device), cfg.val_iterations).float().cpu()
    return sum(psnr(o.permute(1, 2, 0).numpy(), g.permute(1, 2, 0).numpy()) for o, g in zip(out, gt)) / len(gt)


def save(path: Path, step: int, model, ema: EMA, optimizer, sched, cfg: TrainConfig) -> Path:
    """BasicSR model file and training state for ``step``; returns the model file."""
    params = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    params_ema = {k: v.detach().cpu() for k, v in ema.model.state_dict().items()}
    model_file = path / "models" / f"net_g_{step}.pth"
    state_file = path / "training_states" / f"{step}.state"
    for f in (model_file, state_file):
        f.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(model_file) as tmp:
        torch.save({"params": params, "params_ema": params_ema}, tmp)
    with atomic_path(state_file) as tmp:
        torch.save({"step": step, "config": dataclasses.asdict(cfg), "params": params, "params_ema": params_ema,
                    "optimizer": optimizer.state_dict(), "scheduler": sched.state_dict()}, tmp)
    return model_file


def latest_state(output: Path) -> Optional[Path]:
    states = sorted((output / "training_states").glob("*.state"), key=lambda p: int(p.stem))
    return states[-1] if states else None


def _truncate(log: Path, step: int) -> None:
    """Drop the lines of a ``step,...`` log past ``step`` (what an interrupted run logged after its last save)."""
    if log.is_file():
        lines = [line for line in log.read_text().splitlines() if int(line.split(",")[0]) <= step]
        log.write_text("".join(f"{line}\n" for line in lines))


def train(cfg: TrainConfig, resume: Optional[str] = None, stop_at: Optional[int] = None,
          show_progress: bool = True) -> Path:
    """Run (or resume) training; returns the last BasicSR model file written.

    ``resume``: a ``.state`` file, or ``"auto"`` for the newest one under
    ``cfg.output`` (a fresh start if there is none). ``stop_at``: save and stop
    after that step (a time-boxed job; resume later with ``resume="auto"``).
    """
    ranks = Ranks("nccl" if torch.cuda.is_available() else "gloo")
    try:
        return _train(cfg, resume, stop_at, show_progress, ranks)
    finally:
        ranks.close()


def _train(cfg: TrainConfig, resume: Optional[str], stop_at: Optional[int], show_progress: bool, ranks: Ranks) -> Path:
    from tqdm import tqdm

    if cfg.batch_size % ranks.world:
        raise ValueError(f"batch_size {cfg.batch_size} does not split over {ranks.world} processes")
    device = torch.device(f"cuda:{ranks.local_rank}" if torch.cuda.is_available() else "cpu")
    amp = {"auto": torch.bfloat16 if device.type == "cuda" else None, "fp32": None, "bf16": torch.bfloat16}[cfg.precision]
    output = Path(cfg.output)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = SIPL(SIPLConfig(**cfg.model)).to(device)
    ema = EMA(model, cfg.ema_decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    sched = scheduler(optimizer, cfg)
    start = 0
    state_file = latest_state(output) if resume == "auto" else (Path(resume) if resume else None)
    if state_file is not None:
        state = torch.load(state_file, map_location=device, weights_only=True)
        model.load_state_dict(state["params"])
        ema.model.load_state_dict(state["params_ema"])
        optimizer.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start = state["step"]
        if ranks.rank == 0:
            for log in ("loss.csv", "val.csv"):
                _truncate(output / log, start)
    net = model
    if ranks.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    data = training_data(cfg)
    mine = ranks.share(range(cfg.batch_size))
    last = None
    if ranks.rank == 0:
        output.mkdir(parents=True, exist_ok=True)
    end = cfg.iterations if stop_at is None else min(stop_at, cfg.iterations)
    bar = tqdm(range(start, end), initial=start, total=cfg.iterations, unit="it", dynamic_ncols=True,
               disable=not show_progress or ranks.rank != 0, desc="train")
    pending = []  # (step, loss on the device, lr) not yet written: no host sync per step
    for step in bar:
        lq, gt = data.batch(step, mine)
        loss = sipl_training_step(net, lq.to(device), gt.to(device), optimizer,
                                  grad_clip=cfg.grad_clip, autocast_dtype=amp)
        sched.step()
        ema.update(model)
        done = step + 1
        pending.append((done, loss, optimizer.param_groups[0]["lr"]))
        if not any(done % every == 0 for every in (cfg.log_every, cfg.val_every, cfg.save_every)) and done != end:
            continue
        losses = [v / ranks.world for v in ranks.total(torch.stack([p[1] for p in pending]))]
        if ranks.rank == 0:
            with open(output / "loss.csv", "a") as f:
                f.writelines(f"{s},{v:.9g},{lr:.6g}\n" for (s, _, lr), v in zip(pending, losses))
            bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{pending[-1][2]:.2e}")
        pending = []
        if ranks.rank == 0:
            if done % cfg.val_every == 0 or done == cfg.iterations:
                t0 = time.perf_counter()
                value = validate(ema.model, data, cfg, device)
                with open(output / "val.csv", "a") as f:
                    f.write(f"{done},{value:.4f}\n")
                bar.write(f"step {done}: validation PSNR {value:.2f} dB (EMA, {cfg.val_iterations} SIPL iteration(s), "
                          f"{time.perf_counter() - t0:.1f} s)")
            if done % cfg.save_every == 0 or done == end:
                last = save(output, done, model, ema, optimizer, sched, cfg)
    return last if last is not None else output / "models" / f"net_g_{end}.pth"
