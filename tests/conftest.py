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


@pytest.fixture(scope="session")
def session_hf_home() -> Path:
    return _SESSION_HF_HOME


@pytest.fixture(scope="session")
def gpt2_hf_cache(session_hf_home: Path) -> Path:
    """A Hugging Face cache (in HF_HOME) holding random-init GPT-2 Small weights + the genuine tokenizer."""
    from mechfin_utils.testing import write_gpt2_hf_cache

    if not (session_hf_home / "hub" / "models--gpt2").exists():
        write_gpt2_hf_cache(session_hf_home, seed=0)
    return session_hf_home


@pytest.fixture(scope="session")
def smollm2():
    """The embedded model, SmolLM2-135M-Instruct (genuine pretrained weights)."""
    from mechfin_utils.models import load_model

    return load_model("smollm2-135m", verbose=False)


@pytest.fixture(scope="session")
def gpt2_random(gpt2_hf_cache):
    """GPT-2 Small *shape* with random weights, loaded through the real GPT-2 path. Test-only numbers."""
    from mechfin_utils.models import load_model

    return load_model("gpt2", verbose=False)


@pytest.fixture(scope="session", params=["smollm2", "gpt2_random"])
def any_model(request):
    """Parametrises a test over the embedded model and the GPT-2-shape model."""
    return request.getfixturevalue(request.param)
