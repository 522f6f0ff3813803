"""The view a student rebuilds is bit-identical to the view the teacher's cached logits were computed on."""

import torch
from torch import nn

from kdrun.cache import build_logit_cache
from kdrun.data.base import ImageSet
from kdrun.data.loader import Augment, Normalize, TensorLoader


class Recorder(nn.Module):
    """A 'teacher' that remembers every input batch it was given."""

    def __init__(self):
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.clone())
        return torch.zeros(len(x), 3)


def test_student_batches_replay_the_cached_views_exactly():
    g = torch.Generator().manual_seed(0)
    data = ImageSet(
        torch.randint(0, 256, (50, 3, 12, 12), generator=g, dtype=torch.uint8), torch.randint(0, 3, (50,), generator=g)
    )
    norm = Normalize([0.4, 0.5, 0.6], [0.2, 0.25, 0.3], 3, "cpu")
    augment = Augment(crop_pad=4, flip=True, seed=7)
    views, batch = 4, 16
    teacher = Recorder()
    build_logit_cache(teacher, data, norm, augment, views, batch, "cpu")
    seen = torch.cat(teacher.seen[1:])  # the first call only probes the class count
    # the cache walks view 0 over all images, then view 1, ...: row v * N + i holds (image i, view v)
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
