"""The view a student rebuilds is bit-identical to the view the teacher's cached logits were computed on."""

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from kdrun.cache import CacheShape, LogitCache, decode, encode, fill_pass
from kdrun.data.base import ImageSet
from kdrun.data.loader import Augment, Normalize, TensorLoader, epoch_plan


class Recorder(nn.Module):
    """A 'teacher' that remembers every input batch it was given."""

    def __init__(self):
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.clone())
        return torch.zeros(len(x), 3)


def test_student_batches_replay_the_cached_views_exactly(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = ImageSet(
        torch.randint(0, 256, (50, 3, 12, 12), generator=g, dtype=torch.uint8), torch.randint(0, 3, (50,), generator=g)
    )
    norm = Normalize([0.4, 0.5, 0.6], [0.2, 0.25, 0.3], 3, "cpu")
    augment = Augment(crop_pad=4, flip=True, seed=7)
    views, batch = 4, 16
    teacher = Recorder()
    cache = LogitCache.open(str(tmp_path / "c.kdlc"), CacheShape(len(data), views, 3), "k")
    fill_pass(cache, teacher, TensorLoader(data, 8, norm, augment, seed=7, views=views), batch)
    assert cache.complete
    seen = torch.cat(teacher.seen)
    # the pass walks view 0 over all images, then view 1, ...: row v * N + i holds (image i, view v)
    teacher_view = {(i, v): seen[v * len(data) + i] for v in range(views) for i in range(len(data))}
    loader = TensorLoader(data, 8, norm, augment, shuffle=True, seed=7, views=views)
    checked, distinct = 0, set()
    for epoch in range(3):
        for b in loader.epoch(epoch):
            for x, i, v in zip(b.x, b.index.tolist(), b.view.tolist()):
                assert torch.equal(x, teacher_view[(i, v)]), (epoch, i, v)
                checked += 1
                distinct.add((i, v))
    assert checked == 150 and len({v for _, v in distinct}) == views  # every view gets used
    assert not torch.equal(teacher_view[(0, 0)], teacher_view[(0, 1)])  # views really differ


class Counter(nn.Module):
    """A 'teacher' whose logits are a fixed function of the pixels; counts the images it was run on."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.proj = nn.Linear(3 * 12 * 12, classes)
        self.images = 0

    def forward(self, x):
        self.images += len(x)
        return self.proj(x.flatten(1))


def test_each_sample_cycles_through_all_cached_views_before_replaying_one():
    """K cached views over E epochs: min(E, K) distinct views per sample (at random, 20 epochs of 8 views
    would leave ~1.1 of them unseen), starting views spread over all K, and the same plan for the same seed."""
    n, k = 500, 8
    plans = torch.stack([epoch_plan(n, 3, e, True, k)[1] for e in range(2 * k + 3)])  # (epochs, samples)
    for first in (0, 5):
        window = plans[first : first + k]
        assert all(len(set(window[:, i].tolist())) == k for i in range(n))  # k epochs: each view once
    assert torch.equal(plans[k:], plans[: len(plans) - k])  # then the cycle repeats
    assert torch.bincount(plans[0], minlength=k).min() > n / k / 2  # epoch 0's views cover all k
    assert torch.equal(plans, torch.stack([epoch_plan(n, 3, e, True, k)[1] for e in range(2 * k + 3)]))
    assert not torch.equal(plans[0], epoch_plan(n, 4, 0, True, k)[1])  # another seed, other starting views


def test_first_use_runs_the_teacher_once_per_image_and_view(tmp_path):
    """The student stage's cache fills itself: the teacher runs only on (image, view) pairs not cached yet, on
    exactly the pixels of the student's batch; every later read returns those logits (fp16-rounded)."""
    from kdrun.distill import Distill
    from kdrun.losses.kd import KD

    g = torch.Generator().manual_seed(1)
    data = ImageSet(torch.randint(0, 256, (40, 3, 12, 12), generator=g, dtype=torch.uint8), torch.arange(40) % 5)
    norm = Normalize([0.5] * 3, [0.25] * 3, 3, "cpu")
    augment, views = Augment(crop_pad=2, flip=True, seed=3), 3
    teacher, student = Counter().eval(), nn.Sequential(nn.Flatten(), nn.Linear(3 * 12 * 12, 5))
    cache = LogitCache.open(str(tmp_path / "c.kdlc"), CacheShape(len(data), views, 5), "k")
    objective = Distill(KD(temperature=4.0, alpha=0.9), student, epochs=6, num_samples=40, teacher=teacher, cache=cache)
    loader = TensorLoader(data, 8, norm, augment, shuffle=True, seed=3, views=views)
    met = set()
    with objective:
        for epoch in range(6):
            for b in loader.epoch(epoch):
                met |= set(zip(b.index.tolist(), b.view.tolist()))
                got = objective.teacher_outputs(b).logits
                with torch.no_grad():
                    want = teacher.proj(b.x.flatten(1)).half().float()
                assert torch.equal(got, want)
                assert teacher.images == len(met)  # one teacher pass per distinct (image, view), never more
    assert cache.filled == len(met)
    reopened = LogitCache.open(cache.path, cache.shape, "k")  # a resumed run keeps what was filled
    assert reopened.filled == len(met)


def test_a_worker_holding_an_error_for_the_others_stores_no_logit(tmp_path, monkeypatch):
    """A data-parallel worker that deferred an error (e.g. an image it could not decode, now zeros) computes on
    until the workers' next agreement: the logits it hands the student are returned, but none enters the file."""
    from kdrun import distributed
    from kdrun.errors import ConfigError

    cache = LogitCache.open(str(tmp_path / "c.kdlc"), CacheShape(4, 0, 3), "k")
    cache.write(torch.tensor([0]), torch.tensor([0]), torch.ones(1, 3))
    monkeypatch.setattr(distributed, "_DEFERRED", [ConfigError("x.png: not a readable image")])
    got = cache.write(torch.tensor([1, 2]), torch.tensor([0, 0]), torch.full((2, 3), 2.0))
    assert torch.equal(got, torch.full((2, 3), 2.0))
    assert cache.missing().tolist() == [1, 2, 3] and cache.teacher_rows == 1
    assert LogitCache.open(cache.path, cache.shape, "k").filled == 1


def test_cache_rows_come_from_the_loaders_host_copies(tmp_path):
    """A batch carries its (index, view) in host memory too, so the cache is read without a device-to-host
    copy on a GPU: the rows looked up are those of the host copies."""
    from dataclasses import replace

    from kdrun.distill import Distill
    from kdrun.losses.kd import KD

    data = ImageSet(torch.randint(0, 256, (24, 3, 12, 12), dtype=torch.uint8), torch.arange(24) % 5)
    norm = Normalize([0.5] * 3, [0.25] * 3, 3, "cpu")
    loader = TensorLoader(data, 8, norm, Augment(crop_pad=2, flip=True, seed=3), seed=3, views=2)
    teacher, student = Counter().eval(), nn.Sequential(nn.Flatten(), nn.Linear(3 * 12 * 12, 5))
    cache = LogitCache.open(str(tmp_path / "c.kdlc"), CacheShape(len(data), 2, 5), "k")
    fill_pass(cache, teacher, loader, 8)
    objective = Distill(KD(temperature=4.0, alpha=0.9), student, epochs=1, num_samples=24, teacher=teacher, cache=cache)
    for b in loader.epoch(0):
        assert b.host is not None and torch.equal(b.host[0], b.index) and torch.equal(b.host[1], b.view)
        want = objective.teacher_outputs(b).logits
        wrong_on_device = replace(b, index=(b.index + 1) % 24, view=1 - b.view)
        assert torch.equal(objective.teacher_outputs(wrong_on_device).logits, want)
    assert torch.equal(
        next(iter(loader.batches(torch.tensor([3, 5]), torch.tensor([1, 0])))).host[0], torch.tensor([3, 5])
    )


def test_topk_rows_keep_the_largest_logits_and_the_logit_sum(tmp_path):
    from kdrun.cache import decode, encode

    logits = torch.randn(6, 100) * 3
    shape = CacheShape(6, 1, 100, topk=10)
    back = decode(encode(logits, shape), shape)
    top = logits.topk(10, dim=1)
    assert torch.equal(back.topk(10, dim=1).indices.sort(1).values, top.indices.sort(1).values)
    assert torch.allclose(back.gather(1, top.indices), top.values, atol=1e-2)  # fp16
    assert torch.allclose(back.sum(1), logits.sum(1), atol=0.1)
    rest = torch.ones_like(logits, dtype=torch.bool).scatter_(1, top.indices, False)
    tail = logits[rest].view(6, 90)
    assert torch.allclose(back[rest].view(6, 90), tail.mean(1, keepdim=True).expand(6, 90), atol=1e-2)
    assert shape.row_bytes == 10 * 2 + 10 * 2 + 2  # vs 200 bytes for the full row


def test_damaged_or_foreign_cache_file_is_replaced_by_an_empty_one(tmp_path, caplog):
    import logging
    import os

    shape = CacheShape(10, 2, 4)
    path = str(tmp_path / "c.kdlc")
    cache = LogitCache.open(path, shape, "k")
    cache.write(torch.arange(3), torch.zeros(3, dtype=torch.long), torch.ones(3, 4))
    cache.close()
    assert LogitCache.open(path, shape, "k").filled == 3
    with caplog.at_level(logging.WARNING, logger="kdrun"):
        assert LogitCache.open(path, shape, "other").filled == 0  # made for another key
        assert "key differs" in caplog.text
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - 1)
        assert LogitCache.open(path, shape, "other").filled == 0
        assert "truncated or damaged" in caplog.text


