"""The run's logit caches (:mod:`kdrun.cache`): one per teacher that teaches from cached logits.

:meth:`LogitCaches.open` gives the cache of a teacher on the student's transfer set: this run's file
(resumed), else the artifact store's entry (a partly filled one is copied and filled further), else a new
empty file; ``cache.fill=pass`` fills it at once. After the student stage, :meth:`LogitCaches.publish`
records how full it is and puts it in the store when it holds more rows than the store's entry.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
from omegaconf import DictConfig

from kdrun import distributed
from kdrun.cache import FORMAT, SUFFIX, CacheShape, LogitCache, fill_pass
from kdrun.run_data import RunData
from kdrun.stages import StageLog
from kdrun.store import Store, StoreRefs, key_of, link_into
from kdrun.teachers import Teacher

log = logging.getLogger("kdrun")


@dataclass
class CacheUse:
    """A logit cache in use by this run: its store key and recipe; ``damaged_entry``: the creation time of
    a damaged store entry found for that key (replaced when the run publishes its own)."""

    cache: LogitCache
    key: str
    recipe: dict
    damaged_entry: float | None = None


def stage_name(teacher: Teacher) -> str:
    """The key of a cache's facts in ``metrics.json`` ``stages``: ``cache``, or ``cache_<teacher>``."""
    return f"cache_{teacher.name}" if teacher.name != "teacher" else "cache"


