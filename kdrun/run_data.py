"""The run's data: the dataset, its splits (train, validation, the student stages' transfer set, test),
normalisation, augmentation, the number of cached views, and the loaders every stage draws from.

:class:`RunData` is built once per run; in-memory splits go to the training device once and every
loader of every stage shares them. Streamed splits (image folders too large for memory) stay files.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import torch
from omegaconf import DictConfig, OmegaConf

from kdrun import distributed
from kdrun.config import check_class_indices
from kdrun.data import DATASETS, DataBundle, ImageSet
from kdrun.data.base import FileSet
from kdrun.data.loader import Normalize, TensorLoader
from kdrun.data.stream import StreamLoader, stream_workers
from kdrun.data.transforms import Augment, RandomResizedCrop, make_augment
from kdrun.errors import ConfigError

log = logging.getLogger("kdrun")


def load_dataset(dcfg) -> DataBundle:
    """Load (decode once) the configured dataset and check it against the config."""
    kw = OmegaConf.to_container(dcfg, resolve=True)
    assert isinstance(kw, dict)
    for k in ("mean", "std", "augment", "student_fraction", "student_exclude"):  # used by the run, not the factory
        kw.pop(k, None)
    data = DATASETS.get(kw.pop("name"), "dataset.name")(**{str(k): v for k, v in kw.items()})
    data.check(dcfg.get("num_classes"), dcfg.get("image_size"), dcfg.get("in_chans"))
    for split, part in (("train", data.train), ("test", data.test)):
        labels = getattr(part, "labels", None)
        if labels is not None and len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= data.num_classes):
            raise ConfigError(
                f"dataset={data.name}: {split} labels span [{int(labels.min())}, {int(labels.max())}], "
                f"outside [0, {data.num_classes}) for its {data.num_classes} classes"
            )
    return data


def augment_specs(cfg: DictConfig) -> tuple[dict, dict]:
    """(``dataset.augment``, ``teacher.augment``) as plain dicts (empty when unset)."""
    specs = []
    for aug in (cfg.dataset.get("augment"), cfg.teacher.get("augment")):
        spec = OmegaConf.to_container(aug, resolve=True) if aug is not None else {}
        assert isinstance(spec, dict)
        specs.append({str(k): v for k, v in spec.items()})
    return specs[0], specs[1]


def split_validation(
    train: ImageSet | FileSet, fraction: float, seed: int
) -> tuple[ImageSet | FileSet, ImageSet | FileSet | None]:
    """Hold ``fraction`` of the training split out (seeded) to choose a best epoch; never the test set.

    A uniform draw, not stratified by class: each class's share of the split varies by its sampling noise (the
    figures recorded in the presets were chosen on these splits, so the draw stays as it is)."""
    if fraction <= 0:
        return train, None
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 7))
    n_val = max(1, int(round(len(train) * fraction)))
    if n_val >= len(train):
        raise ConfigError(
            f"trainer.val_fraction={fraction}: holds out all {len(train)} training images, leaving none to train on; "
            "give a smaller fraction (or 0)"
        )
    return train.subset(perm[n_val:].sort().values), train.subset(perm[:n_val].sort().values)


def warn_classes_held_out(train: ImageSet | FileSet, classes: list[str]) -> None:
    """A warning naming the classes the validation split took every training image of (a folder of a few images
    per class): the models never see them trained, and score 0 on them."""
    left = set(train.labels.cpu().unique().tolist())
    missing = [c for i, c in enumerate(classes) if i not in left]
    if missing:
        log.warning(
            "data: trainer.val_fraction holds out every training image of %d class(es): %s; they are never trained "
            "on (lower trainer.val_fraction, or add images)",
            len(missing),
            ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else ""),
        )


def transfer_subset(
    train: ImageSet | FileSet, fraction: float, seed: int, exclude: list[int] | tuple[int, ...] = ()
) -> ImageSet | FileSet:
    """A seeded, class-stratified ``fraction`` of ``train`` (each class keeps at least one image), in index order,
    without the classes in ``exclude``.

    The student stages' transfer set (``dataset.student_fraction``, ``dataset.student_exclude``); the whole
    split when ``fraction >= 1`` and nothing is excluded.
    """
    if fraction >= 1 and not exclude:
        return train
    gen = torch.Generator().manual_seed(seed + 11)
    labels = train.labels.cpu()
    keep = []
    for c in labels.unique().tolist():
        if c in exclude:
            continue
        members = (labels == c).nonzero().flatten()
        n = max(1, int(round(len(members) * fraction)))
        keep.append(members[torch.randperm(len(members), generator=gen)[:n]])
    if not keep:  # every class the training split holds is excluded (the validation split took the others)
        raise ConfigError(
            f"dataset.student_exclude={list(exclude)}: leaves the student stages no image: the training split holds "
            "only those classes (the validation split, trainer.val_fraction, may have taken the others)"
        )
    return train.subset(torch.cat(keep).sort().values)


def on_device(split: ImageSet | FileSet, device: torch.device) -> ImageSet | FileSet:
    """An in-memory split on ``device`` (files of a streamed split stay where they are)."""
    if isinstance(split, ImageSet):
        return ImageSet(split.images.to(device), split.labels.to(device))
    return split


def default_eval_batch_size(device: torch.device) -> int:
    """``trainer.eval_batch_size: null``: 512 on a GPU; 64 on a CPU, whose forward pass is faster on batches that
    stay in its caches (resnet20, channels_last, 2 cores: 1,997 img/s at 64, 782 at 512)."""
    return 512 if device.type == "cuda" else 64


class RunData:
    """The dataset and its splits on ``device``, with the loaders of the run's stages."""

    def __init__(self, cfg: DictConfig, device: torch.device):
        self.cfg, self.tr, self.device = cfg, cfg.trainer, device
        t0 = time.perf_counter()
        self.data = load_dataset(cfg.dataset)
        # an image folder's classes are known only now (dataset.num_classes null): its class indices again
        check_class_indices(
            cfg, self.data.num_classes, f"the {self.data.num_classes} classes of dataset.root={cfg.dataset.get('root')}"
        )
        train, val = split_validation(self.data.train, float(self.tr.val_fraction), self.tr.seed)
        if val is not None:
            warn_classes_held_out(train, self.data.classes)
        # the student stages' transfer set: all of the training split, or a seeded fraction of it
        student = transfer_subset(
            train,
            float(cfg.dataset.get("student_fraction", 1.0)),
            self.tr.seed,
            list(cfg.dataset.get("student_exclude") or []),
        )
        # in-memory splits go to the training device once; every loader of every stage shares them
        self.train_set: ImageSet | FileSet = on_device(train, device)
        # all of the training split (student_fraction=1, nothing excluded) is the same split: not a second copy
        self.student_set: ImageSet | FileSet = self.train_set if student is train else on_device(student, device)
        self.val_set: ImageSet | FileSet | None = on_device(val, device) if val is not None else None
        self.test_set: ImageSet | FileSet = on_device(self.data.test, device)
        self.seconds = time.perf_counter() - t0
        self._log()
        self._check_statistics(train)
        self.norm = Normalize(cfg.dataset.mean, cfg.dataset.std, self.data.in_chans, device)
        spec, teacher_spec = augment_specs(cfg)
        mean = list(cfg.dataset.mean)
        self.augment = make_augment(spec, self.tr.seed, mean)
        # the teacher's own training: teacher.augment's keys over dataset.augment (the same when it sets none)
        self.teacher_augment = make_augment({**spec, **teacher_spec}, self.tr.seed, mean, "teacher.augment")
        eb = self.tr.get("eval_batch_size")
        self.eval_batch_size = int(eb) if eb else default_eval_batch_size(device)
        views = cfg.cache.views
        self.views = int(views) if views is not None else (8 if self.augment.enabled else 0)
        self.val_loader = self.eval_loader(self.val_set)
        self.test_loader = self.eval_loader(self.test_set)

    def _check_statistics(self, train: ImageSet | FileSet) -> None:
        """A warning when an image folder held in memory is normalised with ImageNet's statistics (its config's
        default) far from its own, and no model comes with weights of its own (ImageNet's want ImageNet's; a kdrun
        checkpoint, those it was trained with): the data's, to give. Said by the main worker, from at most 5,000
        images evenly spaced through the split."""
        cfg = self.cfg
        imagenet = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
        given = ([round(float(v), 3) for v in cfg.dataset.mean], [round(float(v), 3) for v in cfg.dataset.std])
        weighted = any(
            cfg[who].get(k) for who in ("teacher", "student") for k in ("weights", "pretrained", "checkpoint")
        )
        if cfg.dataset.name != "imagefolder" or given != imagenet or weighted or not isinstance(train, ImageSet):
            return
        if not distributed.is_main():
            return
        picked = train.images[:: -(-len(train) // 5000)]  # uint8 [n <= 5000, C, H, W]
        sums = torch.zeros(2, picked.shape[1], dtype=torch.float64)
        for chunk in picked.split(256):  # float64 sums a chunk at a time: no float copy of the whole sample
            x = chunk.to(torch.float64).div_(255).transpose(0, 1).flatten(1)  # [C, pixels]
            sums += torch.stack([x.sum(1), x.square().sum(1)])
        count = picked.shape[0] * picked.shape[2] * picked.shape[3]
        mean_t = sums[0] / count
        mean, std = mean_t.tolist(), (sums[1] / count - mean_t.square()).clamp_min(0).sqrt().tolist()
        if max(abs(a - b) for a, b in zip(mean + std, imagenet[0] + imagenet[1])) > 0.05:
            log.warning(
                "data: normalised with ImageNet's statistics (the image folder default), but this training split's "
                "are mean %s, std %s: give dataset.mean=[%s] dataset.std=[%s] (not with ImageNet weights)",
                [round(v, 4) for v in mean],
                [round(v, 4) for v in std],
                ",".join(f"{v:.4f}" for v in mean),
                ",".join(f"{v:.4f}" for v in std),
            )

    def _log(self) -> None:
        d = self.data
        log.info(
            "data: %s, %d train / %d val / %d test images, %d classes, %dx%dx%d",
            d.name,
            len(self.train_set),
            len(self.val_set) if self.val_set else 0,
            len(d.test),
            d.num_classes,
            d.in_chans,
            d.image_size,
            d.image_size,
        )
        names = [str(c) for c in d.classes]
        if names != [str(i) for i in range(len(names))]:  # names to indices (student_exclude, errors_by_class)
            shown = ", ".join(f"{i} {n}" for i, n in enumerate(names[:12]))
            log.info(
                "data: classes by index: %s%s",
                shown,
                f", ... ({len(names)} in metrics.json)" if len(names) > 12 else "",
            )
        if len(self.student_set) != len(self.train_set):
            log.info(
                "data: the student stages train on %d of the %d training images (dataset.student_fraction=%s, "
                "student_exclude=%s); the teacher on all of them",
                len(self.student_set),
                len(self.train_set),
                self.cfg.dataset.student_fraction,
                list(self.cfg.dataset.get("student_exclude") or []),
            )

    @property
    def num_classes(self) -> int:
        return self.data.num_classes

    @property
    def streamed(self) -> bool:
        return isinstance(self.train_set, FileSet)

    def augment_key(self, augment: Augment | RandomResizedCrop) -> list:
        """What makes ``augment``'s views (for store keys): a random-resized crop streamed from files is cut
        from the full-resolution image, in memory from the decoded copy at ``image_size``, so the same crop
        box gives other pixels (pad-crops and flips of the two are the same)."""
        source = ["full-resolution files"] if self.streamed and isinstance(augment, RandomResizedCrop) else []
        return [*augment.identity(), *source]

    def loader(self, split: ImageSet | FileSet, batch_size: int, **kw) -> TensorLoader | StreamLoader:
        """Batches from memory (decoded once), or streamed from the files of a split too big for memory."""
        if isinstance(split, FileSet):
            return StreamLoader(
                split,
                batch_size,
                self.norm,
                num_workers=stream_workers(self.cfg.dataset),
                device=self.device,
                **kw,
            )
        return TensorLoader(split, batch_size, self.norm, device=self.device, **kw)

    def train_loader(
        self,
        views: int | None = None,
        split: ImageSet | FileSet | None = None,
        augment: Augment | RandomResizedCrop | None = None,
    ) -> TensorLoader | StreamLoader:
        """Shuffled, augmented batches of ``split`` (default: the whole training split); ``views``: None fresh
        views, K > 0 one of K cached views, 0 plain; ``augment``: default the student stages' ``self.augment``."""
        return self.loader(
            split if split is not None else self.train_set,
            self.tr.batch_size,
            augment=augment if augment is not None else self.augment,
            shuffle=True,
            seed=self.tr.seed,
            views=views,
            shard=distributed.world(),
        )

    def spread_batches(self, split: ImageSet | FileSet, n: int) -> Iterator[torch.Tensor]:
        """Batches of ``n`` images of ``split`` evenly spaced through it (all of them when it has fewer), normalised
        and un-augmented, on the device. Evenly spaced, not the first ``n``: an image folder lists its images
        class by class, so the first 5,000 of ImageNet would be four of its classes."""
        index = torch.linspace(0, len(split) - 1, min(n, len(split))).round().long()  # steps >= 1: distinct
        loader = self.eval_loader(split.subset(index))
        assert loader is not None
        return (batch.x for batch in loader.epoch(0))

    def eval_loader(self, split: ImageSet | FileSet | None) -> TensorLoader | StreamLoader | None:
        if split is None:
            return None
        return self.loader(split, self.eval_batch_size, shuffle=False, views=0)
