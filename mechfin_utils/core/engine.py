"""The one intervention engine: finish forward passes from any layer, with any set of interventions.

Every causal method in mechfin asks the same question: *if these activations were different, what would
the model say?* Activation patching copies a clean activation into a corrupted run; circuit discovery
ablates a set of nodes; causal tracing noises the subject and restores one state; attention knockout cuts
attention edges. They differ only in *which* activations change and *how*, so they share one engine,
:func:`run`, built on the functional forward pass (:class:`mechfin_utils.core.functional.FunctionalTransformer`)
and tested once against the TransformerLens bridge with hooks (``tests/test_engine.py``).

What the engine saves, and why it is exact
------------------------------------------
A run is a list of :class:`Segment` objects. Each holds ``n`` sequences that all continue prompts of one
*reference run* (a :class:`~mechfin_utils.core.functional.ForwardRecord`, usually the corrupted or clean run):

* it **starts at** ``start_layer``: the layers below it are the reference run's, so they are not recomputed
  (an intervention at layer ``L`` cannot change anything below ``L``);
* it **starts at position** ``first_pos``: causal attention means positions before the earliest change
  are the reference run's at every layer, so their keys and values are read from the record and only
  positions ``first_pos ...`` are recomputed;
* it **reads** the last ``n_read`` positions: the last layer computes queries, attention and MLP there only.

Segments with different start layers and first positions are packed together, so every position-wise map
(norms, Q/K/V, output projection, MLP) is one matrix product per layer.

Interventions
-------------
Each segment carries interventions that apply to all its ``n`` sequences:

* :class:`Replace` -- overwrite an activation (``resid_pre`` entering a layer, a head's output ``z``, the
  attention output ``attn_out`` or the MLP output ``mlp_out``) at given positions with given values: the
  clean value (patching, restoration in causal tracing), a mean or a resampled value (ablation);
* :class:`BlockAttention` -- set attention scores from query positions to key positions to ``-inf`` before
  the softmax (Geva et al.'s knockout; an edge cut).

Noise is not an intervention here: a noised run is a reference run recorded from noised embeddings
(:meth:`FunctionalTransformer.record` with ``embeddings=``), which restorations then continue.

Edges
-----
:func:`run_edges` (in :mod:`mechfin_utils.core.edge_engine`, re-exported here) is the engine's second entry point, for
interventions on *edges* of the computational graph (:mod:`mechfin_utils.core.graph`) rather than on activations:
every receiver reads its own copy of the residual stream, in which chosen senders' outputs are swapped for those of
another run (exact path patching of any edge set) and to which an offset can be added (the gradient EAP and EAP-IG
need).

Shapes follow TransformerLens: residual rows ``[n, pos, d_model]``, head outputs ``[n, pos, head, d_head]``.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechfin_utils.core.edge_engine import EdgeRun, run_edges
from mechfin_utils.core.functional import ForwardRecord, FunctionalTransformer, _linear, _rotate_half
from mechfin_utils.core.head_labels import Node

ReplaceSite = Literal["resid_pre", "z", "attn_out", "mlp_out"]
REPLACE_SITES: tuple[str, ...] = ("resid_pre", "z", "attn_out", "mlp_out")
T = TypeVar("T")

__all__ = [
    "REPLACE_SITES",
    "BlockAttention",
    "EdgeRun",
    "Intervention",
    "Replace",
    "ReplaceSite",
    "Segment",
    "chunk_by_rows",
    "final_normed_plain_and_held",
    "final_normed_with_outputs_held",
    "output_replacement",
    "run",
    "run_edges",
]


@dataclass(frozen=True)
class Replace:
    """Overwrite ``site`` at ``layer`` and absolute ``positions`` with ``values``.

    ``values`` is ``[n or 1, len(positions), d_model]`` for ``resid_pre``/``attn_out``/``mlp_out`` and
    ``[n or 1, len(positions), len(heads), d_head]`` for ``z`` (a leading 1 applies the same values to every
    sequence of the segment). ``heads`` is only for ``z``. ``resid_pre`` at ``layer == n_layers`` is the
    stream after the last block (before the final norm).
    """

    site: ReplaceSite
    layer: int
    positions: tuple[int, ...]
    values: Tensor
    heads: tuple[int, ...] | None = None


@dataclass(frozen=True)
class BlockAttention:
    """At ``layer``, the queries at ``query_positions`` may not attend to ``key_positions`` (all heads, or
    ``heads``): their scores are set to ``-inf`` before the softmax, so those edges carry exactly nothing."""

    layer: int
    query_positions: tuple[int, ...]
    key_positions: tuple[int, ...]
    heads: tuple[int, ...] | None = None


Intervention = Replace | BlockAttention


@dataclass
class Segment:
    """``n`` sequences continuing prompts ``prompt_index`` of the reference run from ``start_layer`` and
    ``first_pos``; ``resid`` is the residual stream entering ``start_layer`` at positions ``first_pos ...``."""

    start_layer: int
    first_pos: int
    resid: Float[Tensor, "n rows d_model"]
    prompt_index: Int[Tensor, " n"]
    interventions: Sequence[Intervention] = field(default_factory=tuple)

    @property
    def n(self) -> int:
        return int(self.resid.shape[0])


# ---------------------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------------------


def _check_segments(fm: FunctionalTransformer, segments: Sequence[Segment], n_pos: int, n_read: int) -> None:
    """Every problem with every segment, raised at once, naming the segment and the intervention."""
    problems = []
    for s, seg in enumerate(segments):
        where = f"segment {s} (start_layer={seg.start_layer}, first_pos={seg.first_pos})"
        if not 0 <= seg.start_layer <= fm.n_layers:
            problems.append(f"{where}: start_layer outside [0, {fm.n_layers}]")
        if not 0 <= seg.first_pos <= n_pos - n_read:
            problems.append(
                f"{where}: first_pos must be in [0, {n_pos - n_read}] to read the last {n_read} position(s)"
            )
        if seg.resid.ndim != 3 or seg.resid.shape[1:] != (n_pos - seg.first_pos, fm.d_model):
            problems.append(
                f"{where}: resid {tuple(seg.resid.shape)} is not [n, {n_pos - seg.first_pos}, {fm.d_model}]"
            )
        if seg.prompt_index.shape != (seg.resid.shape[0],):
            problems.append(
                f"{where}: prompt_index {tuple(seg.prompt_index.shape)} does not match n={seg.resid.shape[0]}"
            )
        for i, iv in enumerate(seg.interventions):
            label = f"{where}, intervention {i} ({type(iv).__name__} at layer {iv.layer})"
            last_layer = fm.n_layers if isinstance(iv, Replace) and iv.site == "resid_pre" else fm.n_layers - 1
            if not seg.start_layer <= iv.layer <= last_layer:
                problems.append(
                    f"{label}: layer must be in [start_layer={seg.start_layer}, {last_layer}] (below the start it would never apply)"
                )
            if isinstance(iv, Replace):
                if iv.site not in REPLACE_SITES:
                    problems.append(f"{label}: site {iv.site!r} is not one of {REPLACE_SITES}")
                    continue
                if any(not seg.first_pos <= p < n_pos for p in iv.positions) or len(set(iv.positions)) != len(
                    iv.positions
                ):
                    problems.append(
                        f"{label}: positions {iv.positions} must be distinct and in [first_pos={seg.first_pos}, {n_pos})"
                    )
                if (iv.site == "z") != (iv.heads is not None):
                    problems.append(f"{label}: heads are given for site 'z' and only for it")
                tail: tuple[int, ...]
                if iv.site == "z":
                    tail = (len(iv.positions), len(iv.heads or ()), fm.d_head)
                    bad_head = [h for h in iv.heads or () if not 0 <= h < fm.n_heads]
                    if bad_head:
                        problems.append(f"{label}: heads {bad_head} outside [0, {fm.n_heads})")
                else:
                    tail = (len(iv.positions), fm.d_model)
                if (
                    iv.values.ndim != len(tail) + 1
                    or tuple(iv.values.shape[1:]) != tail
                    or iv.values.shape[0] not in (1, seg.n)
                ):
                    problems.append(
                        f"{label}: values {tuple(iv.values.shape)} are not [{seg.n} or 1, {', '.join(map(str, tail))}]"
                    )
            elif isinstance(iv, BlockAttention):
                if any(not seg.first_pos <= q < n_pos for q in iv.query_positions):
                    problems.append(
                        f"{label}: query positions {iv.query_positions} must be in [first_pos={seg.first_pos}, {n_pos})"
                    )
                if any(not 0 <= k < n_pos for k in iv.key_positions):
                    problems.append(f"{label}: key positions {iv.key_positions} outside [0, {n_pos})")
                for q in iv.query_positions:
                    if set(range(q + 1)) <= set(iv.key_positions):
                        problems.append(f"{label}: query {q} would attend to nothing (every key 0..{q} blocked)")
            else:
                problems.append(f"{label}: not a Replace or BlockAttention")
    if problems:
        raise ValueError("engine.run: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------------------
# Layout: where each segment's rows sit in the packed matrix
# ---------------------------------------------------------------------------------------------------------


@dataclass
class _Layout:
    """Packed-row bookkeeping. Segments are sorted by (start layer, first position) and packed in that order,
    so the rows running at layer ``L`` (segments with ``start_layer <= L``) are a prefix of the matrix: a
    segment *joins* the pass at its start layer."""

    segments: list[Segment]  # sorted
    row_offset: list[int]  # first packed row of each segment
    seq_offset: list[int]  # first sequence (over all segments) of each segment
    read_rows: Int[Tensor, " seqs_x_read"]  # packed rows of the positions read, sequence-major
    n_pos: int
    n_read: int
    joining_at: dict[int, list[int]] = field(init=False)  # start layer -> segments that join there
    blocks_at: dict[tuple[int, int], list[BlockAttention]] = field(init=False)  # (segment, layer) -> its blocks

    def __post_init__(self) -> None:
        """Indexed once here, so that the layer loop looks up instead of scanning every segment per layer."""
        self.joining_at, self.blocks_at = defaultdict(list), defaultdict(list)
        for s, seg in enumerate(self.segments):
            self.joining_at[seg.start_layer].append(s)
            for iv in seg.interventions:
                if isinstance(iv, BlockAttention):
                    self.blocks_at[(s, iv.layer)].append(iv)

    def rows(self, s: int, positions: Sequence[int], last: bool) -> Int[Tensor, "n k"]:
        """Row indices of ``positions`` for each of segment ``s``'s sequences: in the packed matrix, or, from the
        last layer's attention on (``last``), in the matrix of read rows."""
        seg = self.segments[s]
        pos = torch.tensor(positions, dtype=torch.long)
        seqs = torch.arange(seg.n)[:, None]
        if last:
            return (self.seq_offset[s] + seqs) * self.n_read + (pos - (self.n_pos - self.n_read))[None]
        return self.row_offset[s] + seqs * (self.n_pos - seg.first_pos) + (pos - seg.first_pos)[None]

    def joining(self, layer: int) -> list[int]:
        return self.joining_at.get(layer, [])


