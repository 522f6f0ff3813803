"""What the pre-run check of a feature KD method costs (kdrun.config.check_method_fits): building the teacher, the
student and the method on their feature shapes, on PyTorch's meta device (as kdrun does) against on the CPU.

    python scripts/bench_method_check.py [--teacher resnet50 --student resnet18 --size 224 --classes 1000]

Prints one row per feature method: seconds on meta, seconds on the CPU, and whether the check passes.
"""

from __future__ import annotations

import argparse
import time

import torch

from kdrun.distill import probe_shapes
from kdrun.errors import ConfigError
from kdrun.losses import LOSSES
from kdrun.models import build_model
from kdrun.models.registry import feature_points


def check(method_name: str, teacher: str, student: str, size: int, classes: int, device: str) -> tuple[float, str]:
    """Seconds of one check of ``method_name`` for the pair on ``device``, and its outcome."""
    t0 = time.perf_counter()
    outcome = "fits"
    try:
        with torch.device(device):
            t_net, s_net = (build_model(m, classes, 3, size, key=m) for m in (teacher, student))
            x = torch.zeros(2, 3, size, size)
            method = LOSSES.get(method_name)()
            method.teacher_layers, method.student_layers = method.default_layers(
                list(feature_points(t_net)), list(feature_points(s_net))
            )
            method.build(
                probe_shapes(t_net, method.teacher_layers, x), probe_shapes(s_net, method.student_layers, x), 2
            )
            method.bind_teacher(t_net)
    except ConfigError:
        outcome = "refused"
    except (RuntimeError, NotImplementedError) as e:  # a value read from meta weights: kdrun ends the check there
        if "meta" not in str(e):
            raise
    return time.perf_counter() - t0, outcome


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="resnet50")
    ap.add_argument("--student", default="resnet18")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--classes", type=int, default=1000)
    a = ap.parse_args()
    names = [n for n in LOSSES.names() if n != "combo" and LOSSES.get(n)().needs_teacher_features]
    print(f"{a.teacher} -> {a.student}, {a.size} px, {a.classes} classes, {torch.get_num_threads()} threads")
    print(f"{'method':<10} {'meta s':>7} {'cpu s':>7}  outcome")
    for name in names:
        meta, outcome = check(name, a.teacher, a.student, a.size, a.classes, "meta")
        cpu, _ = check(name, a.teacher, a.student, a.size, a.classes, "cpu")
        print(f"{name:<10} {meta:7.2f} {cpu:7.2f}  {outcome}")


if __name__ == "__main__":
    main()
