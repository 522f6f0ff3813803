"""scikit-learn's bundled 8x8 handwritten digits: the embedded default (no download)."""

from __future__ import annotations

import torch

from kdrun.data.base import DataBundle, ImageSet, register_dataset, tensor_digest


@register_dataset("digits")
def digits(test_fraction: float = 0.2, split_seed: int = 0, **_) -> DataBundle:
    """1,797 real 8x8 grey digits, values 0..16 scaled to uint8, stratified seeded split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(d.images).float().mul(255.0 / 16.0).round().to(torch.uint8)[:, None]
    labels = torch.from_numpy(d.target).long()
    g = torch.Generator().manual_seed(split_seed)
    test_idx = []
    for c in range(10):  # stratified: the same fraction of every class goes to test
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        test_idx.append(idx[: round(len(idx) * test_fraction)])
    test_mask = torch.zeros(len(labels), dtype=torch.bool)
    test_mask[torch.cat(test_idx)] = True
    train, test = ImageSet(images[~test_mask], labels[~test_mask]), ImageSet(images[test_mask], labels[test_mask])
    ident = f"digits-{tensor_digest(images, labels)}-tf{test_fraction}-s{split_seed}"
    pixels = "scikit-learn's 0..16 grey values x 255/16, rounded to uint8"
    return DataBundle("digits", train, test, [str(i) for i in range(10)], ident, pixels)
