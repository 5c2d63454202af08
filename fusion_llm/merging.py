"""A thin wrapper over mergekit 0.1.5: merge experts in memory or from disk, never re-implemented here.

Two entry points, both mergekit's own code paths:

- `merge_in_memory` calls ``mergekit.merge_methods.merge_state_dicts`` (fast; used to search merge
  hyper-parameters);
- `merge_from_disk` writes a `MergeConfiguration` recipe (YAML) and runs ``mergekit.merge.run_merge``
  on ``from_pretrained`` folders, producing a loadable merged model (the one that is measured).

When mergekit refuses (e.g. experts of different architectures), `MergeRefused` carries mergekit's
own message unchanged.

Parameters (mergekit's names): ``weight`` (per expert: a number, or a mapping expert -> number),
``density`` (fraction of a task vector kept by ties / dare_*), ``lambda`` (scale of the merged task
vector), ``normalize``, ``rescale``. ``linear`` takes no base; the others merge task vectors
(expert - base) and need the shared base.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from fusion_llm.errors import MergeRefused

MERGE_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear")
NEEDS_BASE = frozenset({"task_arithmetic", "ties", "dare_ties", "dare_linear"})
PER_EXPERT = ("weight", "density")  # mergekit's per-input parameters; the rest are shared


def check_method(method: str, has_base: bool) -> None:
    if method not in MERGE_METHODS:
        raise ValueError(f"unknown merge method {method!r}; known: {', '.join(MERGE_METHODS)}")
    if method in NEEDS_BASE and not has_base:
        raise ValueError(f"merge method {method!r} merges task vectors and needs the shared base model")
    if method == "linear" and has_base:
        raise ValueError("merge method 'linear' averages the experts themselves; give no base")


def _per_expert(value: Any, names: list[str]) -> Any:
    """A scalar stays a scalar (mergekit broadcasts it); a sequence becomes ``{expert: value}``."""
    if isinstance(value, Mapping):
        return {name: float(value[name]) for name in names}
    if isinstance(value, (list, tuple)):
        if len(value) != len(names):
            raise ValueError(f"{len(value)} values for {len(names)} experts")
        return dict(zip(names, map(float, value)))
    return value


def merge_in_memory(
    experts: Mapping[str, Mapping[str, torch.Tensor] | torch.nn.Module],
    method: str,
    parameters: Mapping[str, Any] | None = None,
    *,
    base: Mapping[str, torch.Tensor] | torch.nn.Module | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Merge experts' weights with ``mergekit.merge_methods.merge_state_dicts``.

    Args:
        experts: expert name -> state dict (or module); all of one architecture.
        method: one of `MERGE_METHODS`.
        parameters: mergekit parameters (see the module docstring); ``weight`` defaults to 1.
        base: the shared base the experts were fine-tuned from (task-vector methods only).
        seed: seeds the random drops of ``dare_*`` (the caller's RNG state is left untouched).

    Returns:
        The merged state dict (new tensors).
    """
    check_method(method, base is not None)
    from mergekit.merge_methods import merge_state_dicts

    names = list(experts)
    params = {"weight": 1.0, **(parameters or {})}
    params = {k: _per_expert(v, names) if k in PER_EXPERT else v for k, v in params.items()}
    models = dict(experts)
    if base is not None:
        if "__base__" in models:
            raise ValueError("an expert may not be named '__base__'")
        models = {"__base__": base, **models}
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        try:
            return merge_state_dicts(models, method, parameters=params, base="__base__" if base is not None else None)
        except (RuntimeError, ValueError) as err:
            raise MergeRefused(str(err)) from err


def merge_recipe(
    experts: Mapping[str, str | Path],
    method: str,
    parameters: Mapping[str, Any] | None = None,
    *,
    base: str | Path | None = None,
    dtype: str = "float32",
) -> dict:
    """The mergekit YAML recipe (a plain dict) merging ``from_pretrained`` folders.

    Args:
        experts: expert name -> model folder.
        method, parameters, base: as `merge_in_memory` (base is a folder here).
        dtype: mergekit's compute / output dtype.
    """
    check_method(method, base is not None)
    names = list(experts)
    params = {"weight": 1.0, **(parameters or {})}
    per_input = {k: _per_expert(v, names) for k, v in params.items() if k in PER_EXPERT}
    shared = {k: v for k, v in params.items() if k not in PER_EXPERT}
    models = []
    for name in names:
        own = {k: (v[name] if isinstance(v, dict) else v) for k, v in per_input.items()}
        models.append({"model": str(experts[name]), "parameters": own})
    recipe = {"merge_method": method, "models": models, "dtype": dtype}
    if base is not None:
        recipe["base_model"] = str(base)
    if shared:
        recipe["parameters"] = shared
    return recipe


@contextlib.contextmanager
def _quiet():
    """mergekit logs warnings and progress bars for every merge; keep a benchmark's output readable."""
    level = logging.getLogger("mergekit").level
    logging.getLogger("mergekit").setLevel(logging.ERROR)
    try:
        yield
    finally:
        logging.getLogger("mergekit").setLevel(level)


def merge_from_disk(recipe: Mapping, out_dir: str | Path, *, seed: int = 0, allow_crimes: bool = False) -> Path:
    """Run ``mergekit.merge.run_merge`` on a recipe (see `merge_recipe`); writes ``out_dir``.

    The recipe is validated as mergekit's ``MergeConfiguration`` and saved beside the merged model
    as ``mergekit_config.yml``. The tokenizer is copied from the base (or first) model.

    Args:
        recipe: the mergekit YAML recipe as a dict.
        out_dir: where the merged ``from_pretrained`` folder goes.
        seed: mergekit's ``random_seed`` (dare_* drops).
        allow_crimes: mergekit's option to attempt mixing architectures.

    Returns:
        ``out_dir``.

    Raises:
        MergeRefused: mergekit refused (its message unchanged), e.g. for mixed architectures.
    """
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate(dict(recipe))
    options = MergeOptions(random_seed=seed, allow_crimes=allow_crimes, quiet=True, write_model_card=False,
                           copy_tokenizer=True)
    out_dir = Path(out_dir)
    with _quiet():
        try:
            run_merge(config, str(out_dir), options)
        except (RuntimeError, ValueError, KeyError) as err:
            raise MergeRefused(str(err)) from err
    (out_dir / "mergekit_config.yml").write_text(yaml.safe_dump(dict(recipe), sort_keys=False))
    return out_dir