@dataclass
class _AttentionGroup:
    """The segments that share a first position (same number of rows), attended to in one call per layer."""

    first_pos: int
    members: list[int]  # segment indices, sorted by start layer
    starts: list[int]  # per member: its start layer (non-decreasing)
    rows: list[Tensor]  # per member: its packed rows
    read: list[Tensor]  # per member: its rows in the read-rows matrix
    prompts: list[Tensor]  # per member: prompt_index

    def active(self, layer: int) -> int:
        """How many members run at ``layer`` (a prefix: members are sorted by start layer)."""
        return bisect.bisect_right(self.starts, layer)


def _attention_groups(layout: _Layout) -> list[_AttentionGroup]:
    groups: dict[int, _AttentionGroup] = {}
    for s, seg in enumerate(layout.segments):
        group = groups.setdefault(seg.first_pos, _AttentionGroup(seg.first_pos, [], [], [], [], []))
        rows = layout.n_pos - seg.first_pos
        group.members.append(s)
        group.starts.append(seg.start_layer)
        group.rows.append(torch.arange(layout.row_offset[s], layout.row_offset[s] + seg.n * rows))
        seqs = layout.seq_offset[s] + torch.arange(seg.n)
        group.read.append((seqs[:, None] * layout.n_read + torch.arange(layout.n_read)[None]).reshape(-1))
        group.prompts.append(seg.prompt_index)
    return list(groups.values())


