"""The survey's method families, each a subpackage that runs on the core's models and engine and the tasks' data.

* ``readout`` — reading the residual stream without intervening: attention, direct logit attribution, the logit lens,
  FFN value vectors and embedding-space circuits (projection to the vocabulary);
* ``patching`` — activation patching (every component, position and head), attribution patching, patching by segment
  for pairs of unequal length, at the answer position, and across models;
* ``circuits`` — node-level pruning (ACDC-style), edge-level circuits (EAP, EAP-IG, exact edge patching), IOI head roles,
  knowledge circuits;
* ``tracing`` — causal tracing (ROME) and attention knockout (Geva et al.);
* ``editing`` — ROME, MEMIT, FT-L and their CounterFact-style evaluation;
* ``neurons`` — arithmetic neurons (Yu & Ananiadou).

Subpackages may import one another without cycles; none imports the screener, reporting or tooling.
"""
