"""Training data: clean photos with synthetic degradations, or paired folders.

A batch is a pure function of ``(seed, step, sample index)``: every sample
draws its image, crop, flip and degradation from its own generator. So a
resumed run sees exactly the data of an uninterrupted one, and ranks of a
distributed run, each taking its share of the sample indices, together see
exactly the global batch of a single process.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .degradations import degrade
from .images import is_image_path, read_image

#: Photos shipped with scikit-image kept out of training (the default model is tested on them).
HELD_OUT = ("astronaut", "coffee", "chelsea")
#: scikit-image's bundled photos used for training (gray ones are repeated to RGB).
BUNDLED = ("rocket", "immunohistochemistry", "hubble_deep_field", "retina", "motorcycle_left", "motorcycle_right",
           "brick", "camera", "clock", "coins", "grass", "gravel", "moon", "page", "text")


def _rgb(a: np.ndarray) -> torch.Tensor:
    """uint8 (H, W[, C]) -> float (3, H, W) in [0, 1]."""
    a = a[..., None] if a.ndim == 2 else a[..., :3]
    t = torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).float() / 255.0
    return t.expand(3, -1, -1).contiguous() if t.shape[0] == 1 else t


def image_tensor(path) -> torch.Tensor:
    """An image file as float (3, H, W) in [0, 1] (gray repeated to RGB, alpha dropped)."""
    t = torch.from_numpy(read_image(path).pixels).permute(2, 0, 1)
    return t.expand(3, -1, -1).contiguous() if t.shape[0] == 1 else t.contiguous()


def bundled_image(name: str) -> torch.Tensor:
    """A photo shipped inside scikit-image, as float (3, H, W) in [0, 1]; works offline."""
    import skimage.data

    if name.startswith("motorcycle_"):
        left, right, _ = skimage.data.stereo_motorcycle()
        return _rgb(left if name.endswith("left") else right)
    return _rgb(getattr(skimage.data, name)())


def clean_images(source: str) -> List[torch.Tensor]:
    """``"skimage"`` (the bundled photos minus the held-out ones) or a folder of clean images."""
    if source == "skimage":
        return [bundled_image(n) for n in BUNDLED]
    folder = Path(source)
    files = sorted(p for p in folder.iterdir() if is_image_path(p)) if folder.is_dir() else []
    if not files:
        raise ValueError(f"{source}: expected 'skimage' or a folder of clean images")
    return [image_tensor(p) for p in files]


def _generator(seed: int, step: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 10_007 + index)


def _crop_pair(images: Sequence[Tuple[torch.Tensor, torch.Tensor]], crop: int, g: torch.Generator):
    """A random aligned crop (with flips and a 90-degree turn) from a random (lq, gt) pair."""
    lq, gt = images[int(torch.randint(len(images), (1,), generator=g))]
    h, w = gt.shape[-2:]
    top = int(torch.randint(h - crop + 1, (1,), generator=g))
    left = int(torch.randint(w - crop + 1, (1,), generator=g))
    flips = torch.randint(2, (3,), generator=g).tolist()
    out = []
    for t in (lq, gt):
        t = t[..., top:top + crop, left:left + crop]
        t = t.flip(-1) if flips[0] else t
        t = t.flip(-2) if flips[1] else t
        out.append(t.transpose(-1, -2) if flips[2] else t)
    return out


class TrainingData:
    """Global batches of (lq, gt) crops; ``batch(step, indices)`` returns those samples of step ``step``.

    Synthetic: ``clean`` images and a list of degradation names (one drawn per
    sample). Paired: ``pairs`` of (lq, gt) images of equal size.
    """

    def __init__(self, crop: int, seed: int = 0, clean: Optional[List[torch.Tensor]] = None,
                 degradations: Sequence[str] = (), pairs: Optional[List[Tuple[torch.Tensor, torch.Tensor]]] = None):
        if (clean is None) == (pairs is None):
            raise ValueError("give either clean images with degradations, or (lq, gt) pairs")
        if clean is not None and not degradations:
            raise ValueError("synthetic training data needs at least one degradation")
        images = [(t, t) for t in clean] if clean is not None else pairs
        self.images = [p for p in images if min(p[1].shape[-2:]) >= crop]
        if not self.images:
            raise ValueError(f"no training image is at least {crop}x{crop}")
        for lq, gt in self.images:
            if lq.shape != gt.shape:
                raise ValueError(f"a training pair differs in size: {tuple(lq.shape)} vs {tuple(gt.shape)}")
        self.crop, self.seed, self.degradations, self.synthetic = crop, seed, list(degradations), clean is not None

    def sample(self, step: int, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        g = _generator(self.seed, step, index)
        lq, gt = _crop_pair(self.images, self.crop, g)
        if self.synthetic:
            name = self.degradations[int(torch.randint(len(self.degradations), (1,), generator=g))]
            lq = degrade(gt[None], name, g)[0]
        return lq, gt

    def batch(self, step: int, indices: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        samples = [self.sample(step, i) for i in indices]
        return torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])


def paired_images(lq_dir: str, gt_dir: str) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """(lq, gt) float (3, H, W) pairs from two folders, matched by file name without extension."""
    def load(d):
        folder = Path(d)
        if not folder.is_dir():
            raise ValueError(f"{d}: no such folder")
        return {p.stem: p for p in sorted(folder.iterdir()) if is_image_path(p)}

    lq, gt = load(lq_dir), load(gt_dir)
    missing = sorted(set(lq) ^ set(gt))
    if missing or not lq:
        raise ValueError(f"paired folders {lq_dir} and {gt_dir} do not match (unpaired: {missing[:5]})")
    return [(image_tensor(lq[n]), image_tensor(gt[n])) for n in sorted(lq)]
