"""The intervention engine's second entry point: a forward pass in which every receiver of the computational graph
reads its own residual stream.

:func:`mechfin_utils.core.engine.run` intervenes on *activations* (a layer's residual stream, a head's output). Edge
methods (exact path patching of an edge set, EAP and EAP-IG) intervene on *edges* of the graph
(:mod:`mechfin_utils.core.graph`): what one receiver (a head's query, a key/value head's key or value, an MLP, the
logits) reads from one sender (the embedding, a head, an MLP), while every other receiver keeps what it had.
:func:`run_edges` makes that possible by giving every receiver its own copy of the residual stream:

* **patching**: in a receiver's copy, the chosen senders' outputs are swapped for those of another run (the corrupted
  run's, kept by ``keep_outputs=True``), *as each sender computes it in this very run*, so patching an edge changes
  what its receiver reads and nothing else, and the change flows on downstream through the unpatched edges;
* **offsets**: an offset added to each receiver's copy (zeros with ``requires_grad``) exposes the gradient of the
  result with respect to every receiver's input, the gradient EAP and EAP-IG multiply by each edge's activation
  difference.

Unlike :func:`~mechfin_utils.core.engine.run` it runs the whole model at every position (an edge set touches every
layer) and keeps every sender's output. ``tests/test_edges.py`` checks it against a naive path patching through
Hugging Face hooks. :mod:`mechfin_utils.core.engine` re-exports :func:`run_edges` and :class:`EdgeRun`.

Shapes: sender outputs ``[n_senders, n, pos, d_model]``, receiver inputs ``[n_receivers, n, pos, d_model]``, numbered
as in :class:`~mechfin_utils.core.graph.ComputationalGraph`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechfin_utils.core.functional import FunctionalTransformer, _rotate_half
from mechfin_utils.core.graph import ComputationalGraph

COPY_BELOW_SHARE_OF_SENDERS = 2
"""A receiver group's patched-edge sum runs over a copy of the senders that have an edge to sum when fewer than one
sender in this many has one, and over a view of every sender so far otherwise (no copy; the senders without an edge
weigh 0 in the product). Both give the same sums up to float rounding (tested)."""


@dataclass
class EdgeRun:
    """What :func:`run_edges` returns: the final-normed residual at the positions read and, if asked, every
    sender's output (``[n_senders, n, pos, d_model]``, numbered as in :class:`~mechfin_utils.core.graph.ComputationalGraph`)."""

    final_normed: Float[Tensor, "n n_read d_model"]
    outputs: Float[Tensor, "n_senders n pos d_model"] | None = None


def _check_edge_run(
    fm: FunctionalTransformer,
    graph: ComputationalGraph,
    tokens: Tensor,
    patched: Tensor | None,
    sources: Tensor | None,
    embeddings: Tensor | None,
    receiver_offsets: Tensor | None,
    read_ends: Tensor | None = None,
    n_read: int = 1,
) -> None:
    """Every problem with the arguments, raised at once, naming the argument."""
    problems = []
    n, n_pos = tokens.shape
    if read_ends is not None:
        if tuple(read_ends.shape) != (n,):
            problems.append(f"read_ends {tuple(read_ends.shape)} is not [{n}] (one end per prompt)")
        elif bool(((read_ends < n_read) | (read_ends > n_pos)).any()):
            problems.append(
                f"read_ends must lie in [{n_read}, {n_pos}] to read {n_read} position(s), got {read_ends.tolist()}"
            )
    if (graph.n_layers, graph.n_heads, graph.n_kv_heads) != (fm.n_layers, fm.n_heads, fm.n_kv_heads):
        problems.append(f"graph {graph} does not describe {fm.name}")
    if patched is not None:
        if patched.shape != (graph.n_senders, graph.n_receivers) or patched.dtype != torch.bool:
            problems.append(
                f"patched must be bool [{graph.n_senders}, {graph.n_receivers}], got {patched.dtype} {tuple(patched.shape)}"
            )
        elif bool((patched & ~graph.valid()).any()):
            bad = (patched & ~graph.valid()).nonzero()[:3].tolist()
            examples = [graph.edge_name(sender, receiver) for sender, receiver in bad]
            problems.append(f"patched holds cells that are not edges, e.g. {examples}")
        if sources is None:
            problems.append("patched edges need sources (the patching run's sender outputs)")
    want = (graph.n_senders, n, n_pos, fm.d_model)
    if sources is not None and tuple(sources.shape) != want:
        problems.append(f"sources {tuple(sources.shape)} are not {list(want)}")
    if embeddings is not None and tuple(embeddings.shape) != (n, n_pos, fm.d_model):
        problems.append(f"embeddings {tuple(embeddings.shape)} are not [{n}, {n_pos}, {fm.d_model}]")
    want = (graph.n_receivers, n, n_pos, fm.d_model)
    if receiver_offsets is not None and tuple(receiver_offsets.shape) != want:
        problems.append(f"receiver_offsets {tuple(receiver_offsets.shape)} are not {list(want)}")
    if problems:
        raise ValueError("engine.run_edges: " + "; ".join(problems))


