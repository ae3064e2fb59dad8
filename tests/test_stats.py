"""Bootstrap intervals against scipy and against first principles; the separation verdict on built data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as scipy_stats

from mechfin_utils.core.stats import (
    BootstrapResult,
    auroc,
    bootstrap_ci,
    bootstrap_distribution,
    grouped_bootstrap,
    paired_bootstrap_ci,
    separation_report,
)


@pytest.mark.parametrize("statistic", ["mean", "median"])
@pytest.mark.parametrize("data_seed", [1, 2])
def test_matches_scipy_percentile_bootstrap(statistic, data_seed):
    values = np.random.default_rng(data_seed).normal(1.0, 2.0, size=60)
    ours = bootstrap_ci(values, n_boot=20_000, ci=0.95, seed=0, statistic=statistic)
    theirs = scipy_stats.bootstrap(
        (values,),
        getattr(np, statistic),
        n_resamples=20_000,
        confidence_level=0.95,
        method="percentile",
        random_state=np.random.default_rng(123),
    ).confidence_interval
    # Two independent Monte Carlo estimates of the same quantiles: they agree to ~0.01 here, while a 90%
    # instead of a 95% interval would move each end by ~0.08.
    assert ours.low == pytest.approx(theirs.low, abs=0.03)
    assert ours.high == pytest.approx(theirs.high, abs=0.03)
    assert ours.estimate == pytest.approx(float(getattr(np, statistic)(values)), abs=1e-12)
    assert ours.n == 60 and ours.n_boot == 20_000 and ours.ci == 0.95


def test_resampled_means_are_means_of_resamples():
    """The counts-matrix shortcut for the mean equals drawing the same indices and averaging them."""
    values = np.random.default_rng(5).normal(size=17)
    boot = bootstrap_distribution(values, n_boot=50, seed=9)
    indices = np.random.default_rng(9).integers(0, 17, size=(50, 17))
    np.testing.assert_allclose(boot, values[indices].mean(axis=1), rtol=0, atol=1e-12)


def test_coverage_on_a_known_distribution():
    """A 90% interval for the mean of N(5, 2) samples of 30 covers 5 about 90% of the time.

    The percentile bootstrap slightly under-covers at n = 30 (about 0.87-0.88 expected); with 400
    data sets the binomial standard error is ~0.017.
    """
    rng = np.random.default_rng(2024)
    covered = 0
    trials = 400
    for trial in range(trials):
        sample = rng.normal(5.0, 2.0, size=30)
        result = bootstrap_ci(sample, n_boot=1000, ci=0.90, seed=trial)
        covered += result.low <= 5.0 <= result.high
    coverage = covered / trials
    assert 0.83 <= coverage <= 0.95, coverage


def test_seed_determinism():
    values = np.random.default_rng(0).exponential(size=25)
    first = bootstrap_ci(values, seed=7)
    again = bootstrap_ci(values, seed=7)
    other = bootstrap_ci(values, seed=8)
    assert (first.low, first.high) == (again.low, again.high)
    assert (first.low, first.high) != (other.low, other.high)


@pytest.mark.parametrize("statistic", ["mean", "median"])
def test_per_element_matches_a_loop(statistic):
    values = np.random.default_rng(3).normal(size=(30, 3, 4))
    joint = bootstrap_ci(values, n_boot=500, seed=4, statistic=statistic)
    assert joint.estimate.shape == joint.low.shape == joint.high.shape == (3, 4)
    for i in range(3):
        for j in range(4):
            single = bootstrap_ci(values[:, i, j], n_boot=500, seed=4, statistic=statistic)
            assert joint.estimate[i, j] == pytest.approx(single.estimate, abs=1e-12)
            assert joint.low[i, j] == pytest.approx(single.low, abs=1e-12)
            assert joint.high[i, j] == pytest.approx(single.high, abs=1e-12)


def test_custom_statistic_and_torch_input():
    values = torch.tensor(np.random.default_rng(6).normal(size=40))
    trimmed = bootstrap_ci(values, n_boot=300, statistic=lambda x, axis: scipy_stats.trim_mean(x, 0.1, axis=axis))
    assert trimmed.estimate == pytest.approx(scipy_stats.trim_mean(values.numpy(), 0.1))
    assert trimmed.low < trimmed.estimate < trimmed.high
    with pytest.raises(ValueError, match="reduce exactly that axis"):
        bootstrap_ci(values, n_boot=10, statistic=lambda x, axis: x)


def test_paired_is_bootstrap_of_differences():
    rng = np.random.default_rng(11)
    a = rng.normal(size=35)
    b = a - 0.5 + rng.normal(scale=0.2, size=35)
    paired = paired_bootstrap_ci(a, b, n_boot=800, seed=2)
    direct = bootstrap_ci(a - b, n_boot=800, seed=2)
    assert (paired.estimate, paired.low, paired.high) == (direct.estimate, direct.low, direct.high)
    assert paired.low > 0.4 and paired.high < 0.6
    with pytest.raises(ValueError, match=r"a is \(35,\), b is \(34,\)"):
        paired_bootstrap_ci(a, b[:-1])


@pytest.mark.parametrize(
    ("values", "kwargs", "message"),
    [
        ([], {}, "empty"),
        ([1.0], {}, "only 1 value"),
        ([1.0, float("nan"), 2.0], {}, r"non-finite value \(nan\) at index \(1,\)"),
        ([1.0, 2.0, 3.0], {"ci": 1.0}, "ci must be"),
        ([1.0, 2.0, 3.0], {"n_boot": 0}, "n_boot must be"),
        ([1.0, 2.0, 3.0], {"statistic": "mode"}, "statistic must be"),
        ([1.0, 2.0, 3.0], {"seed": "zero"}, "seed must be"),
    ],
)
def test_bad_input_is_an_error(values, kwargs, message):
    with pytest.raises(ValueError, match=message):
        bootstrap_ci(values, **kwargs)


def test_grouped_bootstrap_rows_match_per_group_calls():
    rng = np.random.default_rng(8)
    df = pd.DataFrame(
        {
            "basis": np.repeat(["race", "age", "sex"], [12, 9, 15]),
            "logit_diff": rng.normal(size=36) + np.repeat([2.0, 0.0, -1.0], [12, 9, 15]),
        }
    )
    table = grouped_bootstrap(df, "basis", "logit_diff", n_boot=400, seed=5)
    assert list(table.columns) == ["basis", "n", "estimate", "low", "high"]
    assert list(table["basis"]) == ["age", "race", "sex"]  # sorted
    children = np.random.SeedSequence(5).spawn(3)
    for row, child in zip(table.itertuples(), children):
        subset = df.loc[df["basis"] == row.basis, "logit_diff"].to_numpy()
        expected = bootstrap_ci(subset, n_boot=400, seed=np.random.default_rng(child))
        assert row.n == subset.size
        assert row.estimate == pytest.approx(subset.mean())
        assert (row.low, row.high) == pytest.approx((expected.low, expected.high))


def test_grouped_bootstrap_errors():
    df = pd.DataFrame({"basis": ["a", "a", "b", None], "v": [1.0, 2.0, 3.0, 4.0]})
    with pytest.raises(ValueError, match=r"column 'basis' has missing values in rows \[3\]"):
        grouped_bootstrap(df, "basis", "v")
    with pytest.raises(ValueError, match="column 'w' is not in the DataFrame"):
        grouped_bootstrap(df, "basis", "w")
    with pytest.raises(ValueError, match=r"group \{'basis': 'b'\} has 1 row"):
        grouped_bootstrap(df.iloc[:3], "basis", "v")


def test_auroc_against_pair_counting_and_mann_whitney():
    rng = np.random.default_rng(4)
    pos = np.round(rng.normal(0.5, 1.0, size=23), 1)  # rounding makes ties
    neg = np.round(rng.normal(0.0, 1.0, size=31), 1)
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    assert ties > 0
    expected = (greater + 0.5 * ties) / (pos.size * neg.size)
    assert auroc(pos, neg) == pytest.approx(expected, abs=1e-12)
    u = scipy_stats.mannwhitneyu(pos, neg).statistic
    assert auroc(pos, neg) == pytest.approx(u / (pos.size * neg.size), abs=1e-12)


def test_separation_verdicts():
    rng = np.random.default_rng(12)
    base = rng.normal(0.0, 3.0, size=40)

    clear = separation_report(base + 6.0 + rng.normal(0, 0.3, 40), base, n_boot=1000)
    assert clear.verdict == "separates"
    assert clear.frac_clean_greater == 1.0
    assert clear.gap.estimate == pytest.approx(6.0, abs=0.3)
    assert clear.auroc > 0.85 and clear.effect_size > 1.5

    small_but_reliable = separation_report(base + 0.3 + rng.normal(0, 0.1, 40), base, n_boot=1000)
    assert small_but_reliable.verdict == "barely separates"
    assert small_but_reliable.gap.low > 0
    assert small_but_reliable.effect_size < 1.0

    noise = separation_report(base + rng.normal(0, 0.3, 40), base, n_boot=1000)
    assert noise.verdict == "does not separate"
    assert noise.gap.low <= 0 <= noise.gap.high

    reversed_order = separation_report(base - 2.0, base, n_boot=1000)
    assert reversed_order.verdict == "does not separate"
    assert "reverse" in reversed_order.explanation


def test_separation_report_fields_are_the_direct_numbers():
    rng = np.random.default_rng(21)
    clean = rng.normal(1.0, 1.0, size=30)
    corrupted = rng.normal(0.0, 1.5, size=30)
    report = separation_report(clean, corrupted, n_boot=600, seed=3)
    assert report.n == 30
    assert report.mean_clean == pytest.approx(clean.mean())
    assert report.frac_clean_greater == pytest.approx(np.mean(clean > corrupted))
    assert report.auroc == pytest.approx(auroc(clean, corrupted))
    pooled = np.sqrt((clean.var(ddof=1) + corrupted.var(ddof=1)) / 2)
    assert report.effect_size == pytest.approx((clean - corrupted).mean() / pooled)
    expected_gap = paired_bootstrap_ci(clean, corrupted, n_boot=600, seed=3)
    assert (report.gap.low, report.gap.high) == (expected_gap.low, expected_gap.high)
    assert report.as_dict()["gap"]["n"] == 30
    with pytest.raises(ValueError, match="must be paired"):
        separation_report(clean, corrupted[:-1])


def test_result_helpers():
    result = BootstrapResult(estimate=0.5, low=0.1, high=0.9, n=10)
    assert result.excludes(0.0) and not result.excludes(0.5)
    assert result.as_dict() == {"estimate": 0.5, "low": 0.1, "high": 0.9, "n": 10, "ci": 0.95, "n_boot": 2000}
    assert str(result) == "0.5 [0.1, 0.9] (95% CI, n=10)"


def test_normalised_ci_is_the_ratio_of_the_same_resampled_means():
    from mechfin_utils.core.stats import bootstrap_distribution, normalised_ci

    rng = np.random.default_rng(4)
    clean, corrupted = rng.normal(3.0, 1.0, 30), rng.normal(0.0, 1.0, 30)
    circuit = 0.5 * clean + 0.5 * corrupted + rng.normal(0.0, 0.2, 30)
    got = normalised_ci(circuit, corrupted, clean, n_boot=400, seed=7)
    assert got.estimate == pytest.approx((circuit.mean() - corrupted.mean()) / (clean.mean() - corrupted.mean()))
    # by hand: the same row draws for all three columns, ratio per resample, percentile interval
    means = bootstrap_distribution(np.stack([circuit, corrupted, clean], 1), n_boot=400, seed=7)
    ratios = (means[:, 0] - means[:, 1]) / (means[:, 2] - means[:, 1])
    assert (got.low, got.high) == pytest.approx(tuple(np.quantile(ratios, [0.025, 0.975])))
    ends = normalised_ci(np.stack([clean, corrupted], 1), corrupted, clean, n_boot=50)
    assert list(ends.estimate) == pytest.approx([1.0, 0.0]) and list(ends.low) == pytest.approx([1.0, 0.0])
    with pytest.raises(ValueError, match=r"zero \(29,\)"):
        normalised_ci(circuit, corrupted[:-1], clean)
