"""What one ``make figures`` run shares between its notebooks: a folder, and the fingerprint of weights that keys it.

``make figures`` and ``make verify`` name a folder of their own run in ``$MECHFIN_SCORE_CACHE`` (under
``figures/.staging/``, removed when the run ends); nothing else sets it, so a notebook run by hand, the tests and every
other caller compute everything. Two kinds of result are shared there, each by the module that computes it:

* logit differences of plain forward passes (:mod:`mechfin_utils.screener.score_cache`): notebooks 08 and 12 judge
  the same screener on the same held-out sets, notebook 00 the same paper-style pairs;
* the final residual states of node-ablated runs (:class:`mechfin_utils.methods.circuits.nodes.NodeAblator`):
  notebooks 05 and 10 prune greater-than on the same eight prompts.

Every entry is keyed by :func:`weights_fingerprint` (so a fine-tuned, edited or differently loaded model never reads
another's results) and by its exact inputs (token ids), and written whole (:func:`~mechfin_utils.core.paths.write_atomically`), so
two notebooks writing at once never leave a half-written entry.
"""

from __future__ import annotations

import hashlib
import io
import os
import weakref
from pathlib import Path

import torch

from mechfin_utils.core.models import tensor_bytes
from mechfin_utils.core.paths import write_atomically

SCORE_CACHE_ENV = "MECHFIN_SCORE_CACHE"
"""The folder of this run's shared results; unset (the default): no sharing."""

_FINGERPRINTS: weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, str]] = weakref.WeakKeyDictionary()


def weights_fingerprint(module: torch.nn.Module) -> str:
    """The sha256 of every parameter and buffer of ``module`` (names, shapes, dtypes and bytes), as they are now.

    Hashing 135M parameters takes about half a second, so it is remembered per module and recomputed only when a
    tensor was replaced or changed in place (torch counts in-place writes in each tensor's ``_version``)."""
    tensors = list(module.state_dict(keep_vars=True).items())
    state = tuple((name, t.data_ptr(), t._version) for name, t in tensors)
    remembered = _FINGERPRINTS.get(module)
    if remembered is not None and remembered[0] == state:
        return remembered[1]
    digest = hashlib.sha256()
    for name, tensor in tensors:
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor_bytes(tensor))
    _FINGERPRINTS[module] = (state, digest.hexdigest())
    return digest.hexdigest()


def run_cache_folder() -> Path | None:
    """The folder ``$MECHFIN_SCORE_CACHE`` names, else None (no sharing)."""
    folder = os.environ.get(SCORE_CACHE_ENV, "").strip()
    return Path(folder) if folder else None


def load_tensor(path: Path) -> torch.Tensor | None:
    """The tensor stored at ``path`` by :func:`store_tensor`, or None if there is none."""
    return torch.load(path, weights_only=True) if path.is_file() else None


def store_tensor(path: Path, tensor: torch.Tensor) -> None:
    """Store ``tensor`` (detached, on the CPU, bit for bit) at ``path``, written whole
    (:func:`~mechfin_utils.core.paths.write_atomically`)."""
    buffer = io.BytesIO()
    torch.save(tensor.detach().cpu().clone(), buffer)
    write_atomically(path, buffer.getvalue())


__all__ = [
    "SCORE_CACHE_ENV",
    "load_tensor",
    "run_cache_folder",
    "store_tensor",
    "weights_fingerprint",
]
