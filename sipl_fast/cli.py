"""The ``sipl-fast`` command line: restore, eval, info, bench.

Every command reports a bad input in one line naming it (a traceback only with
``--debug``), carries on with the other inputs, and exits non-zero if anything
failed. ``restore`` and ``eval`` under ``torchrun`` shard their inputs across
the ranks (one GPU per rank) and report one summary.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import __version__
from .checkpoint import infer_config, load_default, load_model, read_state_dict, save_model
from .images import Image, ImageError, is_image_path, read_image, write_image
from .distributed import Ranks
from .engine import FastSIPL
from .loops import refinements
from .metrics import PROTOCOLS, psnr, psnr_ssim
from .tiling import tiled

OOM_TILES = (1024, 512, 256, 128)
EXTENSIONS = {"png": ".png", "jpg": ".jpg", "tif": ".tif", "webp": ".webp"}


class CLIError(Exception):
    """A user error that ends the command: one line, exit code 2."""


# --- running the model on one image -------------------------------------------------
def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CLIError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available here")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def pick_engine(name: str, device: torch.device) -> str:
    """--engine: auto is ``fast`` on a CPU (about 2x the published loop's speed there, less memory,
    no warm-up per image size) and ``reference`` on a GPU, where FastSIPL's first run of each
    image size measures its kernels and captures a CUDA graph (seconds), which pays off only
    over many images of one size."""
    if name == "auto":
        return "fast" if device.type == "cpu" else "reference"
    return name


PRECISION_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def precision_dtype(precision: str, device: torch.device) -> torch.dtype:
    """--precision as a dtype: auto is bf16 on GPUs that support it, else fp32."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return {name: dtype for dtype, name in PRECISION_NAMES.items()}[precision]


def precision_context(precision: str, device: torch.device):
    """Autocast for bf16/fp16 (the published code's reduced-precision mode), nothing for fp32."""
    dtype = precision_dtype(precision, device)
    return contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


def to_model(pixels: np.ndarray, channels: int, device) -> torch.Tensor:
    """(H, W, C) float -> (1, channels, H, W): gray is repeated to RGB, RGB becomes its luma for a gray model."""
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None]
    if x.shape[1] == 1 and channels == 3:
        x = x.expand(1, 3, -1, -1)
    elif x.shape[1] == 3 and channels == 1:
        x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return x.contiguous().to(device)


def from_model(y: torch.Tensor, channels: int) -> np.ndarray:
    """(1, C', H, W) -> (H, W, channels) float32: back to the input's channel count."""
    if y.shape[1] != channels:
        y = y.mean(1, keepdim=True) if channels == 1 else y.expand(1, channels, -1, -1)
    return y[0].permute(1, 2, 0).float().cpu().numpy()