def _scatter_plan(fm: FunctionalTransformer, layout: _Layout) -> dict[tuple[str, int], tuple[Tensor, ...]]:
    """Per (site, layer): row indices (and head indices for ``z``) and the values to write there.

    From the last layer's attention on, only the rows read exist; writes there use their indices (a write at a
    position nobody reads is dropped: it cannot change the result)."""
    parts: dict[tuple[str, int], list[tuple[Tensor, ...]]] = defaultdict(list)
    for s, seg in enumerate(layout.segments):
        for iv in seg.interventions:
            if not isinstance(iv, Replace):
                continue
            key: tuple[str, int] = (iv.site, iv.layer)
            if iv.site == "resid_pre" and iv.layer == fm.n_layers and seg.start_layer == fm.n_layers:
                key = ("joined_after_last_block", fm.n_layers)  # written before this segment joins, packed rows
            last = (iv.site == "resid_pre" and key[0] == "resid_pre" and iv.layer == fm.n_layers) or (
                iv.site != "resid_pre" and iv.layer == fm.n_layers - 1
            )
            keep = [i for i, p in enumerate(iv.positions) if not last or p >= layout.n_pos - layout.n_read]
            if not keep:
                continue
            positions = [iv.positions[i] for i in keep]
            rows = layout.rows(s, positions, last)  # [n, k]
            values = iv.values[:, keep]
            values = values.expand(seg.n, *values.shape[1:])
            if iv.site == "z":
                heads = torch.tensor(iv.heads, dtype=torch.long)
                n, k, h = seg.n, len(positions), len(heads)
                parts[key].append(
                    (
                        rows[:, :, None].expand(n, k, h).reshape(-1),
                        heads[None, None].expand(n, k, h).reshape(-1),
                        values.reshape(-1, fm.d_head),
                    )
                )
            else:
                parts[key].append((rows.reshape(-1), values.reshape(-1, fm.d_model)))
    return {key: tuple(torch.cat(column) for column in zip(*items)) for key, items in parts.items()}


