"""The training loop: a student learns to map images into a teacher's space (asymmetric) or its own (symmetric).

Per epoch, as the loss declares (`training.losses.Loss`; the trainer never looks at its name): a loss
that does not need tuples (regression, RKD, DarkRank, CSD) gets batches of random images; a tuple loss
(contrastive, contrastive+, triplet, multi-similarity) gets (query, positive) pairs with hard negatives
mined from a pool (student queries against teacher pool vectors in asymmetric mode). Adam with the GeM p group at 10x lr and no weight decay,
exponential lr decay, BatchNorm statistics frozen (its affine weights too, unless freeze="stats"). Validation
each epoch (asymmetric and symmetric mAP) on held-out scenes, best-model selection, early stopping (patience),
checkpoints after each epoch and resume. `TrainConfig.from_recipe` starts from a named preset (training.recipes). Under torchrun every process
takes its share of each batch and the gradients are averaged with torch.distributed's all-reduce.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from engine.errors import EngineError
from engine.files import write_text, written_by
from engine.models import (TEACHERS, Encoder, build_student, build_teacher, load_checkpoint, registry_teacher_of, save_checkpoint,
                           space_id)
from kernels import l2n

from .data import TrainData, batch_loader, forward_images
from .losses import LOSSES, Loss, loss_options, make_loss
from .mining import mine_hard_negatives, nearest_neighbours, random_negatives
from .options import is_count, is_finite, require, require_choice
from .recipes import RECIPES, recipe_values
from .validate import ValSet, validate

# a resumed run may be extended, given other decoding workers, validated less often or given more patience
RESUMABLE_CHANGES = {"epochs", "workers", "val_every", "patience"}
RUN_FILES = ("config.json", "last.safetensors", "best.safetensors", "log.jsonl", "last.state.pt")
MAP_CACHE_BYTES = 4 << 30  # frozen-trunk feature maps are cached in memory up to this size


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved in every checkpoint."""

    recipe: str | None = None  # the preset these values started from (training.recipes; explicit options override it)
    student: str = "mobilenetv2"  # a student architecture, or a teacher name to fine-tune it (--mode sym)
    weights: str | None = None  # backbone weights (None: packaged ImageNet weights)
    loss: str = "regression"
    mode: str = "asym"  # asym: refs are teacher vectors; sym: refs come from the student
    margin: float | None = None  # tuple-loss margin (None: the loss's default)
    reduction: str | None = None  # sum | mean over a batch (None: the loss's default; regression averages)
    epochs: int = 10
    lr: float = 1e-4
    lr_decay: float = 0.01  # lr *= exp(-lr_decay) each epoch
    weight_decay: float = 1e-6
    p_lr_mult: float = 10.0
    batch_size: int = 5  # tuples (tuple losses) or images x 4 (knowledge-transfer losses)
    images_per_batch: int | None = None  # knowledge-transfer losses' batch (None: 4 x batch_size)
    images_per_epoch: int = 20000
    query_size: int = 2000
    pool_size: int = 20000
    neg_num: int = 5
    negatives: str = "hard"  # hard | random
    csd_k: int | None = None  # CSD's teacher neighbours per image (None: the loss's default, 96)
    max_side: int = 362
    workers: int = 1
    seed: int = 0
    select: str = "auto"  # validation metric for best-model choice: asym | sym | auto (the mode's)
    val_every: int = 1  # validate (and choose the best model) every this many epochs, and after the last
    val_scales: tuple[float, ...] = (1.0,)  # validation's multi-scale factors (METHOD.md's protocol: 1, 1/sqrt(2), 1/2)
    patience: int | None = None  # stop after this many validations without a better score (None: never)
    # bn: BatchNorm statistics and affine weights frozen; stats: statistics frozen, affine weights learned
    # (cirtorch / AML); trunk: the whole backbone frozen (the head learns)
    freeze: str = "bn"
    center: bool = True  # targets: teacher vectors minus their training mean, re-normalised (see Trainer)
    gallery: str | None = None  # gallery adaptation (training.adapt): the store fitted, transductively

    def check(self) -> None:
        """Refuse values that cannot train (NaN, infinite, out of range, unknown), one EngineError each."""
        for name in ("epochs", "batch_size", "images_per_epoch", "query_size", "pool_size", "neg_num", "max_side",
                     "val_every"):
            require(name, getattr(self, name), is_count(getattr(self, name)), "an integer >= 1")
        for name in ("workers", "seed"):
            require(name, getattr(self, name), is_count(getattr(self, name), least=0), "an integer >= 0")
        for name in ("images_per_batch", "patience"):
            value = getattr(self, name)
            require(name, value, value is None or is_count(value), "an integer >= 1")
        if self.recipe is not None:
            require_choice("recipe", self.recipe, RECIPES)
        scales = self.val_scales
        require("val_scales", scales, isinstance(scales, (tuple, list)) and len(scales) > 0
                and all(is_finite(s) and s > 0 for s in scales), "finite numbers > 0")
        require("lr", self.lr, is_finite(self.lr) and self.lr > 0, "a finite number > 0")
        require("p_lr_mult", self.p_lr_mult, is_finite(self.p_lr_mult) and self.p_lr_mult > 0, "a finite number > 0")
        require("lr_decay", self.lr_decay, is_finite(self.lr_decay) and self.lr_decay >= 0, "a finite number >= 0")
        require("weight_decay", self.weight_decay, is_finite(self.weight_decay) and self.weight_decay >= 0,
                "a finite number >= 0")
        require_choice("mode", self.mode, ("asym", "sym"))
        require_choice("negatives", self.negatives, ("hard", "random"))
        require_choice("freeze", self.freeze, ("bn", "stats", "trunk"))
        require_choice("select", self.select, ("auto", "asym", "sym"))
        loss = self.build_loss()
        if self.mode == "sym" and not loss.symmetric_form:
            raise EngineError(f"{self.loss} transfers the teacher's knowledge: it has no symmetric form (use --mode asym)")
        if self.student in TEACHERS and self.mode != "sym":
            raise EngineError(f"{self.student} is a teacher: fine-tuning a teacher is symmetric (--mode sym)")

    def build_loss(self) -> Loss:
        """The configured loss with its options (an unknown loss or an option it does not take is an EngineError)."""
        return make_loss(self.loss, margin=self.margin, csd_k=self.csd_k, reduction=self.reduction)

    @classmethod
    def from_recipe(cls, recipe: str | None, **given) -> TrainConfig:
        """Recipe `recipe`'s values (None: the defaults above), overridden by every option in `given`.

        A recipe's loss options (margin, reduction) apply only to a loss that takes them. The result records
        the recipe's name; it is checked when used (`check`).
        """
        loss = given.get("loss", cls.loss)
        takes = loss_options(loss) if loss in LOSSES else set()  # an unknown loss is check()'s to name
        values = {**recipe_values(recipe, takes), **given, "recipe": recipe}
        if "val_scales" in values:
            values["val_scales"] = tuple(values["val_scales"])
        return cls(**values)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _agree(flag: bool) -> bool:
    """Rank 0's flag, in every process."""
    if _world()[1] == 1:
        return flag
    t = torch.tensor([int(flag)])
    dist.broadcast(t, src=0)
    return bool(t.item())


