"""``make bench``'s node-pruning row: one ACDC-style pruning walk (notebooks 05, 08, 09 and 10) on the intervention
engine against the same walk through the TransformerLens bridge, on the same model, prompts and threshold.

A walk tests each of the model's heads and MLPs in turn (one pass per node over the task's prompts). Through the
bridge every pass is a full forward pass with hooks that swap in the ablated nodes' corrupted outputs
(``NodeAblator(backend="bridge")``, the reference the tests compare with). The engine (``backend="functional"``, the
default) starts each pass at the earliest ablated layer, from the first position where clean and corrupted prompts
differ, and unembeds only the positions the score reads. The row gives both walks' times and passes, whether they
kept the same nodes, and the largest difference of the circuit's per-prompt scores between the two backends beside
the scale of those scores (float rounding only).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from mechfin_utils.methods import circuits
from mechfin_utils.reporting.tables import markdown_table
from mechfin_utils.tasks import circuit_tasks


@dataclass
class NodeBenchRow:
    model: str
    prompts: int
    tokens: int
    n_nodes: int
    threshold: float
    passes: int
    bridge_seconds: float
    engine_seconds: float
    speedup: float
    same_circuit: bool
    circuit_nodes: int
    max_abs_diff: float
    score_scale: float


def bench_node_pruning(model, *, model_label: str, n_prompts: int = 8, threshold: float = 0.02) -> NodeBenchRow:
    """Prune greater-than (``n_prompts`` prompts, seed 0: notebook 10's node task) at ``threshold`` on both
    backends, timed from building the ablator (its reference runs) to the circuit."""
    task = circuit_tasks.greater_than_task(model, n_prompts=n_prompts, seed=0)
    walks = {}
    for backend in ("bridge", "functional"):
        started = time.perf_counter()
        ablator = circuits.NodeAblator(model, task, backend=backend)
        circuit = circuits.discover_circuit(ablator, threshold)
        walks[backend] = (ablator, circuit, time.perf_counter() - started)
    (bridge, bridge_circuit, bridge_seconds), (engine_ablator, engine_circuit, engine_seconds) = walks.values()
    ablated = [n for n in engine_ablator.nodes if n not in set(engine_circuit.nodes)]
    by_bridge, by_engine = bridge.prompt_scores(ablated), engine_ablator.prompt_scores(ablated)
    return NodeBenchRow(
        model=model_label,
        prompts=task.n_prompts,
        tokens=max(int(b.clean_tokens.shape[1]) for b in task.batches),
        n_nodes=len(engine_ablator.nodes),
        threshold=threshold,
        passes=engine_circuit.n_forward_passes,
        bridge_seconds=bridge_seconds,
        engine_seconds=engine_seconds,
        speedup=bridge_seconds / engine_seconds,
        same_circuit=set(bridge_circuit.nodes) == set(engine_circuit.nodes),
        circuit_nodes=len(engine_circuit.nodes),
        max_abs_diff=float((by_bridge - by_engine).abs().max()),
        score_scale=float(by_bridge.abs().max()),
    )


NODE_COLUMNS = (
    ("model", "{model}"),
    ("prompts x tokens", "{prompts} x {tokens}"),
    ("nodes", "{n_nodes}"),
    ("tau", "{threshold:g}"),
    ("passes", "{passes}"),
    ("bridge s", "{bridge_seconds:.1f}"),
    ("engine s", "{engine_seconds:.1f}"),
    ("speed-up", "{speedup:.1f}x"),
    ("same circuit (nodes)", lambda r: f"{'yes' if r.same_circuit else 'NO'} ({r.circuit_nodes})"),
    ("max |diff| (score scale)", "{max_abs_diff:.1e} ({score_scale:.2f})"),
)
"""The columns of the node-pruning table (:func:`mechfin_utils.reporting.tables.markdown_table`)."""


def format_node_table(rows: list[NodeBenchRow]) -> str:
    """A Markdown table of the node-pruning results."""
    return markdown_table(rows, NODE_COLUMNS)
