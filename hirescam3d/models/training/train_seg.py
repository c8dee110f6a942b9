"""Train the shipped segmentation demo ``demo_seg``: a 3D MONAI UNet on chest CT phantoms.

One stage (2-core CPU; seeded and reproducible)::

    python -m hirescam3d.models.training.train_seg --out hirescam3d/bundles/demo_seg

It trains, writes the bundle, then chooses the bundle's mask post-processing (per-class
probability thresholds, smallest kept component) on 60 validation phantoms, the seeds
right after the training's (:mod:`hirescam3d.models.training.tune_seg_masks`; about 2
more minutes). The shipped weights (v13) come from five such stages in a row, run by one
command (:mod:`hirescam3d.models.training.seg_recipe`): this command's defaults from
scratch (v8), then four fine-tunes of 500 steps with the terms against confusions below.

The network segments the three organs the findings live in and the five findings, one
sigmoid channel each (multi-label: a voxel can be heart and cardiomegaly at once), on
the demo model's input grid (96 x 128 x 128 voxels of 3 x 2.5 x 2.5 mm, HU window -400
to 200). Phantoms come at that grid, so preprocessing reduces to the window scaling.

Measured on the quiet 2-core development machine: 25.5 min wall time to the written
bundle (1.3 min of phantom generation, 1,400 steps of one volume at about 1.03 s each),
then 1.8 min choosing the post-processing; writes a 7 MB bundle. Quality on held-out
phantoms: ``benchmarks/seg_quality.py`` and ``docs/segmentation.md``.

Training phantoms use seeds ``SEG_SEED0 + i``; the quality benchmark
(``benchmarks/seg_quality.py``) uses held-out seeds below 100000, which training never
sees. Phantoms are made once, before training (CT as int16 HU, the 8 label channels
packed into the bits of one uint8 per voxel), and drawn in a seeded order.

Loss: binary cross-entropy (positive voxels of the nodule and pericardial-effusion
channels weighted 5 and 2), plus 0.2 x the mean BCE over each channel's positive voxels
(``--pos-mean``: small findings count as much as large ones), plus soft Dice over each
channel (MONAI ``DiceLoss`` with ``batch=True``); AdamW with linear warm-up and a cosine
schedule over ``--steps``. Against confusions, off by default and used by the fine-tunes:
``--exclusive`` weights the mean BCE of each lung finding over the voxels of the other
two (:data:`EXCLUSIVE`: atelectasis, pleural effusion and the nodule never share a voxel;
without it, atelectasis was called on every pleural effusion), and ``--hard-neg`` the
mean BCE of the ``--hard-k`` worst negatives of the ``--hard-channels``. An optional
volume-level term (``--presence``, off) was tried against stray predicted voxels: at
weight 1 (nodule weight 10) it emptied every finding channel. A ``--max-minutes`` guard
stops early on a slow machine (the bundle then records ``steps_completed``); the weights
reproduce from the seed only for a run that completes.

Earlier versions: v3 (shipped before v8) is this command with ``--steps 800 --n-train
800 --pos-mean 0``. Tried after v3 and not shipped (v4): 300 steps of fine-tuning the v3
weights on 64 x 96 x 96 patches centred by MONAI's ``RandCropByLabelClassesd`` (``--init``,
``--crop 64 96 96 --crop-ratios 1 0.5 0.5 0.5 1 1 1 4 2``, nodule BCE weight 10, lr 5e-4;
24 min on the shared machine). On the validation seeds its organ Dice at sigmoid >= 0.5
fell (right lung 0.85, heart 0.77, against 0.98 and 0.94) and it still found no nodule
(the chosen post-processing again called none), so v3 stayed.

Also tried and not shipped (held-out seeds 0..99, ``benchmarks/seg_quality.py``):

- v5: 400 steps from v3 on whole volumes with ``--pos-mean 0.2 --lr 5e-4`` (14 min on
  the shared machine). The nodule channel now fires on nodules (mean probability 0.69-0.79
  inside them on seeds 1, 4 and 7, against under 0.01 for v3) but also on blobs of
  1,000-4,000 voxels elsewhere in the lungs; the post-processing then keeps almost none
  (held-out nodule Dice 0.0, pericardial effusion 0.10, pleural effusion 0.60,
  atelectasis 0.80 with 44 % absent calls; organs 0.984/0.945/0.975).
- v6: 300 more steps from v5 with ``--pos-mean 0.2 --hard-neg 0.5 --hard-k 2000 --lr
  3e-4``: the hard negatives removed the blobs and most true findings with them (organs
  0.958/0.896/0.943; finding Dice 0.00-0.37, nodule 0.07).
- v7: 300 steps from v5 with hard negatives on the finding channels only (a local variant
  of this script): finding Dice 0.37/0.66/0.77/0.06/0.17, pleural effusion called on
  23.8 % of the phantoms without one.

v8 trains from scratch with ``--pos-mean 0.2`` for 1,400 steps (shipped before v13):
held-out organ Dice 0.989/0.961/0.982, finding Dice 0.82/0.66/0.96/0.40/0.30 (atelectasis,
pleural effusion, cardiomegaly, nodule, pericardial effusion); it called atelectasis on
44 % and a nodule on 28 % of the phantoms without one. Of the first 30 validation
phantoms, 18 lacked atelectasis; at sigmoid >= 0.8, 6 of them had atelectasis components
of thousands of voxels (the largest 3,200-6,200), all on the phantom's pleural fluid, and
4 had 11-31 voxels. Its false nodules were components of up to 340 voxels at mid height
(slices 43-55 of 96).

Fine-tunes of v8 (500 steps each, lr 5e-4, ``--hard-neg 0.2 --hard-k 300``; 10-14 min
each on the 2-core machine), each from the one before; a stage was kept while the mean
validation score of the tuning (seeds 201400-201459) rose:

- v9 (not kept): ``--exclusive 1.0``, hard negatives on the nodule: held-out atelectasis
  and pleural-effusion Dice fell to 0.00 and 0.10 (both channels went quiet).
- v10: ``--exclusive 0.2``, nodule. v11: ``--exclusive 0.4``, nodule. v12 and v13:
  ``--exclusive 0.4``, nodule and pericardial effusion. v13 is shipped; the numbers are in
  ``docs/segmentation.md``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hirescam3d.models.training.seg_data import SEG_SEED0, pack, seg_targets, unpack
from hirescam3d.models.training.train_demo import cosine_schedule, log
from hirescam3d.models.training.tune_seg_masks import tune, write
from hirescam3d.models.zoo import SEG_CHANNELS, SEG_UNET

COMMAND = "python -m hirescam3d.models.training.train_seg"
# Findings that never share a voxel in the phantom: effusion first, atelectasis above its
# level, the nodule away from both (hirescam3d.data.phantom._paint_findings).
EXCLUSIVE = ("atelectasis", "pleural_effusion", "nodule")


def _phantom(seed: int) -> tuple[np.ndarray, np.ndarray]:
    from hirescam3d.data.phantom import make_chest_ct

    p = make_chest_ct(seed)
    return p.ct, pack(seg_targets(p.organs, p.organ_names, p.findings))


def make_dataset(seeds: list[int], workers: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """int16 HU ``(N, S, H, W)`` and packed labels uint8 ``(N, S, H, W)`` for ``seeds``."""
    if min(seeds) < 100_000:
        raise ValueError("training seeds must be >= 100000 (seeds below are held out)")
    pool = mp.get_context("fork").Pool(workers) if workers > 1 else None
    cts = labels = None
    try:
        made = pool.imap(_phantom, seeds, chunksize=4) if pool else map(_phantom, seeds)
        for i, (ct, lab) in enumerate(made):
            if cts is None:  # filled in place: the dataset is held once
                cts = np.empty((len(seeds), *ct.shape), ct.dtype)
                labels = np.empty((len(seeds), *lab.shape), lab.dtype)
            cts[i], labels[i] = ct, lab
    finally:
        if pool:
            pool.close()
            pool.join()
    return cts, labels


def train(
    network: nn.Module,
    cts: np.ndarray,
    labels: np.ndarray,
    window: tuple[float, float],
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    deadline: float | None = None,
    pos_weights: list[float] | None = None,
    presence: float = 0.0,
    top_k: int = 8,
    crop: tuple[int, int, int] | None = None,
    crop_ratios: list[float] | None = None,
    pos_mean: float = 0.0,
    hard_neg: float = 0.0,
    hard_k: int = 2000,
    exclusive: float = 0.0,
    hard_channels: list[str] | None = None,
) -> tuple[list[float], int]:
    """Train in place; returns the mean loss of each block of 50 steps and the number of
    steps done (fewer than ``steps`` when ``deadline``, a ``time.time()`` value, passed).

    ``pos_weights``: per channel, the BCE weight of its positive voxels (small findings
    are a few voxels of a volume). ``presence`` weights a volume-level term: per channel,
    BCE of the mean of its ``top_k`` largest logits against whether the channel is present,
    which penalises the few stray voxels a voxel-wise loss barely notices (a finding
    predicted where it is absent).

    ``crop``: train on patches of this size instead of whole volumes, centred by MONAI's
    ``RandCropByLabelClassesd`` on a voxel of a class drawn with ``crop_ratios`` (one
    weight for the unlabelled background, then one per channel; a class absent from the
    volume is skipped), so small findings are seen far more often than their share of
    voxels.

    ``pos_mean`` weights a class-balanced term: per channel, the mean BCE over its positive
    voxels alone, so a 30-voxel nodule weighs as much as a lung. ``hard_neg`` weights its
    counterpart on false positives: per channel, the mean BCE of the ``hard_k`` negative
    voxels with the largest loss (:func:`hard_negative_bce`), on the channels named in
    ``hard_channels`` (None: all). ``exclusive`` weights :func:`exclusive_bce` over the
    findings of :data:`EXCLUSIVE`, which never share a voxel."""
    from monai.losses import DiceLoss

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    network.train()
    opt = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=weight_decay)
    sched = cosine_schedule(opt, steps)
    dice = DiceLoss(sigmoid=True, batch=True)
    cropper = None if crop is None else _label_cropper(crop, crop_ratios, seed)
    weight = None
    if pos_weights is not None:
        weight = torch.tensor(pos_weights, dtype=torch.float32).view(-1, *[1] * (cts.ndim - 1))
    hard = None if hard_channels is None else [SEG_CHANNELS.index(c) for c in hard_channels]
    loss_fn = SegLoss(dice, weight, pos_mean, presence, top_k, hard_neg, hard_k, exclusive, hard)
    passes = steps * batch_size // len(cts) + 1
    order = np.concatenate([rng.permutation(len(cts)) for _ in range(passes)])
    batch_indices = [np.sort(order[s * batch_size : (s + 1) * batch_size]) for s in range(steps)]
    batches = _batches(cts, labels, batch_indices, window, cropper)
    history, done = _optimise(network, batches, loss_fn, opt, sched, steps, deadline)
    network.eval()
    return history, done


@dataclass(frozen=True)
class SegLoss:
    """The loss of one batch (see :func:`train`): BCE-with-logits, positive voxels weighted
    per channel by ``pos_weight`` (``(C, 1, 1, 1)``; None: 1), plus soft ``dice``, plus
    ``pos_mean`` x :func:`positive_mean_bce` and ``presence`` x the BCE of the mean of each
    channel's ``top_k`` largest logits against whether the channel is present, plus
    ``hard_neg`` x :func:`hard_negative_bce` over ``hard_k`` voxels."""

    dice: nn.Module
    pos_weight: torch.Tensor | None
    pos_mean: float = 0.0
    presence: float = 0.0
    top_k: int = 8
    hard_neg: float = 0.0
    hard_k: int = 2000
    exclusive: float = 0.0
    hard_channels: list[int] | None = None

    def __call__(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss of ``logits`` against the targets ``y``, both ``(B, C, *S)``."""
        bce = nn.functional.binary_cross_entropy_with_logits
        loss = bce(logits, y, pos_weight=self.pos_weight)
        loss = loss + self.dice(logits, y)
        if self.pos_mean > 0:
            loss = loss + self.pos_mean * positive_mean_bce(logits, y)
        if self.hard_neg > 0:
            pick = slice(None) if self.hard_channels is None else self.hard_channels
            loss = loss + self.hard_neg * hard_negative_bce(
                logits[:, pick], y[:, pick], self.hard_k
            )
        if self.exclusive > 0:
            loss = loss + self.exclusive * exclusive_bce(logits, y)
        if self.presence > 0:
            peak = logits.flatten(2).topk(self.top_k, dim=2).values.mean(2)  # (B, C)
            loss = loss + self.presence * bce(peak, y.flatten(2).amax(2))
        return loss