def out_of_memory(error: BaseException) -> Optional[str]:
    """"GPU" or "CPU" where ``error`` is an allocation that did not fit, else None. PyTorch's
    CPU allocator raises a plain RuntimeError (a whole image's attention scores in the reference:
    tens of GiB for a photo of a few megapixels), known by its message."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return "GPU"
    if isinstance(error, RuntimeError) and "DefaultCPUAllocator" in str(error):
        return "CPU"
    return None


def restore_pixels(model, pixels: np.ndarray, iterations: Sequence[int], args, log=print,
                   fast: Optional[FastSIPL] = None) -> List[np.ndarray]:
    """Restore (H, W, C) pixels after each count in ``iterations``, from one loop (``refinements``),
    or with ``fast``, a FastSIPL of ``model`` (one count in ``iterations``; its own precision).

    Where an image does not fit in memory (GPU or CPU) retry in smaller tiles, saying so.
    ``args`` carries --precision, --tile and --tile-overlap.
    """
    device = next(model.parameters()).device
    x = to_model(pixels, model.config.inp_channels, device)

    def run(t: torch.Tensor) -> torch.Tensor:  # the asked-for results side by side on the channel axis
        if fast is not None:
            return fast(t, iterations[0])
        outs = list(refinements(model, t, max(iterations)))
        return torch.cat([outs[min(k, len(outs) - 1)] for k in iterations], dim=1)  # plain PromptIR: one pass

    tiles = [args.tile] if args.tile else [0, *(t for t in OOM_TILES if t < max(pixels.shape[:2]))]
    for i, tile in enumerate(tiles):
        try:
            with contextlib.nullcontext() if fast is not None else precision_context(args.precision, device):
                y = tiled(run, x, tile, min(args.tile_overlap, tile // 2)) if tile else run(x)
            return [from_model(part, pixels.shape[2]) for part in y.chunk(len(iterations), dim=1)]
        except RuntimeError as error:  # torch.cuda.OutOfMemoryError is one too
            memory = out_of_memory(error)
            if memory is None or i + 1 == len(tiles):
                raise
            if memory == "GPU":
                torch.cuda.empty_cache()
            log(f"out of {memory} memory at {pixels.shape[1]}x{pixels.shape[0]}: retrying in {tiles[i + 1]}-pixel tiles")
    raise AssertionError("unreachable")


def progress(items, ranks: Ranks, desc: str):
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="img", disable=ranks.rank != 0 or not items, dynamic_ncols=True)


def say(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"sipl-fast: {message}", file=sys.stderr)


def failure_message(path, error: Exception, debug: bool) -> str:
    if debug:
        traceback.print_exception(error)
    if isinstance(error, ImageError):
        return str(error)
    memory = out_of_memory(error)
    if memory:
        return f"{path}: out of {memory} memory even in tiles"
    return f"{path}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


# --- restore ------------------------------------------------------------------------
def collect_inputs(source: Path) -> Tuple[List[Path], int]:
    """Image files of a file or folder (sorted) and how many non-image files were left out."""
    if source.is_file():
        return [source], 0
    if not source.is_dir():
        raise CLIError(f"-i {source}: no such file or folder")
    files = sorted(p for p in source.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if is_image_path(p)]
    return images, len(files) - len(images)


def plan_outputs(inputs: List[Path], out_dir: Path, suffix: str, ext: str) -> List[Tuple[Path, Path, Optional[str]]]:
    """(input, output, problem or None) for each input: no output may overwrite an input or another output."""
    plan, taken = [], {}
    sources = {p.resolve() for p in inputs}
    for src in inputs:
        dst = out_dir / f"{src.stem}{suffix}{src.suffix.lower() if ext == 'auto' else EXTENSIONS[ext]}"
        problem = None
        if dst.resolve() in sources:
            problem = f"{src}: output {dst} would overwrite an input; choose another -o or --suffix"
        elif dst in taken:
            problem = f"{src}: output {dst} is also the output of {taken[dst]}; use --ext auto or rename"
        taken.setdefault(dst, src)
        plan.append((src, dst, problem))
    return plan


def cmd_restore(args) -> int:
    ranks = Ranks()
    try:
        device = pick_device(args.device, ranks.local_rank)
        model = load_model(args.weights, device=device)
        engine, dtype = pick_engine(args.engine, device), precision_dtype(args.precision, device)
        fast = FastSIPL(model, dtype=dtype) if engine == "fast" else None
        inputs, ignored = collect_inputs(Path(args.input))
        out_dir = Path(args.output)
        out_dir.mkdir(parents=True, exist_ok=True)
        plan = plan_outputs(inputs, out_dir, args.suffix, args.ext)
        if ignored and ranks.rank == 0:
            say(f"{args.input}: left out {ignored} file(s) that are not images ({', '.join(sorted(set(EXTENSIONS)))}, ...)")
        done = skipped = failed = 0
        start = time.perf_counter()
        for src, dst, problem in progress(ranks.share(plan), ranks, "restore"):
            if problem:
                say(problem)
                failed += 1
                continue
            if args.skip_existing and dst.exists():
                skipped += 1
                continue
            try:
                image = read_image(src)
                [pixels] = restore_pixels(model, image.pixels, [args.iterations], args, log=say, fast=fast)
                write_image(dst, Image(pixels, image.alpha, image.bit_depth))
                done += 1
            except Exception as e:  # one bad image must not stop the others
                say(failure_message(src, e, args.debug))
                failed += 1
        done, skipped, failed, seconds = ranks.total([done, skipped, failed, time.perf_counter() - start])
        if ranks.rank == 0:
            rate = done / (seconds / ranks.world) if seconds > 0 else 0.0
            print(f"restored {int(done)}, skipped {int(skipped)}, failed {int(failed)} "
                  f"({rate:.2f} images/s on {ranks.world} process{'es' if ranks.world > 1 else ''}; {engine} engine, "
                  f"{PRECISION_NAMES[dtype]} on {device.type}) -> {out_dir}")
        return 1 if failed else 0
    finally:
        ranks.close()


# --- eval ---------------------------------------------------------------------------
def match_pairs(lq_dir: Path, gt_dir: Path) -> List[Tuple[str, Path, Path]]:
    """(name, lq, gt) matched by file name without extension; unmatched files are an error."""
    def images(d: Path):
        if not d.is_dir():
            raise CLIError(f"{d}: no such folder")
        return {p.stem: p for p in sorted(d.iterdir()) if p.is_file() and is_image_path(p)}

    lq, gt = images(lq_dir), images(gt_dir)
    lonely = [f"{lq[n].name} (no match in {gt_dir})" for n in sorted(set(lq) - set(gt))]
    lonely += [f"{gt[n].name} (no match in {lq_dir})" for n in sorted(set(gt) - set(lq))]
    if lonely:
        raise CLIError(f"unmatched images: {', '.join(lonely[:8])}{' ...' if len(lonely) > 8 else ''}")
    if not lq:
        raise CLIError(f"no images in {lq_dir}")
    return [(n, lq[n], gt[n]) for n in sorted(lq)]


def cmd_eval(args) -> int:
    try:
        iterations = sorted({int(v) for v in args.iterations.split(",")})
        if any(i < 0 for i in iterations):
            raise ValueError
    except ValueError:
        raise CLIError(f"--iterations {args.iterations!r}: expected integers >= 0 like 0,1,2") from None
    ranks = Ranks()
    try:
        model = load_model(args.weights, device=pick_device(args.device, ranks.local_rank))
        pairs = match_pairs(Path(args.lq), Path(args.gt))
        rows, failed = [], 0
        for name, lq_path, gt_path in progress(ranks.share(pairs), ranks, "eval"):
            try:
                lq, gt = read_image(lq_path), read_image(gt_path)
                row = {"image": name}
                for k, out in zip(iterations, restore_pixels(model, lq.pixels, iterations, args, log=say)):
                    row[f"psnr@{k}"], row[f"ssim@{k}"] = psnr_ssim(out, gt.pixels, args.protocol, args.crop_border)
                rows.append(row)
            except Exception as e:
                say(failure_message(lq_path, e, args.debug))
                failed += 1
        rows = sorted(ranks.gather(rows), key=lambda r: r["image"])
        failed = int(ranks.total([failed])[0])
        if ranks.rank == 0:
            print_eval(rows, iterations, args)
        return 1 if failed or not rows else 0
    finally:
        ranks.close()


def print_eval(rows: List[dict], iterations: List[int], args) -> None:
    columns = [c for k in iterations for c in (f"psnr@{k}", f"ssim@{k}")]
    if rows:
        rows = rows + [{"image": "average", **{c: float(np.mean([r[c] for r in rows])) for c in columns}}]
    width = max([len(r["image"]) for r in rows] + [7])
    print(f"{'image':<{width}}  " + "  ".join(f"{c:>9}" for c in columns))
    for r in rows:
        print(f"{r['image']:<{width}}  " + "  ".join(f"{r[c]:9.4f}" for c in columns))
    print(f"protocol {args.protocol}, crop border {args.crop_border}; @k = after k SIPL iterations (0: dictionary-only pass)")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["image", *columns])
            writer.writeheader()
            writer.writerows(rows)


# --- info, bench ----------------------------------------------------------------------
def cmd_info(args) -> int:
    sd, fmt = read_state_dict(args.path, weights_only=not args.trust)
    config = infer_config(sd)
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in sd.values()})
    print(f"file:          {args.path} ({Path(args.path).stat().st_size / 2**20:.1f} MiB)")
    print(f"format:        {fmt}")
    print(f"model:         {'SIPL (PromptIR + Proxy Fusion)' if config.proxy_fusion else 'plain PromptIR (no Proxy Fusion)'}")
    print(f"parameters:    {sum(v.numel() for v in sd.values()):,} in {len(sd)} tensors ({', '.join(dtypes)})")
    for key, value in config.to_dict().items():
        print(f"  {key + ':':<24}{value}")
    return 0


#: Benchmarks that ``bench`` leaves out: compilers' reports (minutes of compiling Triton kernels
#: even with ``--quick``; nvcc's), nothing timed on the device (run them directly).
_NOT_IN_BENCH = {"fast_sipl_compile.py", "kernel_resources.py", "cuda_sass.py"}


def cmd_bench(args) -> int:
    folder = Path(__file__).resolve().parent.parent / "benchmarks"
    scripts = sorted(p for p in folder.glob("*.py")
                     if not p.name.startswith("_") and p.name not in _NOT_IN_BENCH) if folder.is_dir() else []
    if not scripts:
        raise CLIError("the benchmarks ship with the source tree: run from a checkout (pip install -e .)")
    if args.only:
        names = [n.strip().removesuffix(".py") for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(names) - {p.stem for p in scripts})
        if unknown or not names:
            raise CLIError(f"--only {args.only!r}: expected a comma list of {', '.join(p.stem for p in scripts)}")
        scripts = [p for p in scripts if p.stem in names]
    status = 0
    for script in scripts:
        print(f"== {script.name}", flush=True)
        status |= subprocess.call([sys.executable, str(script), *(["--quick"] if args.quick else [])])
    return 1 if status else 0


# --- train, export, demo -------------------------------------------------------------
def _setting(text: str) -> Tuple[List[str], object]:
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise CLIError(f"--set {text!r}: expected KEY=VALUE, e.g. model.dim=16 or iterations=2000")
    return key.split("."), yaml.safe_load(value)


def cmd_train(args) -> int:
    import yaml

    from .train import TrainConfig, train

    values = {}
    if args.config:
        with open(args.config) as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            raise CLIError(f"{args.config}: expected a mapping of training settings")
    for flag in ("output", "iterations", "batch_size", "lr", "crop", "images", "lq", "gt", "seed"):
        if getattr(args, flag) is not None:
            values[flag] = getattr(args, flag)
    if args.degradations:
        values["degradations"] = args.degradations.split(",")
    for text in args.set or []:
        keys, value = _setting(text)
        target = values
        for key in keys[:-1]:
            target = target.setdefault(key, {})
        target[keys[-1]] = value
    last = train(TrainConfig.from_dict(values), resume=args.resume, stop_at=args.stop_at)
    print(f"last checkpoint: {last}")
    return 0


def cmd_export(args) -> int:
    model = load_model(args.source, weights_only=not args.trust)
    path = save_model(model, args.destination, dtype=torch.float16 if args.half else None)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0


def demo_image(name: str, size: int) -> torch.Tensor:
    """A held-out bundled photo, (1, 3, H, W) in [0, 1], its long side scaled to ``size``."""
    from .data import bundled_image

    img = bundled_image(name)[None]
    scale = size / max(img.shape[-2:])
    if scale < 1:
        hw = [max(8, round(s * scale)) for s in img.shape[-2:]]
        img = torch.nn.functional.interpolate(img, size=hw, mode="area")
    return img


def cmd_demo(args) -> int:
    from .data import HELD_OUT
    from .degradations import DEGRADATIONS, degrade

    device = pick_device(args.device)
    model = load_model(args.weights, device=device) if args.weights else load_default(device)
    names = list(DEGRADATIONS) if args.degradation == "all" else [args.degradation]
    images = list(HELD_OUT) if args.degradation == "all" else [args.image]
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"{'image':<10} {'degradation':<12} {'input':>7} {'dict':>7} " + " ".join(f"{'SIPL-' + str(k):>7}" for k in range(1, args.iterations + 1)) + "   seconds  (PSNR dB)")
    table = {}
    for name in names:
        for image in images:
            gt = demo_image(image, args.size)
            lq = degrade(gt, name, torch.Generator().manual_seed(args.seed))
            start = time.perf_counter()
            outs = [o.float().cpu() for o in refinements(model, lq.to(device), args.iterations)]
            seconds = time.perf_counter() - start
            scores = [psnr(t[0].permute(1, 2, 0).numpy(), gt[0].permute(1, 2, 0).numpy()) for t in [lq, *outs]]
            table.setdefault(name, []).append(scores)
            print(f"{image:<10} {name:<12} " + " ".join(f"{v:7.2f}" for v in scores) + f"   {seconds:7.1f}")
            if args.degradation != "all":
                panel = torch.cat([lq, outs[0], outs[-1]], dim=-1)[0].permute(1, 2, 0).numpy()
                path = out_dir / f"sipl_demo_{image}_{name}.png"
                write_image(path, Image(panel, None, 8))
                print(f"wrote {path} (input | dictionary-only | SIPL, {args.iterations} iteration{'s' * (args.iterations != 1)})")
    if args.degradation == "all":
        print("average over " + ", ".join(images) + ":")
        for name, rows in table.items():
            print(f"{'':<10} {name:<12} " + " ".join(f"{v:7.2f}" for v in np.mean(rows, axis=0)))
    return 0


# --- argument parsing -------------------------------------------------------------------
def _pixels(text: str) -> int:
    """A count of pixels (``--tile``, ``--tile-overlap``): an integer >= 0, else argparse's usage error."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number of pixels >= 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    parser = argparse.ArgumentParser(prog="sipl-fast", parents=[common],
                                     description="SIPL / PromptIR image restoration.")
    parser.add_argument("--version", action="version", version=f"sipl-fast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def model_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--weights", required=True, metavar="PATH", help="checkpoint: .pth/.pt/.ckpt (BasicSR, PromptIR) or .safetensors")
        p.add_argument("--precision", choices=["auto", *PRECISION_NAMES.values()], default="auto",
                       help="auto: bf16 autocast on GPUs that support it, else fp32 (default auto)")
        p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
        p.add_argument("--tile", type=_pixels, default=0, metavar="N",
                       help="restore in N x N tiles (approximate: the attention is global); default whole images, "
                            "falling back to tiles where an image does not fit in memory")
        p.add_argument("--tile-overlap", type=_pixels, default=32, metavar="N", help="pixels shared by neighbouring tiles (default 32)")

    r = sub.add_parser("restore", parents=[common], help="restore an image or a folder of images",
                       description="Restore images with the SIPL loop and write them to a folder.",
                       epilog="example: sipl-fast restore -i photos/ -o restored/ --weights sipl.pth")
    r.add_argument("-i", "--input", required=True, metavar="FILE_OR_DIR", help="an image, or a folder of images (not recursive)")
    r.add_argument("-o", "--output", required=True, metavar="DIR", help="output folder (created if missing)")
    model_options(r)
    r.add_argument("--iterations", type=int, default=2, help="SIPL iterations; 0 = one dictionary-only pass (default 2)")
    r.add_argument("--engine", choices=["auto", "reference", "fast"], default="auto",
                   help="reference: the published loop; fast: sipl_fast.FastSIPL (encoder reuse, fused kernels, "
                        "CUDA graphs; the same results to float rounding; on a GPU each new image size first "
                        "costs seconds of kernel measuring and graph capture); auto: fast on a CPU, reference "
                        "on a GPU (default auto)")
    r.add_argument("--suffix", default="_sipl", help="added to output file names (default _sipl)")
    r.add_argument("--ext", choices=["auto", *EXTENSIONS], default="auto", help="output format; auto keeps the input's (default)")
    r.add_argument("--skip-existing", action="store_true", help="leave images whose output exists")
    r.set_defaults(func=cmd_restore)

    e = sub.add_parser("eval", parents=[common], help="PSNR/SSIM on paired folders, per SIPL iteration count",
                       description="Score restorations of --lq against --gt (pairs matched by file name).",
                       epilog="example: sipl-fast eval --weights sipl.pth --lq test/noisy25 --gt test/clean --iterations 0,1,2")
    model_options(e)
    e.add_argument("--lq", required=True, metavar="DIR", help="degraded images")
    e.add_argument("--gt", required=True, metavar="DIR", help="ground-truth images, same file names")
    e.add_argument("--iterations", default="0,1,2", help="comma-separated iteration counts to score (default 0,1,2)")
    e.add_argument("--protocol", choices=PROTOCOLS, default="promptir",
                   help="promptir: RGB, 7x7 SSIM (PromptIR/SIPL scripts); basicsr-y: Y channel, 11x11 Gaussian SSIM")
    e.add_argument("--crop-border", type=int, default=0, metavar="N", help="pixels cropped from each side before scoring")
    e.add_argument("--csv", metavar="FILE", help="also write the table as CSV")
    e.set_defaults(func=cmd_eval)

    i = sub.add_parser("info", parents=[common], help="describe a checkpoint", description="Format, configuration and size of a checkpoint.")
    i.add_argument("path", metavar="PATH")
    i.add_argument("--trust", action="store_true", help="allow pickled objects (only for files you trust)")
    i.set_defaults(func=cmd_info)

    t = sub.add_parser("train", parents=[common], help="train a SIPL model (torchrun for several GPUs)",
                       description="Train with the SIPL recipe: privileged features from the ground truth, EMA, "
                                   "warm-up + cosine schedule. Settings come from --config, then the flags, then --set.",
                       epilog="example: sipl-fast train --config sipl_fast/weights/default.yaml --set iterations=2000")
    t.add_argument("--config", metavar="FILE.yaml", help="training settings (see sipl_fast/train.py TrainConfig)")
    t.add_argument("--output", help="run folder: models/, training_states/, loss.csv, val.csv")
    t.add_argument("--iterations", type=int, help="total optimiser steps")
    t.add_argument("--batch-size", type=int, help="global batch (split across torchrun processes)")
    t.add_argument("--lr", type=float, help="peak learning rate (default 2e-4)")
    t.add_argument("--crop", type=int, help="training crop size (default 128)")
    t.add_argument("--images", help="clean images for synthetic degradations: skimage (bundled photos) or a folder")
    t.add_argument("--degradations", help="comma-separated: noise15,noise25,noise50,haze,lowlight,blur,rain")
    t.add_argument("--lq", metavar="DIR", help="paired training: degraded images (with --gt)")
    t.add_argument("--gt", metavar="DIR", help="paired training: clean images, same file names")
    t.add_argument("--seed", type=int)
    t.add_argument("--resume", metavar="STATE|auto", help="continue from a training_states/N.state file, or the newest")
    t.add_argument("--stop-at", type=int, metavar="N", help="save and stop after step N (resume later)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="any setting, e.g. model.dim=16 (repeatable)")
    t.set_defaults(func=cmd_train)

    x = sub.add_parser("export", parents=[common], help="write a checkpoint's weights (EMA preferred) as safetensors or .pth",
                       description="Convert a checkpoint (BasicSR, PromptIR, safetensors) to .safetensors or BasicSR .pth.",
                       epilog="example: sipl-fast export runs/sipl/models/net_g_300000.pth sipl.safetensors --half")
    x.add_argument("source", metavar="SRC")
    x.add_argument("destination", metavar="DST")
    x.add_argument("--half", action="store_true", help="store fp16 tensors (half the size)")
    x.add_argument("--trust", action="store_true", help="allow pickled objects (only for files you trust)")
    x.set_defaults(func=cmd_export)

    d = sub.add_parser("demo", parents=[common], help="degrade a held-out photo, restore it, show PSNR per pass",
                       description="Offline demo with the bundled model: degrade a held-out scikit-image photo, restore "
                                   "it, print PSNR after the dictionary-only pass and each SIPL iteration, and write "
                                   "a side-by-side PNG (input | dictionary-only | SIPL).",
                       epilog="example: sipl-fast demo --degradation haze -o demo/")
    d.add_argument("--degradation", default="noise25", choices=["all", "noise15", "noise25", "noise50", "haze", "lowlight", "blur", "rain"],
                   help="all: a PSNR table over the three held-out photos, no images written (default noise25)")
    d.add_argument("--image", default="astronaut", choices=["astronaut", "coffee", "chelsea"], help="held-out photo (default astronaut)")
    d.add_argument("--size", type=int, default=256, help="scale the photo's long side down to this (default 256)")
    d.add_argument("--iterations", type=int, default=1,
                   help="SIPL iterations (default 1: the bundled model's best; a second one hurts it, see README)")
    d.add_argument("-o", "--output", default=".", metavar="DIR", help="where the PNG goes (default .)")
    d.add_argument("--weights", metavar="PATH", help="another checkpoint instead of the bundled model")
    d.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    d.add_argument("--seed", type=int, default=0, help="seed of the degradation (default 0)")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", parents=[common], help="run the benchmark suite and print its tables",
                       description="Run every script in benchmarks/ (kernels, end to end) but "
                                   "fast_sipl_compile.py, kernel_resources.py and cuda_sass.py (compilers' "
                                   "reports; run them directly).")
    b.add_argument("--quick", action="store_true", help="small shapes, a quick look")
    b.add_argument("--only", metavar="NAMES", help="a comma list of scripts to run (e.g. cosine_attention,fast_sipl)")
    b.set_defaults(func=cmd_bench)
    return parser


def run(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("sipl-fast: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one clear line; the traceback only with --debug
        if args.debug:
            raise
        what = "" if isinstance(e, (CLIError, ValueError, OSError)) else f"{type(e).__name__}: "
        print(f"sipl-fast {args.command}: error: {what}{e}", file=sys.stderr)
        return 2


def main() -> None:
    sys.exit(run())
