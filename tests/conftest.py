"""Shared fixtures: each model is loaded once per test session.

HF_HOME is pointed at a session-private folder *before* anything imports huggingface_hub, so that the
GPT-2 fixture can lay out a Hugging Face cache there and load it with the exact call a real user makes
(``load_model("gpt2")``). A user's own MECHFIN_GPT2_PATH must not leak into the tests.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_SESSION_HF_HOME = Path(tempfile.mkdtemp(prefix="mechfin-test-hf-"))
os.environ["HF_HOME"] = str(_SESSION_HF_HOME)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.pop("MECHFIN_GPT2_PATH", None)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_grad_enabled(True)

BATCH_SPLIT_THREADS = (1, 2)
"""Torch thread counts every ``batch_split`` test runs under. ``make test`` gives each worker one thread; matrix
products split over two threads sum in another order, as another CPU's kernels do, so a tolerance that only holds
for one summation order fails here rather than on a user's machine."""


def pytest_generate_tests(metafunc):
    if metafunc.definition.get_closest_marker("batch_split") is not None:
        metafunc.fixturenames.append("torch_threads")
        metafunc.parametrize("torch_threads", BATCH_SPLIT_THREADS, indirect=True, ids=lambda n: f"threads{n}")


@pytest.fixture
def torch_threads(request):
    """Run the test with ``request.param`` torch threads, then restore the worker's own count."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    try:
        yield request.param
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def session_hf_home() -> Path:
    return _SESSION_HF_HOME


@pytest.fixture(scope="session")
def gpt2_hf_cache(session_hf_home: Path) -> Path:
    """A Hugging Face cache (in HF_HOME) holding random-init GPT-2 Small weights + the genuine tokenizer."""
    from mechfin_utils.tooling.testing import write_gpt2_hf_cache

    if not (session_hf_home / "hub" / "models--gpt2").exists():
        write_gpt2_hf_cache(session_hf_home, seed=0)
    return session_hf_home


@pytest.fixture(scope="session")
def smollm2():
    """The embedded model, SmolLM2-135M-Instruct (genuine pretrained weights)."""
    from mechfin_utils.core.models import load_model

    return load_model("smollm2-135m", verbose=False)


@pytest.fixture(scope="session")
def gpt2_random(gpt2_hf_cache):
    """GPT-2 Small *shape* with random weights, loaded through the real GPT-2 path. Test-only numbers."""
    from mechfin_utils.core.models import load_model

    return load_model("gpt2", verbose=False)


@pytest.fixture(scope="session", params=["smollm2", "gpt2_random"])
def any_model(request):
    """Parametrises a test over the embedded model and the GPT-2-shape model."""
    return request.getfixturevalue(request.param)


# --- Added for tests/test_dla.py and tests/test_attention.py ------------------------------------------------


@pytest.fixture(scope="session")
def gpt2_random_biased_folder(tmp_path_factory) -> Path:
    """A GPT-2 Small-shape checkpoint folder with random weights that behave less like a freshly
    initialised model.

    Freshly initialised GPT-2 has every bias 0, every LayerNorm gain 1, near-uniform attention and almost
    the same output for any prompt: code that mishandles b_O, b_V, b_U or the LayerNorms would pass on it
    unnoticed (the compatibility mode folds LayerNorms into the next weights, so this matters), and a
    patching metric normalised by the clean-corrupted gap would divide by ~0. Here biases and LayerNorm
    parameters are random and every weight matrix is scaled by 3 (init std 0.06): attention heads are
    peaked (mean top weight ~0.4) and the test prompts' logit differences differ by ~0.3-0.9.
    """
    from mechfin_utils.tooling.testing import roughen_gpt2_checkpoint, write_gpt2_checkpoint

    folder = write_gpt2_checkpoint(tmp_path_factory.mktemp("gpt2-random-biased"), seed=0)
    roughen_gpt2_checkpoint(folder, seed=1, weight_scale=3.0)
    return folder


@pytest.fixture(scope="session")
def gpt2_random_biased(gpt2_random_biased_folder):
    """The random-bias GPT-2-shape model through the GPT-2 folder path (``load_model("gpt2", gpt2_path=...)``)."""
    from mechfin_utils.core.models import load_model

    return load_model("gpt2", gpt2_path=gpt2_random_biased_folder, verbose=False)


@pytest.fixture(scope="session")
def unprocessed_hf_reference(request):
    """``get(fixture_name)``: the same checkpoint as a model fixture, loaded as a plain Hugging Face model.

    The bridge's compatibility mode folds and centres weights *in place* (so ``LoadedModel.hf_model`` is
    the processed model); tests that want an independent reference need the original weights. Loaded
    once per name, with eager attention so that ``output_attentions=True`` works. Names: ``smollm2``,
    ``gpt2_random``, ``gpt2_random_biased``.
    """
    from transformers import AutoModelForCausalLM

    from mechfin_utils.core.models import prepare_smollm2

    loaded: dict[str, torch.nn.Module] = {}

    def get(name: str) -> torch.nn.Module:
        if name not in loaded:
            if name == "smollm2":
                source = prepare_smollm2(verbose=False)
            elif name == "gpt2_random":
                request.getfixturevalue("gpt2_hf_cache")
                source = "gpt2"
            elif name == "gpt2_random_biased":
                source = request.getfixturevalue("gpt2_random_biased_folder")
            else:
                raise KeyError(f"no unprocessed reference for fixture {name!r}")
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, attn_implementation="eager")
            loaded[name] = model.eval()
        return loaded[name]

    return get


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    """The genuine GPT-2 tokenizer (no weights needed), from .cache/gpt2-tokenizer (checksums verified)."""
    from transformers import GPT2TokenizerFast

    from mechfin_utils.tooling.testing import gpt2_tokenizer_dir

    return GPT2TokenizerFast.from_pretrained(gpt2_tokenizer_dir())


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer alone (read from the converted checkpoint, no model loaded)."""
    from transformers import AutoTokenizer

    from mechfin_utils.core.models import prepare_smollm2

    return AutoTokenizer.from_pretrained(prepare_smollm2(verbose=False))


@pytest.fixture(scope="session")
def hold_through_bridge_hooks():
    """The reference for components held at the last position (notebook 12's mean ablation): bridge hooks that
    overwrite each component's output at ``[:, -1]``, as a context manager (the bench's earlier path)."""
    from mechfin_utils.tooling.bench.behaviour_scoring import held_through_bridge_hooks

    return held_through_bridge_hooks