def test_rows_damaged_on_disk_fail_their_checksum(tmp_path):
    """A byte changed in a filled row's logits is found by its CRC (across the chunks it is read in); an unfilled
    row is never counted, and a forgotten row reads as missing. Workers checking their parts find them all."""
    shape = CacheShape(10, 2, 4)
    path = str(tmp_path / "c.kdlc")
    cache = LogitCache.open(path, shape, "k")
    index, view = torch.tensor([0, 3, 9, 9]), torch.tensor([0, 0, 0, 1])
    cache.write(index, view, torch.randn(4, 4))
    cache.close()
    cache = LogitCache.open(path, shape, "k")
    assert list(cache.damaged()) == []
    with open(path, "r+b") as f:
        for pos in (3, 19):  # (sample 3, view 0) and (sample 9, view 1): filled
            f.seek(shape.data_offset + pos * shape.row_bytes + 1)
            f.write(b"\x7f")
        f.seek(shape.data_offset + 5 * shape.row_bytes)  # (sample 5, view 0): not filled, so not checked
        f.write(b"\x7f")
    for chunk in (1, 3, 1 << 16):
        assert list(cache.damaged(chunk)) == [3, 19], chunk
    # data-parallel workers each check one of equal runs of rows: 20 rows in 3 parts are 0-5, 6-12, 13-19
    assert [list(cache.damaged(3, part, 3)) for part in range(3)] == [[3], [], [19]]
    assert [list(cache.damaged(1 << 16, part, 2)) for part in range(2)] == [[3], [19]]
    cache.forget(cache.damaged())
    assert cache.filled == 2 and list(cache.lookup(index, view)[1]) == [True, False, True, False]


