"""Distillation schemes: each module registers one function ``fn(run)`` by name (``scheme=NAME``).

A scheme combines the building blocks of :class:`kdrun.train.Run` (``teacher``,
``distil``, ``ce_model``) and sets ``run.roles`` (teacher, student, baseline) so
the report knows which model plays which part.
"""
from kdrun.registry import Registry

SCHEMES = Registry("scheme", "scheme.name")
register_scheme = SCHEMES.register

from kdrun.schemes import assistant, offline, online, self_distill  # noqa: E402,F401  (registers)
