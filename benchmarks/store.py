"""A resumable cache of finished stages: each keyed by a hash of the recipe that produced it.

A recipe is a JSON-able dict naming everything that determines a stage's output (its schedule, seed,
the keys of the stages it builds on, `RECIPE_VERSION`); a changed recipe is a new key, so a stale
result is never reused. Results are written atomically (temp file or folder, then rename): a run
killed mid-stage leaves only complete entries behind, and the next run resumes from them.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from fusion_llm import paths

RECIPE_VERSION = 1  # bump when a stage's code changes what it produces


def recipe_key(kind: str, recipe: dict) -> str:
    digest = hashlib.sha256(json.dumps({"kind": kind, "v": RECIPE_VERSION, **recipe}, sort_keys=True,
                                       default=str).encode()).hexdigest()
    return f"{kind}-{digest[:12]}"


def write_json_atomic(path: Path, value) -> None:
    """A stage's JSON, atomically (`fusion_llm.paths.write_json_atomic`; numbers that JSON cannot hold as floats)."""
    paths.write_json_atomic(path, value, default=float)


class Store:
    """Finished stages under ``root``: ``<key>.json`` records and ``<key>/`` model folders.

    Args:
        root: the cache folder (``results/compare_merges/<preset>/cache``).
        enabled: when False nothing is read back (every stage recomputes), though results are still written.
        log: progress lines.
    """

    def __init__(self, root: str | Path, enabled: bool = True, log=print):
        self.root = Path(root)
        self.enabled = enabled
        self.log = log
        self.started = time.perf_counter()
        self.hits = 0
        self.misses = 0

    def folder(self, kind: str, recipe: dict) -> Path:
        """Where a stage that produces a model folder keeps it."""
        return self.root / recipe_key(kind, recipe)

    def get(self, kind: str, recipe: dict) -> dict | None:
        path = self.root / f"{recipe_key(kind, recipe)}.json"
        if not self.enabled or not path.is_file():
            return None
        return json.loads(path.read_text())

    def put(self, kind: str, recipe: dict, value: dict) -> dict:
        write_json_atomic(self.root / f"{recipe_key(kind, recipe)}.json", {"recipe": recipe, **value})
        return value

    def stage(self, kind: str, recipe: dict, label: str, compute, needs: Path | None = None) -> dict:
        """The cached record of a stage, or ``compute()`` stored under its recipe; one line of progress.

        Args:
            needs: a folder the stage writes (a model); a record whose folder is gone is recomputed.
        """
        cached = self.get(kind, recipe)
        if cached is not None and needs is not None and not Path(needs).is_dir():
            cached = None
        elapsed = time.perf_counter() - self.started
        if cached is not None:
            self.hits += 1
            self.log(f"[{elapsed:7.1f}s] {label}: cached ({recipe_key(kind, recipe)})")
            cached.pop("recipe", None)
            return cached
        self.misses += 1
        self.log(f"[{elapsed:7.1f}s] {label} ...")
        start = time.perf_counter()
        value = compute()
        self.put(kind, recipe, value)
        self.log(f"[{time.perf_counter() - self.started:7.1f}s] {label}: done in {time.perf_counter() - start:.1f}s")
        return value
