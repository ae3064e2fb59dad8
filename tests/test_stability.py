"""Circuit stability against the number of prompts: hand-built scores whose answer is known."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import spearmanr

from mechfin_utils.core.graph import ComputationalGraph
from mechfin_utils.methods.circuits import edges as ea
from mechfin_utils.methods.circuits import stability


def _scores(per_prompt: torch.Tensor, graph: ComputationalGraph) -> ea.EdgeScores:
    ids = [f"p{i}" for i in range(per_prompt.shape[0])]
    return ea.EdgeScores("EAP-IG", 5, "m", "t", graph, ids, per_prompt * graph.valid())


def test_spearman_matches_scipy():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(500, generator=generator)
    b = a + torch.randn(500, generator=generator)
    assert stability.spearman(a, b) == pytest.approx(spearmanr(a.numpy(), b.numpy()).statistic, abs=1e-12)


def test_identical_prompts_agree_at_every_n():
    graph = ComputationalGraph(2, 2, 2)
    base = torch.randn(graph.n_senders, graph.n_receivers, generator=torch.Generator().manual_seed(0))
    curve = stability.stability_curve(_scores(base.expand(8, -1, -1).clone(), graph), 10, [1, 2, 4], n_draws=3)
    assert curve.table["jaccard_mean"].tolist() == [1.0] * 3
    assert curve.table["spearman_mean"].tolist() == pytest.approx([1.0] * 3)
    assert curve.prompts_needed() == 1 and curve.summary()["prompts_for_jaccard_0.8"] == 1


def test_noisy_prompts_agree_more_as_n_grows_and_the_fit_says_where_it_would_be_stable():
    graph = ComputationalGraph(3, 4, 2)
    generator = torch.Generator().manual_seed(1)
    signal = torch.randn(graph.n_senders, graph.n_receivers, generator=generator)
    noise = 3.0 * torch.randn(64, graph.n_senders, graph.n_receivers, generator=generator)
    curve = stability.stability_curve(_scores(signal + noise, graph), 20, [2, 4, 8, 16, 32], n_draws=30, seed=2)
    jaccard = curve.table["jaccard_mean"].to_numpy()
    assert jaccard[-1] > jaccard[0] + 0.1 and curve.table["spearman_mean"].is_monotonic_increasing
    assert (curve.table["jaccard_p05"] <= curve.table["jaccard_mean"]).all()
    assert curve.prompts_needed() is None and curve.power_law() is None  # far from stable: no extrapolation
    closer = stability.stability_curve(_scores(signal + noise / 5, graph), 20, [2, 4, 8, 16, 32], n_draws=30, seed=2)
    a, b = closer.power_law()
    assert b < 0  # 1 - Jaccard falls with n
    needed = closer.prompts_needed()
    assert needed is not None or closer.extrapolated_prompts_needed() > 32
    with pytest.raises(ValueError, match=r"sizes \[33\] need more than the 64"):
        stability.stability_curve(_scores(signal + noise, graph), 20, [4, 33])


def test_bootstrap_records_its_sample_size():
    graph = ComputationalGraph(2, 2, 2)
    per_prompt = torch.randn(5, graph.n_senders, graph.n_receivers, generator=torch.Generator().manual_seed(3))
    summary = stability.bootstrap_stability(_scores(per_prompt, graph), 6, n_boot=4).summary()
    assert summary["n_prompts"] == 5 and summary["n_boot"] == 4


def test_a_strong_core_is_stable_where_the_whole_circuit_is_not():
    """Hand-built: 10 edges with large, well-separated scores shared by every prompt, every other edge pure noise.
    Circuits of up to 10 edges are the same top of the core in every sample (Jaccard 1); circuits of 200 edges are
    mostly noise and move."""
    graph = ComputationalGraph(3, 4, 2)
    generator = torch.Generator().manual_seed(5)
    signal = torch.zeros(graph.n_senders * graph.n_receivers)
    core = graph.valid().flatten().nonzero()[:10, 0]
    signal[core] = 10.0 * torch.arange(10, 0, -1, dtype=torch.float32)  # 100, 90, ..., 10: no near-ties
    noise = torch.randn(16, graph.n_senders * graph.n_receivers, generator=generator)
    per_prompt = (signal + noise).view(16, graph.n_senders, graph.n_receivers)
    large = graph.n_edges // 3
    table = stability.stability_by_size(_scores(per_prompt, graph), [5, 10, large], 8, n_draws=10)
    assert table["n_edges"].tolist() == [5, 10, large] and (table["n_prompts"] == 8).all()
    assert table["jaccard_mean"].tolist()[:2] == [1.0, 1.0] and table["jaccard_mean"].iloc[2] < 0.8
    assert stability.largest_stable_size(table) == 10
    assert stability.largest_stable_size(table[table["n_edges"] == large]) is None