def run_edges(
    fm: FunctionalTransformer,
    graph: ComputationalGraph,
    tokens: Int[Tensor, "n pos"],
    *,
    patched: Bool[Tensor, "n_senders n_receivers"] | None = None,
    sources: Float[Tensor, "n_senders n pos d_model"] | None = None,
    embeddings: Float[Tensor, "n pos d_model"] | None = None,
    receiver_offsets: Float[Tensor, "n_receivers n pos d_model"] | None = None,
    n_read: int = 1,
    read_ends: Int[Tensor, " n"] | None = None,
    keep_outputs: bool = False,
    kept_sum_above: float = 0.5,
) -> EdgeRun:
    """A full forward pass in which every receiver of ``graph`` reads its own residual stream.

    A receiver (a head's query, a key/value head's key or value, an MLP, the logits) reads

        stream + sum over senders with patched[sender, receiver] of (sources[sender] - current[sender])
               + receiver_offsets[receiver]

    the stream every receiver of its place shares, with each patched edge's sender output swapped for the one in
    ``sources`` (the corrupted run's, from ``keep_outputs=True``), *as that sender computes it in this very run* -- so
    patching an edge changes what its receiver reads and nothing else, and the change flows on downstream through the
    unpatched edges. This is exact path patching for any set of edges at once. ``receiver_offsets`` (zeros with
    ``requires_grad``) exposes the gradient of the result with respect to every receiver's input: the gradient that
    EAP and EAP-IG multiply by each edge's activation difference. ``embeddings`` replaces the token (and position)
    embedding, the ``input`` sender's output.

    ``kept_sum_above``: the share of a receiver group's edges patched above which the sum runs over the kept edges
    instead (the every-edge difference minus the kept ones; 1.0 never does, for checks). Both give the same numbers
    up to float rounding; the cost follows the smaller set.

    ``read_ends``: prompts of several lengths padded on the right into one batch, each read at its own last
    ``n_read`` positions (``read_ends[i] - n_read`` up to ``read_ends[i]``; default: the batch's last positions). Causal
    attention keeps the padding out of every real position, so each prompt's result is its own run's.

    Not decorated with ``torch.no_grad``: call it under ``torch.no_grad()`` unless gradients are wanted.
    """
    # 1. Checks; the embedding is sender 0.
    _check_edge_run(fm, graph, tokens, patched, sources, embeddings, receiver_offsets, read_ends, n_read)
    n, n_pos = tokens.shape
    x = fm.embed(tokens) if embeddings is None else embeddings
    outputs: list[Tensor] = [x]  # every sender's output, kept only when asked for (keep_outputs)
    n_sent = 1  # senders run so far (the embedding is sender 0)
    tables = fm.rotary_tables(n_pos, x.detach())
    H, KV, dh = fm.n_heads, fm.n_kv_heads, fm.d_head
    any_patched = patched is not None and bool(patched.any())
    # Each sender's patching difference, sources[k] - outputs[k], written once when the sender has run (a receiver
    # reads a sum of them: a view of the senders so far, never a copy per read), and their running sum: what a
    # receiver with *every* edge from the senders so far patched adds.
    diffs: Tensor | None = None
    every_edge = x  # replaced below when edges are patched
    if any_patched and sources is not None:
        diffs = torch.empty_like(sources)
        diffs[0] = sources[0] - x
        every_edge = diffs[0].clone()
    # The offsets in the groups the receivers read them in (each layer's attention receivers, its MLP, the logits),
    # split once: a slice per read would make autograd write a zero tensor of every receiver's size per read (most of
    # EAP's time before), a split's backward joins the groups' gradients in one pass.
    offset_groups: dict[int, Tensor] = {}
    if receiver_offsets is not None:
        starts = [
            r
            for layer in range(graph.n_layers)
            for r in (graph.attention_receivers(layer).start, graph.mlp_receiver(layer))
        ]
        starts.append(graph.logits_receiver)
        sizes = [end - start for start, end in zip(starts, [*starts[1:], graph.n_receivers])]
        offset_groups = dict(zip(starts, receiver_offsets.split(sizes)))

    def sent(output: Tensor) -> None:
        """Record a sender's output (the next sender number), its patching difference and the running sum."""
        nonlocal n_sent, every_edge
        if diffs is not None and sources is not None:
            torch.sub(sources[n_sent], output, out=diffs[n_sent])
            every_edge = every_edge + diffs[n_sent]
        n_sent += 1
        if keep_outputs:
            outputs.append(output)

    def edge_sum(weights: Tensor) -> Tensor:
        """``sum_k weights[k, r] diffs[k]`` over the senders so far, ``[R, n, pos, d]``: one product, over a view of
        every sender so far when most of them have an edge to sum, else over a copy of those that do."""
        assert diffs is not None  # patched edges come with sources (checked)
        n_senders, n_receivers = weights.shape
        senders = weights.any(1).nonzero().flatten()
        if senders.numel() == 0:
            return torch.zeros_like(x)[None].expand(n_receivers, *x.shape)
        if senders.numel() * COPY_BELOW_SHARE_OF_SENDERS < n_senders:
            return torch.einsum("kr,knpd->rnpd", weights[senders].to(diffs.dtype), diffs[senders])
        return torch.einsum("kr,knpd->rnpd", weights.to(diffs.dtype), diffs[:n_senders])

    def read(stream: Tensor, receivers: slice | int) -> Tensor:
        """What ``receivers`` read: ``stream`` plus their patched edges' differences and offsets (``[R, n, pos, d]``
        for a slice, ``[n, pos, d]`` for one receiver).

        Every sender so far is an edge into these receivers, so when most of those edges are patched the same sum
        is the every-edge difference (the running sums) minus the kept edges' differences: the work follows the
        smaller of the patched and the kept edge sets (a circuit of a few hundred edges keeps 70,000 patched)."""
        one = isinstance(receivers, int)
        cols = slice(receivers, receivers + 1) if isinstance(receivers, int) else receivers
        out = stream[None]
        if any_patched and patched is not None:
            weights = patched[:n_sent, cols]
            if int(weights.sum()) > kept_sum_above * weights.numel():
                out = out + every_edge[None] - edge_sum(~weights)
            else:
                out = out + edge_sum(weights)
        if offset_groups:
            out = out + offset_groups[cols.start]
        return out[0] if one else out

    # 2. Each layer: per-receiver query/key/value inputs, per-head outputs, the MLP on its own input.
    for layer in range(fm.n_layers):
        w = fm.layers[layer]
        inputs = read(x, graph.attention_receivers(layer))  # [R, n, pos, d] (R = 1 when nothing differs)
        normed = fm.norm(inputs, w.ln1_w, w.ln1_b)
        W = w.W_QKV.view(fm.d_model, H + 2 * KV, dh)
        if normed.shape[0] == 1:
            proj = torch.einsum("npd,drh->nprh", normed[0], W)
        else:
            proj = torch.einsum("rnpd,drh->nprh", normed, W)
        if w.b_QKV is not None:
            proj = proj + w.b_QKV.view(H + 2 * KV, dh)
        q, k, v = proj[:, :, :H], proj[:, :, H : H + KV], proj[:, :, H + KV :]
        if tables is not None:
            cos, sin = tables[0][:, None, :], tables[1][:, None, :]
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
        z, _ = fm.attend(layer, q, k, v, 0)
        heads = torch.einsum("nphk,hkd->hnpd", z, w.W_O.view(H, dh, fm.d_model))  # [H, n, pos, d]
        for head in heads.unbind(0):
            sent(head)
        attn_out = heads.sum(0) if w.b_O is None else heads.sum(0) + w.b_O
        x = x + attn_out
        mlp_out = fm.mlp(layer, read(x, graph.mlp_receiver(layer)))
        sent(mlp_out)
        x = x + mlp_out
    # 3. The logits read the stream after the last block (with their own patched edges); final norm where read.
    final = read(x, graph.logits_receiver)
    if read_ends is None:
        final = final[:, n_pos - n_read :]
    else:
        final = final[torch.arange(n)[:, None], read_ends[:, None] - n_read + torch.arange(n_read)[None]]
    return EdgeRun(
        final_normed=fm.final_norm(final),
        outputs=torch.stack(outputs) if keep_outputs else None,
    )
