"""Print a markdown table of every registered model at 32x32, 3 channels, 100 classes.

Columns: parameters and forward FLOPs (one image; a multiply-add counts 2) in millions, and the
published parameter count where one is known (kdrun.models.published).

    python scripts/model_table.py
"""

from __future__ import annotations

from kdrun.models import MODELS, build_model
from kdrun.models.published import PUBLISHED_PARAMS_M
from kdrun.models.report import count_flops, count_params

SHAPE, CLASSES = (3, 32, 32), 100


def main() -> None:
    print("| model | family | params (M) | FLOPs (M) | published params (M) |")
    print("|---|---|---:|---:|---:|")
    for name in MODELS.names():
        model = build_model(name, CLASSES, SHAPE[0], SHAPE[1])
        published = PUBLISHED_PARAMS_M.get(name)
        family = MODELS.get(name).__module__.rsplit(".", 1)[-1]
        print(
            f"| {name} | {family} | {count_params(model) / 1e6:.2f} | {count_flops(model, SHAPE) / 1e6:.1f} | "
            f"{'' if published is None else f'{published:.2f}'} |"
        )


if __name__ == "__main__":
    main()
