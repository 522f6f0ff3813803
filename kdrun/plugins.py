"""A user's own models, KD methods and schemes from outside the package.

``plugins=[module, ...]`` names modules imported before anything is built: their ``@register_model``,
``@register_loss`` and ``@register_scheme`` decorators add to kdrun's registries, as the package's own modules do.
Modules are found on ``PYTHONPATH`` and in the folder the run was launched from; every process that builds a model
imports them (the command's check, each sweep job and its workers, ``kdrun export`` from the run's record).
"""

from __future__ import annotations

import importlib
import os
import sys

from kdrun.errors import ConfigError


def load(modules, launch_dir: str | None = None) -> None:
    """Import each module of ``modules`` (the ``plugins`` config value; once per process, as every import); a
    ConfigError (one line) names a module that cannot be found or fails to import."""
    if not modules:
        return
    names = [modules] if isinstance(modules, str) else list(modules)
    if not all(isinstance(n, str) and n.strip() for n in names):
        raise ConfigError(f"plugins={names}: must be a list of module names, e.g. plugins=[mymodels]")
    where = os.path.abspath(launch_dir or os.getcwd())
    if where not in sys.path:
        sys.path.append(where)  # after PYTHONPATH and the installed packages: a plugin never shadows them
    for name in names:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and (name == e.name or name.startswith(e.name + ".")):
                raise ConfigError(f"plugins: no module '{name}' on PYTHONPATH or in {where}") from e
            raise ConfigError(f"plugins: {name} imports '{e.name}', which is not installed") from e
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 (the user's module failed: one line; HYDRA_FULL_ERROR=1 shows where)
            raise ConfigError(
                f"plugins: importing {name} failed ({type(e).__name__}: {e}); HYDRA_FULL_ERROR=1 shows where"
            ) from e