def _label_cropper(crop: tuple[int, int, int], ratios: list[float] | None, seed: int) -> Any:
    """MONAI's ``RandCropByLabelClassesd`` for :func:`crop_batch`, seeded: patches of
    ``crop`` voxels centred on a voxel of a class drawn with ``ratios`` (background first)."""
    from monai.transforms import RandCropByLabelClassesd

    cropper = RandCropByLabelClassesd(
        ["image", "label"], "label", crop, ratios=ratios,
        num_classes=len(SEG_CHANNELS) + 1, warn=False,
    )  # fmt: skip
    cropper.set_random_state(seed)
    return cropper


def _batches(
    cts: np.ndarray,
    labels: np.ndarray,
    batch_indices: Sequence[np.ndarray],
    window: tuple[float, float],
    cropper: Any,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One batch per index array, made when asked for: the windowed CT ``(B, 1, *S)`` and
    the unpacked targets ``(B, C, *S)``, cut to one patch each by ``cropper`` if given."""
    from hirescam3d.models.bundle import apply_window

    for idx in batch_indices:
        x = apply_window(cts[idx], window).unsqueeze(1)
        y = unpack(torch.from_numpy(labels[idx]))
        if cropper is not None:
            x, y = crop_batch(cropper, x, y)
        yield x, y


def _optimise(
    network: nn.Module,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: SegLoss,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    steps: int,
    deadline: float | None,
) -> tuple[list[float], int]:
    """One optimiser step per batch: the mean loss of each block of 50 steps and the number
    of steps done (the loop stops early once ``deadline``, a ``time.time()`` value, passed)."""
    history, total = [], 0.0
    start = time.time()
    done = 0
    for step, (x, y) in enumerate(batches):
        loss = loss_fn(network(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total += loss.item()
        done = step + 1
        if (step + 1) % 50 == 0:
            history.append(total / 50)
            total = 0.0
            log(f"step {step + 1}/{steps} loss {history[-1]:.4f} ({time.time() - start:.0f} s)")
        if deadline is not None and time.time() > deadline:
            log(f"deadline reached: stopping after step {step + 1}")
            break
    return history, done


def _bce_over(logits: torch.Tensor, y: torch.Tensor, voxels: torch.Tensor) -> torch.Tensor:
    """Mean over the channels with any of ``voxels`` in the batch of the mean BCE over those
    voxels; all three ``(B, C, *S)``."""
    bce = nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
    dims = [0, *range(2, y.ndim)]
    count = voxels.sum(dims)
    per_channel = (bce * voxels).sum(dims) / count.clamp(min=1)
    present = count > 0
    return per_channel[present].mean() if present.any() else logits.sum() * 0


def positive_mean_bce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over channels with positives in the batch of the mean BCE of their positive
    voxels; ``logits``, ``y``: ``(B, C, *S)``."""
    return _bce_over(logits, y, y)


def exclusive_bce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over the :data:`EXCLUSIVE` channels of the mean BCE over the voxels that belong
    to another of them (``logits``, ``y``: ``(B, C, *S)``): the confusions a voxel mean
    over the whole volume barely notices, such as atelectasis called on pleural fluid."""
    idx = [SEG_CHANNELS.index(c) for c in EXCLUSIVE]
    y = y[:, idx]
    others = (y.sum(1, keepdim=True) - y).clamp(max=1)  # voxels of another finding
    return _bce_over(logits[:, idx], y, others)


def hard_negative_bce(logits: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """Mean over channels of the mean BCE of the ``k`` negative voxels with the largest loss
    (``logits``, ``y``: ``(B, C, *S)``): false-positive blobs, which a voxel mean over a
    whole volume barely notices."""
    bce = nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
    neg = (bce * (1 - y)).transpose(0, 1).flatten(1)  # (C, B * S)
    return neg.topk(min(k, neg.shape[1]), dim=1).values.mean()


def crop_batch(cropper, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One patch per item: ``x (B, 1, *S)``, ``y (B, C, *S)`` -> the same, on ``cropper``'s
    patch size. The label it samples from is ``y`` with an unlabelled-background channel
    in front (class 0)."""
    xs, ys = [], []
    for xi, yi in zip(x, y, strict=True):
        label = torch.cat([(yi.amax(0, keepdim=True) == 0).float(), yi])
        patch = cropper({"image": xi, "label": label})[0]
        xs.append(torch.as_tensor(patch["image"]))
        ys.append(torch.as_tensor(patch["label"])[1:])
    return torch.stack(xs), torch.stack(ys)


def keep_freed_memory() -> None:
    """Ask glibc to keep freed memory instead of returning it to the system: every step
    allocates and frees the same large activations, and fresh pages cost page faults
    (measured: 1.3 s instead of 1.75-2.5 s per step on the 2-core machine)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if sys.platform.startswith("linux") and name:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
        libc.mallopt(m_mmap_threshold, 1 << 30)
        libc.mallopt(m_trim_threshold, 2**31 - 1)
        libc.mallopt(m_top_pad, 1 << 30)


def _parser() -> argparse.ArgumentParser:
    """The command line; its defaults are the shipped ``demo_seg`` run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("hirescam3d/bundles/demo_seg"))
    parser.add_argument("--n-train", type=int, default=1400)
    parser.add_argument("--steps", type=int, default=1400)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument(
        "--pos-weights",
        type=float,
        nargs="+",
        default=[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 5.0, 2.0],
        help="BCE weight of positive voxels per channel, in SEG_CHANNELS order",
    )
    parser.add_argument("--pos-mean", type=float, default=0.2,
                        help="weight of the per-channel mean BCE over positive voxels")
    parser.add_argument("--hard-neg", type=float, default=0.0,
                        help="weight of the per-channel mean BCE of the hardest negatives")
    parser.add_argument("--hard-k", type=int, default=2000, help="hard negatives per channel")
    parser.add_argument("--hard-channels", nargs="+", choices=SEG_CHANNELS, default=None,
                        help="channels the hard negatives apply to (default: all)")
    parser.add_argument("--exclusive", type=float, default=0.0,
                        help="weight of the mean BCE over voxels of another exclusive finding")
    parser.add_argument("--presence", type=float, default=0.0, help="volume-level term weight")
    parser.add_argument("--top-k", type=int, default=8, help="logits per channel it averages")
    parser.add_argument("--crop", type=int, nargs=3, default=None,
                        help="train on patches of this size (S H W) instead of whole volumes")
    parser.add_argument(
        "--crop-ratios", type=float, nargs="+", default=None,
        help="patch-centre class weights: background, then one per channel",
    )  # fmt: skip
    parser.add_argument(
        "--init", default=None,
        help="start from this bundle's weights (zoo name or folder) instead of the seed's",
    )  # fmt: skip
    parser.add_argument("--max-minutes", type=float, default=29.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--val-count", type=int, default=60,
        help="validation phantoms (the seeds after the training's) that choose the mask "
        "post-processing (hirescam3d.models.training.tune_seg_masks); 0: none",
    )  # fmt: skip
    parser.add_argument("--workers", type=int, default=2, help="phantom-generation processes")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return parser