def _block_mask(
    fm: FunctionalTransformer, layout: _Layout, group: _AttentionGroup, n_active: int, layer: int
) -> Tensor | None:
    """``[sequences, head, q_rows, n_pos]``: the scores the group's active members block at ``layer`` (None if none)."""
    last = layer == fm.n_layers - 1
    q_first = layout.n_pos - layout.n_read if last else group.first_pos
    if not layout.blocks_at:  # no segment cuts any edge (patching, ablation, tracing)
        return None
    blocks = [layout.blocks_at.get((s, layer), []) for s in group.members[:n_active]]
    if not any(blocks):
        return None
    masks = []
    for s, found in zip(group.members[:n_active], blocks):
        mask = torch.zeros(1, fm.n_heads, layout.n_pos - q_first, layout.n_pos, dtype=torch.bool)
        for iv in found:
            heads = torch.tensor(iv.heads if iv.heads is not None else range(fm.n_heads), dtype=torch.long)[:, None]
            keys = torch.tensor(iv.key_positions, dtype=torch.long)[None, :]
            for q in iv.query_positions:
                if q >= q_first:
                    mask[0, heads, q - q_first, keys] = True
        masks.append(mask.expand(layout.segments[s].n, -1, -1, -1))
    return torch.cat(masks)


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------


def chunk_by_rows(items: Sequence[T], rows: Callable[[T], int], budget: int) -> Iterator[list[T]]:
    """Consecutive runs of ``items`` whose recomputed rows (``rows(item)``) fit ``budget``, to bound one pass's memory
    (an item larger than the budget on its own still runs, alone)."""
    chunk: list[T] = []
    used = 0
    for item in items:
        need = rows(item)
        if chunk and used + need > budget:
            yield chunk
            chunk, used = [], 0
        chunk.append(item)
        used += need
    if chunk:
        yield chunk