def _freeze_batchnorm(model: torch.nn.Module, affine: bool = True) -> None:
    """BatchNorm keeps its ImageNet statistics: a few tuples a batch would only add noise to them.
    affine: also freeze its scale and shift (False: they learn, as in cirtorch and the AML code)."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
            if affine:
                for p in m.parameters():
                    p.requires_grad_(False)


def _optimizer(student: Encoder, cfg: TrainConfig) -> torch.optim.Optimizer:
    p_params = [student.head.p]
    others = [p for n, p in student.named_parameters() if p.requires_grad and n != "head.p"]
    return torch.optim.Adam(
        [{"params": others, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
         {"params": p_params, "lr": cfg.lr * cfg.p_lr_mult, "weight_decay": 0.0}]
    )


class Trainer:
    """Owns the student, the optimiser and the run folder (checkpoints, log.jsonl)."""

    def __init__(self, cfg: TrainConfig, data: TrainData, out_dir: str | Path, val: ValSet | None = None,
                 progress: bool | None = None, init: str | Path | None = None):
        cfg.check()
        self.loss = cfg.build_loss()
        if cfg.center:
            # The teacher's vectors share a large mean m (ReLU features): it adds m . g to gallery image g's
            # score for every query alike, nothing query-specific, yet it would dominate a regression loss.
            centred = data.teacher - data.teacher.mean(axis=0)
            data = replace(data, teacher=l2n(centred))
        self.cfg, self.data, self.val = cfg, data, val
        self.out = Path(out_dir)
        self.rank, self.world = _world()
        self.progress = sys.stderr.isatty() if progress is None else progress
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            for name in RUN_FILES:  # temporary files of a writer that was killed: never part of the run
                for tmp in self.out.glob(f"{name}*.tmp"):
                    tmp.unlink()
        torch.manual_seed(cfg.seed)
        if init is not None:
            self.student = load_checkpoint(init)
            if self.student.dim != data.dim:
                raise EngineError(f"student outputs D = {self.student.dim}, the teacher store has D = {data.dim}", init)
        elif cfg.student in TEACHERS:
            # Retrieval fine-tuning of a teacher (as SfM-120k's teachers were): it starts in the store's
            # space and leaves it with its first update, so checkpoints carry the new weights' space id.
            self.student = build_teacher(cfg.student, cfg.weights)
        else:
            self.student = build_student(cfg.student, data.dim, data.space, cfg.weights, bridge_to=registry_teacher_of(data.space))
        if self.student.space != data.space:
            raise EngineError(f"student maps into space {self.student.space!r}, the teacher store is {data.space!r}")
        self.student.config["train"] = asdict(cfg)
        if cfg.freeze == "trunk":
            # few training photographs: adapting only the head keeps the ImageNet features general
            self.student.trunk.requires_grad_(False)
        self._cache_trunk_maps()
        self.opt = _optimizer(self.student, cfg)
        self.sched = torch.optim.lr_scheduler.ExponentialLR(self.opt, gamma=math.exp(-cfg.lr_decay))
        self.epoch = 0
        self.best = -1.0
        self.stale = 0  # validations since the best one (early stopping)
        self._resume()

    # ------------------------------------------------------------ checkpoints and resume
    #
    # The run's state after each epoch (weights, optimiser, schedule, RNG, best score, log) is one file,
    # last.state.pt, written into place last: it is the commit point. last.safetensors, best.safetensors and
    # log.jsonl are written before it, from the same state; a run killed at any point resumes from the last
    # committed epoch and redoes the epoch after it exactly as an uninterrupted run would, rewriting them.

    def _state_path(self) -> Path:
        return self.out / "last.state.pt"

    def _resume(self) -> None:
        state = self._state_path()
        self.log: list[dict] = []
        if not state.exists():
            return
        config = self.out / "config.json"
        try:
            saved = json.loads(config.read_text())
        except (OSError, ValueError) as e:
            raise EngineError(f"cannot read the run's configuration ({e}): choose another --out", config) from None
        now = json.loads(json.dumps(asdict(self.cfg)))  # as saved: tuples become lists
        diff = sorted(k for k in set(saved) | set(now) if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k))
        if diff:
            raise EngineError(f"holds a run with another configuration ({', '.join(diff)}): choose another --out", self.out)
        try:
            st = torch.load(state, map_location="cpu", weights_only=True)
            self.student.load_state_dict(st["model"])
            self.opt.load_state_dict(st["optimizer"])
            self.sched.load_state_dict(st["scheduler"])
            torch.set_rng_state(st["rng"])
            self.epoch, self.best, self.log = int(st["epoch"]), float(st["best"]), list(st["log"])
            self.stale = int(st.get("stale", 0))
        except Exception as e:  # a damaged or foreign file: the user's to move away, not an engine bug
            raise EngineError(f"not a training state this engine can resume ({type(e).__name__}: {e})".splitlines()[0],
                              state) from None

    def _checkpoint(self, path: Path, extra: dict) -> None:
        if self.student.config["role"] == "teacher":
            self.student.config["space"] = space_id(self.student)
        save_checkpoint(self.student, path, extra)

    def _save(self, metrics: dict) -> None:
        if self.rank != 0:
            return
        write_text(self.out / "config.json", json.dumps(asdict(self.cfg), indent=1))
        self._checkpoint(self.out / "last.safetensors", {"epoch": self.epoch, "metrics": metrics})
        self.log.append({"epoch": self.epoch, **metrics})
        write_text(self.out / "log.jsonl", "".join(json.dumps(r) + "\n" for r in self.log))
        state = {"model": self.student.state_dict(), "optimizer": self.opt.state_dict(),
                 "scheduler": self.sched.state_dict(), "rng": torch.get_rng_state(), "epoch": self.epoch,
                 "best": self.best, "stale": self.stale, "log": self.log}
        with written_by(self._state_path()) as tmp:
            torch.save(state, tmp)

    # ------------------------------------------------------------ one epoch

    def _epoch_plan(self, rng: np.random.Generator) -> tuple[list[list[int]], dict]:
        """The epoch's batches as lists of image indices to decode, plus what each batch's loss needs."""
        cfg, d = self.cfg, self.data
        if not self.loss.needs_tuples:
            n = min(cfg.images_per_epoch, len(d.paths))
            order = rng.permutation(len(d.paths))[:n]
            # relational losses need several images at once
            size = max(self.loss.min_images, cfg.images_per_batch or cfg.batch_size * 4)
            batches = [order[i:i + size].tolist() for i in range(0, n, size)]
            return [b for b in batches if len(b) >= self.loss.min_images], {}
        if len(d.qidxs) == 0:
            raise EngineError("the training set has no (query, positive) pairs for a tuple loss")
        pick = rng.permutation(len(d.qidxs))[:cfg.query_size]
        q, p = d.qidxs[pick], d.pidxs[pick]
        pool = rng.permutation(len(d.paths))[:cfg.pool_size]
        if cfg.negatives == "random":
            neg = pool[random_negatives(d.cluster[q], d.cluster[pool], cfg.neg_num, seed=int(rng.integers(1 << 31)))]
        else:
            sq = self._encode(q.tolist())
            pool_vecs = d.teacher[pool] if cfg.mode == "asym" else self._encode(pool.tolist())
            neg = pool[mine_hard_negatives(sq, pool_vecs, d.cluster[q], d.cluster[pool], cfg.neg_num)]
        tuples = np.concatenate([q[:, None], p[:, None], neg], axis=1)  # query, positive, negatives
        batches = [tuples[i:i + cfg.batch_size] for i in range(0, len(tuples), cfg.batch_size)]
        return [b.reshape(-1).tolist() for b in batches], {"tuple_len": tuples.shape[1]}

    @torch.no_grad()
    def _encode(self, idx: list[int]) -> np.ndarray:
        """Student vectors of training images (for mining), in eval mode."""
        self.student.eval()
        out = []
        chunks = [idx[i:i + 8] for i in range(0, len(idx), 8)]
        for imgs in self._inputs(chunks):
            out.append(forward_images(self._forward, imgs))
        return torch.cat(out).numpy() if out else np.zeros((0, self.data.dim), np.float32)

    def _batch_loss(self, images: list[torch.Tensor], idx: list[int], plan: dict) -> torch.Tensor:
        """The loss of one batch: `idx` are its image indices (whole tuples, flattened, for a tuple loss)."""
        d, loss = self.data, self.loss
        t = torch.from_numpy(d.teacher[idx])
        if not loss.needs_tuples:
            s = forward_images(self._forward, images)
            nb = torch.from_numpy(d.teacher[self._teacher_neighbours()[idx]]) if loss.needs_neighbours else None
            return loss(s, t, neighbours=nb)
        R = plan["tuple_len"]
        t = t.view(len(idx) // R, R, -1)
        if self.cfg.mode == "asym":
            anchors = forward_images(self._forward, images)  # only the queries were decoded
            refs = t[:, 1:]
        else:
            s = forward_images(self._forward, images).view(t.shape[0], R, -1)
            anchors, refs = s[:, 0], s[:, 1:]
        return loss(anchors, t[:, 0], refs=refs)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """Student descriptors from images, or from cached trunk maps when the trunk is frozen."""
        if self._maps is None:
            return self.student(x)
        return self.student.head(x)

    def _inputs(self, batches: list[list[int]]):
        """Per batch, what `_forward` takes: decoded images (a DataLoader), or the cached trunk maps."""
        if self._maps is None:
            return batch_loader(self.data.paths, batches, self.cfg.max_side, self.cfg.workers)
        return ([self._maps[i] for i in b] for b in batches)

    @torch.no_grad()
    def _cache_trunk_maps(self) -> None:
        """A frozen trunk gives every image the same map each epoch: compute them once, if they fit in memory."""
        self._maps = None
        if self.cfg.freeze != "trunk":
            return
        self.student.eval()
        n = len(self.data.paths)
        chunks = [list(range(i, min(i + 8, n))) for i in range(0, n, 8)]
        maps: list[torch.Tensor] = []
        for imgs in batch_loader(self.data.paths, chunks, self.cfg.max_side, self.cfg.workers):
            for img in imgs:
                maps.append(self.student.trunk_maps(img[None])[0])
            if maps[0].numel() * 4 * n > MAP_CACHE_BYTES:  # judged on the first batch's maps
                return
        self._maps = maps

    def _teacher_neighbours(self) -> np.ndarray:
        """Each training image's teacher top-K neighbours (CSD's context): fixed, so computed once."""
        if getattr(self, "_nn", None) is None:
            n = len(self.data.teacher)
            k = min(self.loss.needs_neighbours, n - 1)
            self._nn = nearest_neighbours(self.data.teacher, self.data.teacher, k, exclude=np.arange(n))
        return self._nn

    def _images_for(self, batch: list[int], plan: dict) -> list[int]:
        """The images this batch decodes: in asymmetric tuple mode only the queries go through the student."""
        if not self.loss.needs_tuples or self.cfg.mode == "sym":
            return batch
        return batch[:: plan["tuple_len"]]

    def _shard(self, batch: list[int], plan: dict) -> list[int]:
        """This process's share of a batch (whole tuples), so DDP's gradient average covers the full batch."""
        if self.world == 1:
            return batch
        unit = plan.get("tuple_len", 1)
        units = [batch[i:i + unit] for i in range(0, len(batch), unit)]
        return [i for u in units[self.rank::self.world] for i in u]

    def _zero_loss(self) -> torch.Tensor:
        """This process got no share of a small batch: it still takes part in the gradient average."""
        return sum(p.sum() * 0.0 for p in self.student.parameters() if p.requires_grad)

    def _average_gradients(self) -> None:
        """All-reduce the gradients (mean over processes), in one flat buffer.

        Done by hand rather than by DistributedDataParallel's hooks because a batch of images of
        several sizes takes several forward passes before its one backward, which DDP does not allow.
        """
        if self.world == 1:
            return
        grads = [p.grad for p in self.student.parameters() if p.requires_grad]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def train_epoch(self) -> dict:
        cfg = self.cfg
        rng = np.random.default_rng(cfg.seed * 100003 + self.epoch)  # same plan in every process
        batches, plan = self._epoch_plan(rng)
        mine = [self._shard(b, plan) for b in batches]
        decode = [self._images_for(b, plan) for b in mine]
        self.student.train()
        _freeze_batchnorm(self.student, affine=cfg.freeze != "stats")
        total, n_img, t0 = 0.0, 0, time.perf_counter()
        columns = (TextColumn(f"epoch {self.epoch + 1}/{cfg.epochs}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]:.4f}  {task.fields[rate]:.1f} img/s"), TimeElapsedColumn())
        with Progress(*columns, disable=not (self.progress and self.rank == 0)) as bar:
            task = bar.add_task("train", total=len(batches), loss=0.0, rate=0.0)
            for step, (idx, images) in enumerate(zip(mine, self._inputs(decode))):
                loss = self._batch_loss(images, idx, plan) if idx else self._zero_loss()
                if not torch.isfinite(loss):
                    raise EngineError(f"loss is {loss.item()} at epoch {self.epoch + 1}, step {step} (images {idx[:4]}...); "
                                      f"the last good checkpoint is {self.out / 'last.safetensors'}")
                # A summed loss: each process holds part of the sum, and the gradients are averaged,
                # so scaling by the world size gives the full batch's gradient and loss.
                if self.world > 1 and self.loss.reduction == "sum":
                    loss = loss * self.world
                self.opt.zero_grad(set_to_none=False)
                loss.backward()
                self._average_gradients()
                self.opt.step()
                total += float(loss.detach())
                n_img += len(decode[step])
                bar.update(task, advance=1, loss=total / (step + 1), rate=n_img / (time.perf_counter() - t0))
        self.sched.step()
        mean = total / max(1, len(batches))
        if self.world > 1:
            t = torch.tensor([mean])
            dist.all_reduce(t)
            mean = float(t) / self.world
        return {"loss": mean, "images_per_s": n_img * self.world / (time.perf_counter() - t0)}

    def stopped(self) -> bool:
        """Early stopping: `patience` validations in a row brought no better score."""
        return self.cfg.patience is not None and self.stale >= self.cfg.patience

    def fit(self) -> dict:
        """Train the remaining epochs, or until `patience` validations bring no better score; returns the last
        epoch's metrics ("stopped_early": True when patience ran out). Best model in best.safetensors."""
        metrics: dict = dict(self.log[-1]) if self.log else {}
        key = self.cfg.select if self.cfg.select != "auto" else self.cfg.mode
        while self.epoch < self.cfg.epochs and not self.stopped():
            metrics = self.train_epoch()
            self.epoch += 1
            due = self.epoch % self.cfg.val_every == 0 or self.epoch == self.cfg.epochs
            if self.val is not None and due:
                # every process takes the same decision to stop: rank 0's, broadcast
                improved = self._validate(metrics, key) if self.rank == 0 else False
                self.stale = 0 if _agree(improved) else self.stale + 1
            self._save(metrics)
        if self.stopped():
            metrics["stopped_early"] = True
        return metrics

    def _validate(self, metrics: dict, key: str) -> bool:
        """Validate into `metrics`; keep best.safetensors when the score is the best so far; True if it is."""
        metrics.update(validate(self.student, self.val, self.cfg.max_side, self.cfg.workers, scales=self.cfg.val_scales))
        score = metrics[f"val_{key}_mAP"]
        if score <= self.best:
            return False
        self.best = score
        self._checkpoint(self.out / "best.safetensors", {"epoch": self.epoch, "metrics": metrics})
        return True