def _training_record(
    args: argparse.Namespace,
    argv: list[str] | None,
    seeds: list[int],
    history: list[float],
    done: int,
    gen_s: float,
    wall: float,
) -> dict[str, Any]:
    """The bundle's ``training`` entry: the command and its settings, the block losses,
    the steps done and the times (s)."""
    return {
        "command": " ".join([COMMAND, *(argv or sys.argv[1:])]),
        "train_seeds": [seeds[0], seeds[-1]],
        "steps": args.steps,
        "steps_completed": done,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "seed": args.seed,
        "loss": "BCE-with-logits (positive voxels weighted per channel) + soft Dice "
        "(batch=True) + pos_mean x mean BCE over each channel's positives + hard_neg x mean "
        "BCE of the hard_k worst negatives of the hard_channels + exclusive x mean BCE over "
        "the other lung findings' voxels + presence x BCE of the top-k mean logit",
        "pos_weights": args.pos_weights,
        "presence": args.presence,
        "pos_mean": args.pos_mean,
        "hard_neg": args.hard_neg,
        "hard_k": args.hard_k,
        "hard_channels": args.hard_channels,
        "exclusive": args.exclusive,
        "top_k": args.top_k,
        "init": args.init,
        "crop": args.crop,
        "crop_ratios": args.crop_ratios,
        "block_losses": [round(v, 5) for v in history],
        "phantom_generation_s": round(gen_s, 1),
        "wall_time_s": round(wall, 1),
        "torch_threads": args.threads,
    }


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if len(args.pos_weights) != len(SEG_CHANNELS):
        parser.error(f"--pos-weights needs {len(SEG_CHANNELS)} values, one per channel")
    if args.crop_ratios is not None and len(args.crop_ratios) != len(SEG_CHANNELS) + 1:
        parser.error(f"--crop-ratios needs {len(SEG_CHANNELS) + 1} values: background, then "
                     "one per channel")  # fmt: skip

    from hirescam3d.models.bundle import save_bundle
    from hirescam3d.models.handle import ModelHandle

    torch.set_num_threads(args.threads)
    keep_freed_memory()
    start = time.time()
    entry = ModelHandle.resolve("demo_seg")
    seeds = [SEG_SEED0 + i for i in range(args.n_train)]
    log(f"generating {len(seeds)} phantoms (seeds {seeds[0]}..{seeds[-1]})")
    cts, labels = make_dataset(seeds, args.workers)
    gen_s = time.time() - start
    log(f"phantoms ready ({gen_s:.0f} s)")
    network = entry.build(args.seed)
    if args.init is not None:  # fine-tuning: the weights of an earlier run, loaded safely
        network.load_state_dict(ModelHandle.resolve(args.init).load()[0].state_dict())
        log(f"starting from the weights of {args.init}")
    history, done = train(
        network, cts, labels, entry.info.input.window, args.steps, args.batch_size, args.lr,
        args.weight_decay, args.seed, deadline=start + 60 * args.max_minutes,
        pos_weights=args.pos_weights, presence=args.presence, top_k=args.top_k,
        crop=tuple(args.crop) if args.crop else None, crop_ratios=args.crop_ratios,
        pos_mean=args.pos_mean, hard_neg=args.hard_neg, hard_k=args.hard_k,
        exclusive=args.exclusive, hard_channels=args.hard_channels,
    )  # fmt: skip
    wall = time.time() - start
    info = entry.info
    info.trained = True
    info.training = _training_record(args, argv, seeds, history, done, gen_s, wall)
    save_bundle(network, info, args.out, network_def={"_target_": "UNet", **SEG_UNET})
    log(f"wrote {args.out} in {wall / 60:.1f} min")
    if args.val_count > 0:  # the mask post-processing, on seeds right after the training's
        first = seeds[-1] + 1
        write(args.out, tune(args.out, list(range(first, first + args.val_count)), args.workers))
        log(f"mask post-processing chosen on seeds {first}..{first + args.val_count - 1}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