class LogitCaches:
    def __init__(
        self, cfg: DictConfig, data: RunData, log_: StageLog, run_dir: str, store: Store | None, refs: StoreRefs
    ):
        self.cfg, self.data, self.log, self.run_dir, self.store, self.refs = cfg, data, log_, run_dir, store, refs
        self.open_caches: dict[str, CacheUse] = {}  # teacher name -> its cache

    def recipe(self, teacher: Teacher, shape: CacheShape) -> dict:
        """Everything that determines the cache's rows (its artifact-store key)."""
        d, ds = self.data, self.cfg.dataset
        # the autocast of the teacher's forward that fills the rows (a teacher.checkpoint's key does not hold it);
        # only when not fp32, so the caches stored before keep their keys
        precision = teacher.precision or self.cfg.trainer.get("precision", "fp32")
        forward = {"teacher_precision": precision} if precision != "fp32" else {}
        return {
            "teacher": teacher.key,
            # a stored teacher's weights by their contents (the recipe's key alone paired a rebuilt entry's teacher
            # with the logits of the one before)
            **({"teacher_weights": teacher.weights_sha256} if teacher.weights_sha256 else {}),
            **forward,
            "format": FORMAT,
            "data": d.data.content_key(),
            "train": len(d.train_set),
            "views": d.views,
            "topk": shape.topk,
            "student_fraction": float(ds.get("student_fraction", 1.0)),
            "student_exclude": sorted(ds.get("student_exclude") or []),
            "augment": [*d.augment_key(d.augment), d.augment.seed],
            "normalize": [list(ds.mean), list(ds.std)],
        }

    def open(self, teacher: Teacher) -> LogitCache:
        d, ccfg = self.data, self.cfg.cache
        topk = ccfg.get("topk")
        shape = CacheShape(len(d.student_set), d.views, d.num_classes, int(topk) if topk else None)
        path = os.path.join(self.run_dir, f"{teacher.name}_logits{SUFFIX}")
        recipe = self.recipe(teacher, shape)
        ckey = key_of(recipe)
        source, damaged = "run", None
        if distributed.is_main():
            if self.store is not None and teacher.key is not None:
                self.refs.note("logits", ckey)
                if not os.path.exists(path):
                    with self.store.lock("logits", ckey):
                        entry = self.store.get("logits", ckey)
                        if entry is not None:
                            link_into(entry.file(f"logits{SUFFIX}"), path)
                            source = "store"
                        elif (bad := self.store.inspect("logits", ckey, verify=False)) is not None:
                            damaged = bad.created  # reported by get(); replaced when this run publishes
            cache = LogitCache.open(path, shape, ckey)
        distributed.barrier()
        if not distributed.is_main():
            cache = LogitCache.attach(path, shape, ckey)
        # each row's CRC, unless the file was just taken from a store entry whose SHA-256 get() checked; every
        # worker checks its share of the rows, so a large cache is read in parallel and no worker waits alone
        if distributed.shared(lambda: source != "store"):
            rank, workers = distributed.world()
            broken = np.concatenate(distributed.gathered(cache.damaged(part=rank, parts=workers)))
            if distributed.is_main() and len(broken):
                shared = os.stat(path).st_nlink > 1  # the store entry's own file, damaged with it
                log.warning(
                    "logit cache %s: %d of %d filled rows fail their checksum (damaged on disk%s); marked empty, "
                    "the teacher computes them again where a stage reads them",
                    path,
                    len(broken),
                    cache.filled,
                    ", with the store entry that shares the file" if shared else "",
                )
                if shared and self.store is not None and (entry := self.store.inspect("logits", ckey, verify=False)):
                    damaged = entry.created  # replaced when this run publishes
                cache.copy_on_write()
                cache.forget(broken)
        if distributed.is_main() and not cache.complete:
            cache.copy_on_write()  # never write into a file the store holds
        distributed.barrier()
        if not distributed.is_main():  # rank 0 may have given the run its own copy of the file meanwhile
            cache.close()
            cache = LogitCache.attach(path, shape, ckey)
        filled = cache.filled
        log.info(
            "cache: %s (%s), %d of %d rows filled (%d images x %s%s)",
            path,
            source if filled else "new",
            filled,
            shape.rows,
            shape.samples,
            f"{shape.views} views" if shape.views else "1 view, the plain images",
            f", top {shape.topk} logits" if shape.topk else "",
        )
        info = {"source": source, "filled_before": filled, "seconds": 0.0, "fill": ccfg.get("fill")}
        # rank 0's answer for all: another rank may already be writing rows when a rank looks for itself
        if ccfg.get("fill") == "pass" and not distributed.shared(lambda: cache.complete):
            precision = teacher.precision or self.cfg.trainer.get("precision", "fp32")
            loader = d.train_loader(d.views, d.student_set)  # the student stage's views, from memory or files
            info["seconds"] = fill_pass(cache, teacher.model, loader, d.eval_batch_size, precision)
            log.info("cache: filled %d rows in one pass in %.1fs", shape.rows - filled, info["seconds"])
            self.log.add_seconds("cache", info["seconds"])
        self.open_caches[teacher.name] = CacheUse(cache, ckey, recipe, damaged)
        self.log.summaries[stage_name(teacher)] = info | cache.info() | {"views": d.views}
        return cache

    def publish(self, teacher: Teacher) -> None:
        """After a student stage: note how full the cache of ``teacher`` is, and publish it to the store when
        it holds more rows than the store's entry (rows written by every rank: flushed before the barrier)."""
        use = self.open_caches[teacher.name]
        cache, ckey = use.cache, use.key
        cache.flush()
        distributed.barrier()
        info = self.log.summaries[stage_name(teacher)]
        rows = sum(distributed.gathered(cache.teacher_rows))  # the rows every worker's teacher computed
        info |= cache.info() | {"teacher_rows": info.get("teacher_rows", 0) + rows}
        cache.teacher_rows = 0
        if self.store is None or teacher.key is None or not distributed.is_main():
            return
        with self.store.lock("logits", ckey):
            entry = self.store.inspect("logits", ckey, verify=False)
            stored = -1  # rows in a sound store entry (-1: none, or the damaged one this run found)
            if entry is not None and entry.problem is None and entry.created != use.damaged_entry:
                stored = entry.recipe.get("filled", 0)
            if cache.filled > max(stored, 0):  # an empty cache (a finished run run again without it) is no entry
                files = {f"logits{SUFFIX}": cache.path}
                entry = self.store.publish("logits", ckey, files, use.recipe | {"filled": cache.filled}, link=True)
                log.info("cache: stored as %s (%d of %d rows)", entry.path, cache.filled, cache.shape.rows)
