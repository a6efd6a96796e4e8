"""SVID computed once and reused: a safetensors file of every layer's value vectors (a, b).

SVID is deterministic for a given weight and method, so a run (and every rank of a distributed
run, and every job of a sweep that shares the model) can read it instead of recomputing it. The
file is keyed by a hash of what determines the result: the model's identity, the SVID method and
its stopping rule, and, per layer, the weight's shape; a key mismatch means a new file. Writes are
atomic (temporary file, then rename), so a killed writer never leaves half a cache behind.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from torch import Tensor

from onebit.fileio import atomic_path

# Bumped whenever the iterative methods' arithmetic or stopping rule changes, so that a cache
# written by an older version is not read as this version's result. 2: z summed in float64, stop
# on the direction of b (1: float32 z, stop on the energy).
SVID_VERSION = 2


def svid_cache_key(model_id: str, method: str, max_iter: int, tol: float) -> str:
    """A short hash naming the cache file of one model and SVID setting."""
    blob = json.dumps([model_id, method, max_iter, tol, SVID_VERSION], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class SvidCache:
    """Value vectors by layer name, loaded from and saved to ``path`` (safetensors).

    Shapes: ``get(name, out, in)`` → (a (out,), b (in,)) or None.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._data: dict[str, Tensor] = {}
        self.hits = 0
        self.dirty = False
        if self.path.is_file():
            from safetensors.torch import load_file

            try:
                self._data = load_file(self.path)
            except Exception:  # unreadable: recompute (and rewrite) rather than fail the run
                self._data = {}

    def __len__(self) -> int:
        return len(self._data) // 2

    def get(self, name: str, out_features: int, in_features: int) -> tuple[Tensor, Tensor] | None:
        a, b = self._data.get(f"{name}.a"), self._data.get(f"{name}.b")
        if a is None or b is None or a.shape != (out_features,) or b.shape != (in_features,):
            return None
        self.hits += 1
        return a, b

    def put(self, name: str, a: Tensor, b: Tensor) -> None:
        self._data[f"{name}.a"] = a.detach().float().cpu().contiguous()
        self._data[f"{name}.b"] = b.detach().float().cpu().contiguous()
        self.dirty = True

    def save(self) -> None:
        """Write atomically (only if something was added)."""
        if not self.dirty:
            return
        from safetensors.torch import save_file

        with atomic_path(self.path) as tmp:
            save_file(self._data, tmp)
        self.dirty = False


def cached_svid(cache: SvidCache | None, name: str, weight: Tensor, compute) -> tuple:
    """``compute()`` unless ``cache`` has ``name`` for this weight's shape; stores new results."""
    if cache is not None:
        hit = cache.get(name, *weight.shape)
        if hit is not None:
            return tuple(t.to(weight.device) for t in hit)
    a, b = compute()
    if cache is not None:
        cache.put(name, a, b)
    return a, b


__all__ = ["SvidCache", "cached_svid", "svid_cache_key"]