@torch.no_grad()
def run(
    fm: FunctionalTransformer,
    segments: Sequence[Segment],
    reference: ForwardRecord,
    n_read: int = 1,
) -> list[Float[Tensor, "n n_read d_model"]]:
    """Finish every segment's forward passes with its interventions; return, per segment, the final-normed
    residual stream at the last ``n_read`` positions (``fm.unembed`` or ``fm.answer_logits`` turns it into
    logits). All segments run in one packed pass; each joins it at its own start layer.
    """
    # 1. Checks, then the layout: segments sorted by (start layer, first position), rows packed in that order.
    n_pos = int(reference.tokens.shape[1])
    _check_segments(fm, segments, n_pos, n_read)
    if not segments:
        return []
    if any(seg.first_pos > 0 for seg in segments) and (reference.k is None or reference.v is None):
        raise ValueError("engine.run: the reference record must keep 'k' and 'v' (segments start after position 0)")
    order = sorted(range(len(segments)), key=lambda i: (segments[i].start_layer, segments[i].first_pos))
    ordered = [segments[i] for i in order]
    row_offset, seq_offset, read_rows, positions = [], [], [], []
    row = seq = 0
    for seg in ordered:
        rows = n_pos - seg.first_pos
        row_offset.append(row)
        seq_offset.append(seq)
        ends = row + torch.arange(1, seg.n + 1) * rows  # one past each sequence's last row
        read_rows.append((ends[:, None] - n_read + torch.arange(n_read)[None]).reshape(-1))
        positions.append(torch.arange(seg.first_pos, n_pos).repeat(seg.n))
        row += seg.n * rows
        seq += seg.n
    layout = _Layout(ordered, row_offset, seq_offset, torch.cat(read_rows), n_pos, n_read)
    groups = _attention_groups(layout)
    writes = _scatter_plan(fm, layout)
    all_positions = torch.cat(positions)
    tables = fm.rotary_tables(n_pos, torch.zeros(1, 1, fm.d_model, dtype=reference.final_normed.dtype))
    late = layout.joining(fm.n_layers)  # segments with no block to run
    n_loop_seqs = layout.seq_offset[late[0]] if late else seq
    loop_read_rows = layout.read_rows[: n_loop_seqs * n_read]  # the rows read, of segments that run blocks
    n_q, n_kv = fm.n_heads * fm.d_head, fm.n_kv_heads * fm.d_head

    def write(site: str, layer: int, act: Tensor) -> Tensor:
        """Writes in place: every ``act`` passed here is a fresh tensor this run made (a product, a sum, a cat)."""
        plan = writes.get((site, layer))
        if plan is None:
            return act
        if site == "z":
            rows_at, heads_at, values = plan
            act[rows_at, heads_at] = values.to(act.dtype)
        else:
            rows_at, values = plan
            act[rows_at] = values.to(act.dtype)
        return act

    # 2. Layers from the earliest start: segments join at their start layer (their rows are appended).
    x = torch.empty(0, fm.d_model, dtype=reference.final_normed.dtype)
    for layer in range(ordered[0].start_layer, fm.n_layers):
        joining = layout.joining(layer)
        if joining:
            x = torch.cat([x] + [layout.segments[s].resid.reshape(-1, fm.d_model) for s in joining])
        w = fm.layers[layer]
        last = layer == fm.n_layers - 1
        x = write("resid_pre", layer, x)
        h = fm.norm(x, w.ln1_w, w.ln1_b)
        # One fused product for Q, K and V, as in a plain forward pass; at the last layer the queries are kept
        # only where the result is read.
        qkv = _linear(h, w.W_QKV, w.b_QKV)
        q = qkv[:, :n_q][loop_read_rows] if last else qkv[:, :n_q]
        q = q.unflatten(-1, (fm.n_heads, fm.d_head))
        k = qkv[:, n_q : n_q + n_kv].unflatten(-1, (fm.n_kv_heads, fm.d_head))
        v = qkv[:, n_q + n_kv :].unflatten(-1, (fm.n_kv_heads, fm.d_head))
        if tables is not None:
            pos = all_positions[: x.shape[0]]
            cos, sin = tables[0][pos][:, None, :], tables[1][pos][:, None, :]
            k = k * cos + _rotate_half(k) * sin
            q_pos = pos[loop_read_rows] if last else pos
            q = q * tables[0][q_pos][:, None, :] + _rotate_half(q) * tables[1][q_pos][:, None, :]
        # 2a. Attention, one call per group of segments with the same first position; keys and values before
        #     the first position come from the reference run.
        z = torch.empty(q.shape, dtype=q.dtype)
        for group in groups:
            n_active = group.active(layer)
            if n_active == 0:
                continue
            rows_at = torch.cat(group.rows[:n_active])
            q_at = torch.cat(group.read[:n_active]) if last else rows_at
            prompts = torch.cat(group.prompts[:n_active])
            n_seq, rows = len(prompts), n_pos - group.first_pos
            q_rows = n_read if last else rows
            k_g = k[rows_at].view(n_seq, rows, fm.n_kv_heads, fm.d_head)
            v_g = v[rows_at].view(n_seq, rows, fm.n_kv_heads, fm.d_head)
            if group.first_pos > 0:
                k_g = torch.cat([reference.kept("k")[layer, prompts, : group.first_pos], k_g], dim=1)
                v_g = torch.cat([reference.kept("v")[layer, prompts, : group.first_pos], v_g], dim=1)
            q_g = q[q_at].view(n_seq, q_rows, fm.n_heads, fm.d_head)
            blocked = _block_mask(fm, layout, group, n_active, layer)
            z_g, _ = fm.attend(layer, q_g, k_g, v_g, n_pos - q_rows, blocked=blocked)
            z[q_at] = z_g.reshape(n_seq * q_rows, fm.n_heads, fm.d_head)
        # 2b. Output projection and MLP, with any replaced head outputs, attention or MLP outputs.
        z = write("z", layer, z)
        if last:
            x = x[loop_read_rows]
        x = x + write("attn_out", layer, fm.attn_output(layer, z))
        x = x + write("mlp_out", layer, fm.mlp(layer, x))
    # 3. Segments that start after the last block join here; the final norm at the rows read.
    x = write("resid_pre", fm.n_layers, x)
    if late:
        joined = torch.cat([layout.segments[s].resid.reshape(-1, fm.d_model) for s in late])
        first_row = layout.row_offset[late[0]]
        plan = writes.get(("joined_after_last_block", fm.n_layers))
        if plan is not None:
            rows_at, values = plan
            joined = joined.clone()
            joined[rows_at - first_row] = values.to(joined.dtype)
        joined = joined[layout.read_rows[n_loop_seqs * n_read :] - first_row]
        x = joined if x.shape[0] == 0 else torch.cat([x, joined])
    out = fm.final_norm(x).view(-1, n_read, fm.d_model).split([seg.n for seg in ordered])
    result: list[Tensor | None] = [None] * len(segments)
    for i, tensor in zip(order, out):
        result[i] = tensor
    return result  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------