def test_a_cache_linked_into_the_store_is_copied_before_it_is_written(tmp_path):
    import os

    shape = CacheShape(4, 1, 3)
    path, stored = str(tmp_path / "c.kdlc"), str(tmp_path / "store.kdlc")
    cache = LogitCache.open(path, shape, "k")
    cache.write(torch.arange(2), torch.zeros(2, dtype=torch.long), torch.ones(2, 3))
    cache.close()
    os.link(path, stored)
    cache = LogitCache.open(path, shape, "k")
    cache.copy_on_write()
    cache.write(torch.tensor([3]), torch.tensor([0]), torch.ones(1, 3))
    cache.flush()
    assert LogitCache.open(stored, shape, "k").filled == 2 and LogitCache.open(path, shape, "k").filled == 3


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def test_reading_a_large_cache_keeps_resident_memory_bounded(tmp_path):
    """Rows are read with positioned reads, not through a memory map: reading all of an 80 MB cache at random
    leaves the process's resident memory within a few MB (a batch and the flags), not the file's size."""
    import pytest

    if not __import__("os").path.exists("/proc/self/status"):
        pytest.skip("needs /proc")
    n, c = 40_000, 1000
    shape = CacheShape(n, 1, c)
    cache = LogitCache.open(str(tmp_path / "big.kdlc"), shape, "k")
    for start in range(0, n, 4000):
        idx = torch.arange(start, start + 4000)
        cache.write(idx, torch.zeros_like(idx), torch.full((4000, c), float(start)))
    cache.close()
    cache = LogitCache.open(cache.path, shape, "k")
    g = torch.Generator().manual_seed(0)
    cache.lookup(torch.arange(256), torch.zeros(256, dtype=torch.long))  # torch's first-call allocations
    before, peak = _rss_mb(), 0.0
    for _ in range(160):
        idx = torch.randint(0, n, (256,), generator=g)
        logits, have = cache.lookup(idx, torch.zeros_like(idx))
        assert have.all() and torch.equal(logits[:, 0], (idx // 4000 * 4000).float())
        peak = max(peak, _rss_mb() - before)
    assert peak < 16, peak  # batch temporaries; through a memory map: ~50-80 MB


def test_the_file_layout_is_view_major_and_stays_so(tmp_path):
    """Row (sample i, view v) lies at data_offset + (v * samples + i) * row_bytes: the layout of every cache in
    existing stores (format 1). A reader with another order would hand each image another image's logits."""
    shape = CacheShape(samples=3, views=2, classes=2)
    cache = LogitCache.open(str(tmp_path / "c.kdlc"), shape, "k")
    index, view = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([0, 0, 0, 1, 1, 1])
    logits = torch.stack([torch.tensor([float(10 * v + i), -1.0]) for i, v in zip(index.tolist(), view.tolist())])
    cache.write(index, view, logits)
    cache.flush()
    data = (tmp_path / "c.kdlc").read_bytes()
    for i, v in ((1, 0), (2, 1), (0, 1)):
        at = shape.data_offset + (v * shape.samples + i) * shape.row_bytes
        row = np.frombuffer(data[at : at + shape.row_bytes], np.float16)
        assert row.tolist() == [10 * v + i, -1.0]


def test_top_k_rows_hold_class_indices_past_int16(tmp_path):
    """40,000 classes: the top-k indices need int32 (int16 wraps past 32,767)."""
    shape = CacheShape(samples=1, views=0, classes=40_000, topk=3)
    logits = torch.zeros(1, 40_000)
    logits[0, [39_999, 32_768, 5]] = torch.tensor([9.0, 8.0, 7.0])
    back = decode(encode(logits, shape), shape)
    assert back[0].topk(3).indices.tolist() == [39_999, 32_768, 5]


def test_a_feature_method_says_which_cache_keys_it_does_not_use(kdrun, tmp_path):
    """A feature method runs the teacher online: cache keys set away from their defaults change nothing, and the
    run says so (a logit method with the same keys does use them, and says nothing)."""
    from kdrun.train import cache_choices

    args = ["trainer=smoke", "teacher=resnet8", "student=resnet8", "baseline=false", "store.enabled=false"]
    keys = ["cache.topk=3", "cache.fill=pass"]
    p = kdrun("train", *args, "loss=at", *keys, f"hydra.run.dir={tmp_path / 'at'}")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "student: cache.topk=3, cache.fill=pass not used: with no logit cache they change nothing" in p.stderr
    p = kdrun("train", *args, "loss=kd", *keys, f"hydra.run.dir={tmp_path / 'kd'}")
    assert p.returncode == 0 and "not used" not in p.stderr, p.stderr[-2000:]
    assert cache_choices(OmegaConf.create({"views": None, "topk": None, "fill": "first_use"})) == {}
