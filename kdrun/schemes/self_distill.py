"""Self-distillation as born-again networks (Furlanello et al. 2018, "Born Again Neural Networks").

Generation 1 is the student architecture trained with CE alone; generation
k + 1 has the same architecture, is initialised afresh (from ``trainer.seed + k``, as each of the paper's
generations is a new network) and is distilled from generation k with the
configured KD method, for ``scheme.generations`` generations in all. The last
generation is reported as the student, generation 1 (trained on the images and views the distilled
generations see: the logit cache's replayed views, or fresh ones) as the baseline, and every
generation's accuracy is in ``metrics.json`` (``test.gen1`` ...). The
configured ``teacher`` is not used.
"""

from kdrun.errors import ConfigError
from kdrun.schemes import note_unused, register_scheme
from kdrun.train import Roles


@register_scheme("self", pairs=lambda cfg: [("student", cfg.student, "student", cfg.student)])
def self_distill(run) -> Roles:
    n = int(run.cfg.scheme.generations)
    if n < 2:
        raise ConfigError(f"scheme.generations={n}: must be an integer >= 2 (generation 1 is trained with CE)")
    note_unused(run, "self")
    mcfg = run.cfg.student
    prev = run.ce_model("gen1", mcfg, views=run.distil_views())  # the baseline: the students' images and views
    for k in range(2, n + 1):
        prev = run.distil("student" if k == n else f"gen{k}", mcfg, prev, seed_offset=k - 1)
    return Roles(student="student", teacher="gen1" if n == 2 else f"gen{n - 1}", baseline="gen1")