# Components' outputs held at the last position (an ablation that runs with every prompt)
# ---------------------------------------------------------------------------------------------------------


def output_replacement(component: Node, position: int, value: Tensor) -> Replace:
    """The :class:`Replace` that writes ``value`` as ``component``'s output at ``position`` in every sequence of a
    segment: a head's mixed values ``z`` (``value`` has ``d_head`` entries) or an MLP's output (``d_model``)."""
    if component.head is None:
        return Replace("mlp_out", component.layer, (position,), value.reshape(1, 1, -1))
    return Replace("z", component.layer, (position,), value.reshape(1, 1, 1, -1), heads=(component.head,))


@torch.no_grad()
def final_normed_with_outputs_held(
    fm: FunctionalTransformer, tokens: Int[Tensor, "batch pos"], held: dict[Node, Tensor]
) -> Float[Tensor, "batch d_model"]:
    """The final-normed residual stream at the last position of every prompt of ``tokens`` (one token length),
    with each component of ``held`` writing its given value as its output at that position
    (:func:`final_normed_plain_and_held`'s second half)."""
    return final_normed_plain_and_held(fm, tokens, held)[1]


@torch.no_grad()
def final_normed_plain_and_held(
    fm: FunctionalTransformer, tokens: Int[Tensor, "batch pos"], held: dict[Node, Tensor]
) -> tuple[Float[Tensor, "batch d_model"], Float[Tensor, "batch d_model"]]:
    """The final-normed residual stream at the last position of every prompt of ``tokens`` (one token length):
    of the plain run, and with each component of ``held`` writing its given value as its output at that position.

    Stages:
        1. one plain forward pass, recorded (the residual stream entering every layer, keys and values): its last
           position is the plain answer;
        2. the last position only, continued from the earliest held layer with the held values written
           (causal attention: no earlier position can see the last one, so nothing else changes).
    A mean ablation at the answer position is this with each component's mean output.
    """
    if not held:
        raise ValueError("final_normed_with_outputs_held: no component to hold")
    wrong = [
        f"{c.name}: {tuple(v.shape)} values, expected {fm.d_model if c.head is None else fm.d_head}"
        for c, v in held.items()
        if v.numel() != (fm.d_model if c.head is None else fm.d_head)
    ] + [
        f"{c.name}: no such component in {fm.n_layers} layers x {fm.n_heads} heads"
        for c in held
        if not 0 <= c.layer < fm.n_layers or (c.head is not None and not 0 <= c.head < fm.n_heads)
    ]
    if wrong:
        raise ValueError("final_normed_with_outputs_held: " + "; ".join(wrong))
    # 1. the plain run
    record = fm.record(tokens, keep=("resid_pre", "k", "v"))
    # 2. the last position, from the earliest held layer on
    last, start = int(tokens.shape[1]) - 1, min(c.layer for c in held)
    segment = Segment(
        start,
        last,
        record.kept("resid_pre")[start][:, last:],
        torch.arange(int(tokens.shape[0])),
        [output_replacement(c, last, value) for c, value in held.items()],
    )
    return record.final_normed, run(fm, [segment], record)[0][:, -1]
