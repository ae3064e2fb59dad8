"""Bootstrap confidence intervals, and a plain-English read of whether clean and corrupted prompts separate.

The percentile bootstrap, in three steps. Given ``n`` values (one per prompt):

1. draw ``n`` of them *with replacement*, ``n_boot`` times (each draw is one "resample");
2. compute the statistic (the mean, by default) of every resample;
3. take the ``(1 - ci) / 2`` and ``(1 + ci) / 2`` quantiles of those ``n_boot`` statistics as the interval.

The spread of the resampled statistics stands in for the spread we would see if we could draw fresh prompt
sets from the same distribution. The interval is about the *prompt set*: it says how much a number would
move with other prompts like these, not how right the model is. With few prompts (say under 20) the percentile
interval is somewhat too narrow; report ``n`` beside it.

Everything here is vectorised over resamples with numpy and deterministic given ``seed``.

:func:`bootstrap_ci` is the one generic function; the others are thin uses of it:

* values ``[n]`` -> one interval; values ``[n, ...]`` (e.g. ``[prompts, layers, heads]`` attributions) ->
  one interval per element, resampling whole rows (prompts) so all elements share the same resamples;
* :func:`paired_bootstrap_ci` -> interval for ``statistic(a - b)`` over pairs (clean vs corrupted prompt);
* :func:`grouped_bootstrap` -> one row per group of a DataFrame (e.g. per legal basis);
* :func:`separation_report` -> paired gap with CI, AUROC, and a verdict.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
from jaxtyping import Float

from mechfin_utils.core.arrays import ArrayLike, as_checked_array

Statistic = Literal["mean", "median"] | Callable[..., np.ndarray]
"""``"mean"``, ``"median"``, or a function called as ``statistic(x, axis=k)`` (like ``np.mean``)."""

_ELEMENTS_PER_CHUNK = 4_000_000  # bound on resampled values held at once for a general statistic


@dataclass(frozen=True)
class BootstrapResult:
    """A statistic with its percentile-bootstrap interval.

    ``estimate``, ``low`` and ``high`` are floats for values ``[n]``, arrays of shape ``values.shape[1:]``
    for values ``[n, ...]``. ``n`` is the number of values (rows) the statistic was computed from.
    """

    estimate: float | np.ndarray
    low: float | np.ndarray
    high: float | np.ndarray
    n: int
    ci: float = 0.95
    n_boot: int = 2000

    def as_dict(self) -> dict[str, Any]:
        """Plain Python numbers/lists (for results JSON)."""

        def plain(x: float | np.ndarray) -> float | list[Any]:
            return x.tolist() if isinstance(x, np.ndarray) else float(x)

        return {
            "estimate": plain(self.estimate),
            "low": plain(self.low),
            "high": plain(self.high),
            "n": int(self.n),
            "ci": float(self.ci),
            "n_boot": int(self.n_boot),
        }

    def excludes(self, value: float = 0.0) -> bool | np.ndarray:
        """Whether the interval lies entirely above or below ``value`` (per element for arrays)."""
        outside = (np.asarray(self.low) > value) | (np.asarray(self.high) < value)
        return outside if isinstance(self.low, np.ndarray) else bool(outside)

    def __str__(self) -> str:
        if isinstance(self.estimate, np.ndarray):
            return f"BootstrapResult(shape {self.estimate.shape}, {self.ci:.0%} CI, n={self.n})"
        return f"{self.estimate:.4g} [{self.low:.4g}, {self.high:.4g}] ({self.ci:.0%} CI, n={self.n})"


# ---------------------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------------------


def _as_values(values: ArrayLike, argument: str = "values") -> np.ndarray:
    """``values`` ``[n, ...]`` as a checked float64 array: at least 2 rows (a bootstrap needs them), all finite."""
    return as_checked_array(values, argument, min_rows=2)


def _check_settings(n_boot: int, ci: float) -> None:
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not isinstance(ci, (float, int)) or not 0.0 < float(ci) < 1.0:
        raise ValueError(f"ci must be a probability strictly between 0 and 1 (e.g. 0.95), got {ci!r}")


def _resolve_statistic(statistic: Statistic) -> tuple[str, Callable[..., np.ndarray]]:
    if isinstance(statistic, str):
        if statistic == "mean":
            return "mean", np.mean
        if statistic == "median":
            return "median", np.median
        raise ValueError(f"statistic must be 'mean', 'median' or a callable f(x, axis=...), got {statistic!r}")
    if callable(statistic):
        if statistic is np.mean:
            return "mean", np.mean
        return getattr(statistic, "__name__", "statistic"), statistic
    raise ValueError(f"statistic must be 'mean', 'median' or a callable f(x, axis=...), got {statistic!r}")


def _rng(seed: int | np.random.Generator) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an int or a numpy Generator, got {seed!r}")
    return np.random.default_rng(int(seed))


# ---------------------------------------------------------------------------------------------------------
# The generic function
# ---------------------------------------------------------------------------------------------------------


def bootstrap_distribution(
    values: Float[ArrayLike, " n *element"],
    *,
    n_boot: int = 2000,
    seed: int | np.random.Generator = 0,
    statistic: Statistic = "mean",
) -> Float[np.ndarray, " n_boot *element"]:
    """The statistic of each of ``n_boot`` resamples of the rows of ``values``.

    Row indices are drawn once, as an ``[n_boot, n]`` integer array, from ``np.random.default_rng(seed)``,
    so the resamples depend only on ``seed``, ``n_boot`` and ``n`` (not on the trailing shape): element
    ``[..., i]`` of a multi-element call equals a single-element call on ``values[:, i]``.
    For the mean, a resample's mean is ``counts @ values / n``, where ``counts[b, j]`` is how often row ``j``
    was drawn in resample ``b``; other statistics see the gathered resamples ``values[indices]``, a chunk of
    resamples at a time.
    """
    _check_settings(n_boot, 0.5)
    array = _as_values(values)
    _, stat = _resolve_statistic(statistic)
    n = array.shape[0]
    indices = _rng(seed).integers(0, n, size=(int(n_boot), n))
    flat = array.reshape(n, -1)
    if stat is np.mean:
        offsets = indices + (np.arange(n_boot)[:, None] * n)
        counts = np.bincount(offsets.ravel(), minlength=n_boot * n).reshape(n_boot, n).astype(np.float64)
        boot: np.ndarray = counts @ flat / n
    else:
        chunk = max(1, _ELEMENTS_PER_CHUNK // max(1, n * flat.shape[1]))
        pieces = []
        for start in range(0, n_boot, chunk):
            resampled = flat[indices[start : start + chunk]]  # [chunk, n, elements]
            piece = np.asarray(stat(resampled, axis=1), dtype=np.float64)
            if piece.shape != (resampled.shape[0], flat.shape[1]):
                raise ValueError(
                    f"statistic returned shape {piece.shape} for input {resampled.shape} with axis=1; it must "
                    "reduce exactly that axis (like np.mean)"
                )
            pieces.append(piece)
        boot = np.concatenate(pieces, axis=0)
    return boot.reshape((n_boot,) + array.shape[1:])


def bootstrap_ci(
    values: Float[ArrayLike, " n *element"],
    *,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int | np.random.Generator = 0,
    statistic: Statistic = "mean",
) -> BootstrapResult:
    """Percentile-bootstrap interval for ``statistic`` over the first axis of ``values``.

    Args:
        values: ``[n]`` (one interval) or ``[n, ...]`` (one interval per element, rows resampled jointly).
            numpy, torch or lists; NaN/inf, empty input or a single row raise a ValueError.
        n_boot: number of resamples.
        ci: coverage of the interval (0.95 -> the 2.5% and 97.5% quantiles of the resampled statistics).
        seed: int (or a numpy Generator) fixing the resamples.
        statistic: ``"mean"`` (default), ``"median"``, or ``f(x, axis=k)``.

    Returns:
        :class:`BootstrapResult` whose ``estimate`` is the statistic of the data itself.
    """
    _check_settings(n_boot, ci)
    array = _as_values(values)
    _, stat = _resolve_statistic(statistic)
    boot = bootstrap_distribution(array, n_boot=n_boot, seed=seed, statistic=statistic)
    alpha = (1.0 - float(ci)) / 2.0
    low, high = np.quantile(boot, [alpha, 1.0 - alpha], axis=0)
    estimate = np.asarray(stat(array, axis=0), dtype=np.float64)
    if array.ndim == 1:
        return BootstrapResult(
            float(estimate), float(low), float(high), n=array.shape[0], ci=float(ci), n_boot=int(n_boot)
        )
    return BootstrapResult(estimate, low, high, n=array.shape[0], ci=float(ci), n_boot=int(n_boot))


def paired_bootstrap_ci(
    a: Float[ArrayLike, " n *element"],
    b: Float[ArrayLike, " n *element"],
    *,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int | np.random.Generator = 0,
    statistic: Statistic = "mean",
) -> BootstrapResult:
    """Interval for ``statistic(a - b)`` where row ``i`` of ``a`` and of ``b`` belong together (a pair).

    Resampling pairs (not ``a`` and ``b`` separately) keeps what the two share, e.g. the same scenario with
    and without the protected attribute; the interval is usually much narrower than for unpaired data.
    """
    a_arr = _as_values(a, "a")
    b_arr = _as_values(b, "b")
    if a_arr.shape != b_arr.shape:
        raise ValueError(f"paired values must have the same shape: a is {a_arr.shape}, b is {b_arr.shape}")
    return bootstrap_ci(a_arr - b_arr, n_boot=n_boot, ci=ci, seed=seed, statistic=statistic)


def normalised_ci(
    values: Float[ArrayLike, " n *element"],
    zero: Float[ArrayLike, " n"],
    one: Float[ArrayLike, " n"],
    *,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int | np.random.Generator = 0,
) -> BootstrapResult:
    """Interval for ``(mean(values) - mean(zero)) / (mean(one) - mean(zero))``, resampling rows jointly.

    The normalised metric of circuit work (faithfulness): row ``i`` is one prompt, ``values[i]`` its metric with
    the circuit alone (``[n, k]``: ``k`` circuits at once), ``zero[i]`` and ``one[i]`` its metric in the runs that
    define 0 and 1 (corrupted, clean). All three are means over the *same* resampled prompts, so a prompt that is
    hard in every run moves numerator and denominator together. A resample whose denominator is 0 is dropped from
    the quantiles; a ValueError when more than half are.
    """
    _check_settings(n_boot, ci)
    array = _as_values(values)
    zero_arr, one_arr = _as_values(zero, "zero"), _as_values(one, "one")
    n = array.shape[0]
    if zero_arr.shape != (n,) or one_arr.shape != (n,):
        raise ValueError(f"zero {zero_arr.shape} and one {one_arr.shape} must be [n] with n = {n} (rows of values)")
    flat = array.reshape(n, -1)
    joint = np.concatenate([flat, zero_arr[:, None], one_arr[:, None]], axis=1)
    boot = bootstrap_distribution(joint, n_boot=n_boot, seed=seed)  # [n_boot, k + 2]: means of each column
    span = boot[:, -1] - boot[:, -2]
    usable = span != 0
    if usable.sum() < n_boot / 2:
        raise ValueError(f"mean(one) - mean(zero) is 0 in {int((~usable).sum())} of {n_boot} resamples")
    ratios = (boot[usable, :-2] - boot[usable, -2:-1]) / span[usable, None]
    alpha = (1.0 - float(ci)) / 2.0
    low, high = np.quantile(ratios, [alpha, 1.0 - alpha], axis=0)
    estimate = (flat.mean(0) - zero_arr.mean()) / (one_arr.mean() - zero_arr.mean())
    if array.ndim == 1:
        return BootstrapResult(float(estimate[0]), float(low[0]), float(high[0]), n=n, ci=float(ci), n_boot=int(n_boot))
    shape = array.shape[1:]
    return BootstrapResult(
        estimate.reshape(shape), low.reshape(shape), high.reshape(shape), n=n, ci=float(ci), n_boot=int(n_boot)
    )


# ---------------------------------------------------------------------------------------------------------
# Per-group intervals
# ---------------------------------------------------------------------------------------------------------


def grouped_bootstrap(
    df: pd.DataFrame,
    by: str | Sequence[str],
    value: str,
    *,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
    statistic: Statistic = "mean",
) -> pd.DataFrame:
    """One interval per group: columns ``[*by, "n", "estimate", "low", "high"]``, groups in sorted order.

    Group ``k`` (in that order) is resampled with ``np.random.default_rng(np.random.SeedSequence(seed)
    .spawn(n_groups)[k])``, so groups get independent resamples and the table is reproducible. Missing
    values in ``by`` or ``value`` and groups with fewer than 2 rows raise a ValueError naming them.
    """
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"df must be a pandas DataFrame, got {type(df).__name__}")
    keys = [by] if isinstance(by, str) else list(by)
    if not keys:
        raise ValueError("by must name at least one column")
    for column in keys + [value]:
        if column not in df.columns:
            raise ValueError(f"column {column!r} is not in the DataFrame (columns: {list(df.columns)})")
    if value in keys:
        raise ValueError(f"value column {value!r} is also a grouping column")
    if df.empty:
        raise ValueError("df is empty: a confidence interval needs values")
    for column in keys + [value]:
        missing = df.index[df[column].isna()].tolist()
        if missing:
            raise ValueError(f"column {column!r} has missing values in rows {missing[:10]}")
    _check_settings(n_boot, ci)
    groups = list(df.groupby(keys, sort=True))
    seeds = np.random.SeedSequence(seed).spawn(len(groups))
    rows = []
    for (group_key, group), child in zip(groups, seeds):
        group_key = group_key if isinstance(group_key, tuple) else (group_key,)
        label = dict(zip(keys, group_key))
        if len(group) < 2:
            raise ValueError(f"group {label} has {len(group)} row(s); a bootstrap interval needs at least 2")
        result = bootstrap_ci(
            group[value].to_numpy(dtype=np.float64),
            n_boot=n_boot,
            ci=ci,
            seed=np.random.default_rng(child),
            statistic=statistic,
        )
        rows.append({**label, "n": result.n, "estimate": result.estimate, "low": result.low, "high": result.high})
    return pd.DataFrame(rows, columns=keys + ["n", "estimate", "low", "high"])


# ---------------------------------------------------------------------------------------------------------
# Does the model tell clean from corrupted prompts apart?
# ---------------------------------------------------------------------------------------------------------

Verdict = Literal["separates", "barely separates", "does not separate"]


def auroc(positives: Float[ArrayLike, " n_pos"], negatives: Float[ArrayLike, " n_neg"]) -> float:
    """Probability that a random positive scores above a random negative (ties count one half).

    This is the area under the ROC curve of the score as a classifier, and equals the Mann-Whitney
    ``U / (n_pos * n_neg)``: 1 is perfect separation, 0.5 chance, 0 perfectly reversed.
    """
    from scipy.stats import rankdata

    pos = _as_values(positives, "positives")
    neg = _as_values(negatives, "negatives")
    if pos.ndim != 1 or neg.ndim != 1:
        raise ValueError(f"auroc needs 1-D scores, got shapes {pos.shape} and {neg.shape}")
    ranks = rankdata(np.concatenate([pos, neg]))  # average ranks for ties
    u_statistic = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u_statistic / (pos.size * neg.size))


@dataclass(frozen=True)
class SeparationReport:
    """How clearly a score (e.g. the logit difference) is higher on clean than on corrupted prompts.

    Fields: ``gap`` is the paired mean ``clean - corrupted`` with its bootstrap interval;
    ``frac_clean_greater`` the fraction of pairs with ``clean > corrupted``; ``auroc`` the unpaired
    AUROC of the score; ``effect_size`` the gap in units of the pooled standard deviation of the two sets
    (Cohen's d); ``verdict`` and ``explanation`` the plain-English reading (rule in :func:`separation_report`).
    """

    n: int
    mean_clean: float
    mean_corrupted: float
    gap: BootstrapResult
    frac_clean_greater: float
    auroc: float
    effect_size: float
    verdict: Verdict
    explanation: str = field(repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "mean_clean": self.mean_clean,
            "mean_corrupted": self.mean_corrupted,
            "gap": self.gap.as_dict(),
            "frac_clean_greater": self.frac_clean_greater,
            "auroc": self.auroc,
            "effect_size": self.effect_size if np.isfinite(self.effect_size) else None,
            "verdict": self.verdict,
            "explanation": self.explanation,
        }

    def __str__(self) -> str:
        return f"{self.verdict}: {self.explanation}"


def separation_report(
    clean_values: Float[ArrayLike, " n"],
    corrupted_values: Float[ArrayLike, " n"],
    *,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
    strong_effect: float = 1.0,
) -> SeparationReport:
    """Paired comparison of a score on clean vs corrupted prompts (row ``i`` of each is one pair).

    The verdict rule:

    * **does not separate** — the interval of the paired mean gap contains 0, or lies below it (the score is
      *higher* on corrupted prompts; the explanation says so);
    * **barely separates** — the gap interval lies above 0 but the gap is smaller than ``strong_effect``
      pooled standard deviations: the direction is reliable, yet the two sets overlap a lot, so a single
      prompt's score says little about which set it came from;
    * **separates** — the gap interval lies above 0 and the gap is at least ``strong_effect`` (default 1)
      pooled standard deviations. For two normal sets of equal spread, d = 1 is an AUROC of about 0.76 and
      d = 2 about 0.92; the AUROC and the fraction of pairs in the right order are reported beside it.
    """
    clean = _as_values(clean_values, "clean_values")
    corrupted = _as_values(corrupted_values, "corrupted_values")
    if clean.ndim != 1 or corrupted.ndim != 1:
        raise ValueError(f"separation_report needs 1-D values, got shapes {clean.shape} and {corrupted.shape}")
    if clean.shape != corrupted.shape:
        raise ValueError(
            f"clean_values ({clean.size}) and corrupted_values ({corrupted.size}) must be paired: same length"
        )
    if not strong_effect > 0:
        raise ValueError(f"strong_effect must be positive, got {strong_effect}")
    gap = paired_bootstrap_ci(clean, corrupted, n_boot=n_boot, ci=ci, seed=seed)
    pooled_sd = float(np.sqrt((clean.var(ddof=1) + corrupted.var(ddof=1)) / 2.0))
    if pooled_sd > 0:
        effect = gap.estimate / pooled_sd
    else:
        effect = float("inf") * np.sign(gap.estimate) if gap.estimate != 0 else 0.0
    frac = float(np.mean(clean > corrupted))
    area = auroc(clean, corrupted)
    interval = f"mean gap {gap.estimate:.3g} ({ci:.0%} CI [{gap.low:.3g}, {gap.high:.3g}], n={clean.size} pairs)"
    detail = f"d = {effect:.2f}, AUROC {area:.2f}, clean > corrupted in {frac:.0%} of pairs"
    if gap.high < 0:
        verdict: Verdict = "does not separate"
        explanation = f"the score is reliably higher on corrupted prompts, the reverse of the expected order: {interval}; {detail}."
    elif gap.low <= 0:
        verdict = "does not separate"
        explanation = f"the gap's interval includes 0: {interval}; {detail}."
    elif effect < strong_effect:
        verdict = "barely separates"
        explanation = (
            f"the gap is reliably positive but small next to the spread of the scores "
            f"(under {strong_effect:g} SD): {interval}; {detail}."
        )
    else:
        verdict = "separates"
        explanation = f"the gap is reliably positive and at least {strong_effect:g} SD: {interval}; {detail}."
    return SeparationReport(
        n=int(clean.size),
        mean_clean=float(clean.mean()),
        mean_corrupted=float(corrupted.mean()),
        gap=gap,
        frac_clean_greater=frac,
        auroc=area,
        effect_size=float(effect),
        verdict=verdict,
        explanation=explanation,
    )
