"""A functional forward pass for GPT-2 and Llama-family models: the model's own maths as plain tensor functions.

Why a second forward pass next to the TransformerLens bridge? Every causal method asks the same question
thousands of times: "if this activation were different, what would the final answer logits be?" The
bridge can only answer it by running the whole model from the first token of the first layer. The pieces
here (one block's Q/K/V, attention, output projection and MLP, and :meth:`FunctionalTransformer.record`
of a full run) let :mod:`mechfin_utils.core.engine` answer it by running only what can change:

* an intervention at layer ``L`` leaves every layer before ``L`` untouched, so a run can **start from a
  cached residual stream** at any layer;
* attention is causal, so a change at position ``p`` leaves positions ``< p`` untouched at every layer;
  their keys and values are taken from the recorded run (a *key/value prefix*) and only positions ``>= p``
  are recomputed;
* the metric reads the final position only, so the last layer computes its queries, attention output and
  MLP for that one position (keys and values are still needed at every recomputed position).

The maths is the Hugging Face model's own (same weights, read from the modules the bridge wraps, same
norms, same rotary tables from the model's own rotary module); :func:`tests/test_patching.py` checks the
logits against the bridge to ~1e-5. Only the two families below are implemented; anything else raises
:class:`UnsupportedArchitecture` (the patching module then falls back to a slower, exact bridge path).

:func:`functional_model` is the one way the methods get it: built once per model and cached.

Shapes follow TransformerLens conventions: ``[batch, pos, d_model]`` residuals, ``[batch, pos, head,
d_head]`` queries/keys/values/head outputs (keys and values have ``n_kv_heads`` heads on grouped-query
models), ``[batch, head, dest_pos, src_pos]`` attention patterns. Queries and keys are stored *after* the
rotary embedding (the form the attention scores use). TransformerLens's ``hook_q``/``hook_k`` are *before*
it; because a patch always moves a clean vector to the same position in the corrupted run, and the rotation
depends only on the position, patching either form gives the same result.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

Family = Literal["gpt2", "llama"]
SUPPORTED_ARCHITECTURES: dict[str, Family] = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama"}

ModuleTree = Any
"""A Hugging Face (or bridge) module read by attribute name: ``hf.transformer.h[0].attn.c_proj.weight``.
``nn.Module.__getattr__`` is typed ``Tensor | Module``, so such a path has no useful static type; what is read is
checked where it matters (the architecture's name, ``isinstance(module, nn.Linear)``, shapes)."""


class UnsupportedArchitecture(NotImplementedError):
    """The functional forward pass does not implement this model's architecture (or one of its options)."""


def unwrap(module: ModuleTree) -> ModuleTree:
    """The Hugging Face module inside TransformerLens bridge wrappers (the module itself when unwrapped)."""
    while getattr(module, "original_component", None) is not None:
        module = module.original_component
    return module


@dataclass
class LayerWeights:
    """One block's weights, laid out for ``x @ W`` (``[d_in, d_out]``); biases are None where absent."""

    ln1_w: Tensor
    ln1_b: Tensor | None
    W_QKV: Float[Tensor, "d_model qkv"]  # [W_Q | W_K | W_V], heads contiguous within each part
    b_QKV: Tensor | None
    W_O: Float[Tensor, "head_d_head d_model"]
    b_O: Tensor | None
    ln2_w: Tensor
    ln2_b: Tensor | None
    W_in: Float[Tensor, "d_model d_mlp"]  # GPT-2: the MLP's input map; Llama: the "up" map
    b_in: Tensor | None
    W_gate: Tensor | None  # Llama's gate map (None for GPT-2)
    b_gate: Tensor | None
    W_out: Float[Tensor, "d_mlp d_model"]
    b_out: Tensor | None
    attn_scale: float


RECORD_FIELDS = ("resid_pre", "resid_mid", "attn_out", "mlp_out", "q", "k", "v", "z", "pattern")
"""Activations a :class:`ForwardRecord` can keep (``resid_pre`` always includes the stream after the last block)."""


@dataclass
class ForwardRecord:
    """Activations of one full forward pass, one entry per layer on axis 0 (None where not kept).

    ``resid_pre[n_layers]`` is the residual stream after the last block (before the final norm), so
    ``resid_post`` is ``resid_pre[1:]``. ``q`` and ``k`` are post-rotary. ``final_normed`` is the
    final-normed residual at the last position.
    """

    tokens: Int[Tensor, "batch pos"]
    final_normed: Float[Tensor, "batch d_model"]
    resid_pre: Float[Tensor, "layer_plus_1 batch pos d_model"] | None = None
    resid_mid: Float[Tensor, "layer batch pos d_model"] | None = None
    attn_out: Float[Tensor, "layer batch pos d_model"] | None = None
    mlp_out: Float[Tensor, "layer batch pos d_model"] | None = None
    q: Float[Tensor, "layer batch pos head d_head"] | None = None
    k: Float[Tensor, "layer batch pos kv_head d_head"] | None = None
    v: Float[Tensor, "layer batch pos kv_head d_head"] | None = None
    z: Float[Tensor, "layer batch pos head d_head"] | None = None
    pattern: Float[Tensor, "layer batch head dest_pos src_pos"] | None = None

    @property
    def resid_post(self) -> Float[Tensor, "layer batch pos d_model"]:
        return self.kept("resid_pre")[1:]

    def kept(self, name: str) -> Tensor:
        """The activation ``name`` (one of :data:`RECORD_FIELDS`), which this record must have kept."""
        value: Tensor | None = getattr(self, name)
        if value is None:
            raise ValueError(f"this ForwardRecord did not keep {name}")
        return value


class FunctionalTransformer:
    """GPT-2 / Llama forward pass as plain tensor functions over the Hugging Face model's weights.

    Build it with :meth:`from_model` (a ``LoadedModel``, a bridge, or a Hugging Face model). It holds
    references to the model's parameters (no copies except the fused QKV / gate-up matrices, made once).
    """

    family: Family
    name: str
    config: ModuleTree  # the Hugging Face config, read by attribute name
    n_layers: int
    n_heads: int
    n_kv_heads: int  # = n_heads, except under grouped-query attention
    n_rep: int  # query heads per key/value head
    d_model: int
    d_head: int
    d_vocab: int
    eps: float
    act: Callable[[Tensor], Tensor]
    W_E: Float[Tensor, "d_vocab d_model"]
    W_pos: Float[Tensor, "n_ctx d_model"] | None
    rotary: ModuleTree  # Llama's rotary module: (x, positions) -> (cos, sin)
    layers: list[LayerWeights]
    lnf_w: Tensor
    lnf_b: Tensor | None
    W_U: Float[Tensor, "d_vocab d_model"]  # nn.Linear layout: logits = x @ W_U.T
    b_U: Tensor | None

    def __init__(self, hf_model: torch.nn.Module, name: str = "model"):
        hf = unwrap(hf_model)
        arch = type(hf).__name__
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitecture(
                f"{name}: the functional forward pass implements {sorted(SUPPORTED_ARCHITECTURES)}, not {arch}"
            )
        self.family = SUPPORTED_ARCHITECTURES[arch]
        self.name = name
        self.config = hf.config
        with torch.no_grad():
            if self.family == "gpt2":
                self._load_gpt2(hf)
            else:
                self._load_llama(hf)
        self.n_layers = len(self.layers)
        self.n_rep = self.n_heads // self.n_kv_heads
        self._rotary_cache: dict[int, tuple[Tensor, Tensor]] = {}

    # ------------------------------------------------------------------------------------------------
    # Construction
    # ------------------------------------------------------------------------------------------------

    @classmethod
    def from_model(cls, model: ModuleTree) -> FunctionalTransformer:
        """From a ``LoadedModel`` (uses its display name in messages), a bridge, or a Hugging Face model."""
        if hasattr(model, "bridge") and hasattr(model, "spec"):
            return cls(model.hf_model, name=model.name)
        if hasattr(model, "original_model"):
            return cls(model.original_model, name=getattr(model.cfg, "model_name", "model"))
        return cls(model)

    def _refuse(self, what: str) -> None:
        raise UnsupportedArchitecture(f"{self.name}: {what} is not implemented by the functional forward pass")

    def _load_gpt2(self, hf: ModuleTree) -> None:
        cfg = hf.config
        if getattr(cfg, "reorder_and_upcast_attn", False):
            self._refuse("GPT-2 reorder_and_upcast_attn")
        if getattr(cfg, "add_cross_attention", False):
            self._refuse("GPT-2 cross-attention")
        body = unwrap(hf.transformer)
        self.n_heads = cfg.n_head
        self.n_kv_heads = cfg.n_head
        self.d_model = cfg.n_embd
        self.d_head = cfg.n_embd // cfg.n_head
        self.eps = cfg.layer_norm_epsilon
        self.act = _activation(cfg.activation_function, self.name)
        self.W_E = unwrap(body.wte).weight
        self.W_pos = unwrap(body.wpe).weight
        self.layers = []
        for index, block in enumerate(body.h):
            block = unwrap(block)
            attn, mlp = unwrap(block.attn), unwrap(block.mlp)
            ln1, ln2 = unwrap(block.ln_1), unwrap(block.ln_2)
            W_QKV, b_QKV = _gpt2_qkv(block.attn, unwrap(attn.c_attn))
            c_proj = unwrap(attn.c_proj)  # Conv1D: y = x @ W + b
            c_fc, mlp_proj = unwrap(mlp.c_fc), unwrap(mlp.c_proj)
            scale = 1.0 / math.sqrt(self.d_head) if cfg.scale_attn_weights else 1.0
            if cfg.scale_attn_by_inverse_layer_idx:
                scale /= float(index + 1)
            self.layers.append(
                LayerWeights(
                    ln1_w=ln1.weight,
                    ln1_b=ln1.bias,
                    W_QKV=W_QKV,
                    b_QKV=b_QKV,
                    W_O=c_proj.weight,
                    b_O=c_proj.bias,
                    ln2_w=ln2.weight,
                    ln2_b=ln2.bias,
                    W_in=c_fc.weight,
                    b_in=c_fc.bias,
                    W_gate=None,
                    b_gate=None,
                    W_out=mlp_proj.weight,
                    b_out=mlp_proj.bias,
                    attn_scale=scale,
                )
            )
        lnf = unwrap(body.ln_f)
        self.lnf_w, self.lnf_b = lnf.weight, lnf.bias
        self._load_unembed(hf)

    def _load_llama(self, hf: ModuleTree) -> None:
        cfg = hf.config
        if getattr(cfg, "pretraining_tp", 1) not in (None, 1):
            self._refuse(f"pretraining_tp={cfg.pretraining_tp}")
        body = unwrap(hf.model)
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads or cfg.num_attention_heads
        self.d_model = cfg.hidden_size
        self.d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        self.act = _activation(cfg.hidden_act, self.name)
        self.W_E = unwrap(body.embed_tokens).weight
        self.W_pos = None
        self.rotary = unwrap(body.rotary_emb)
        self.layers = []
        for block in body.layers:
            block = unwrap(block)
            attn, mlp = unwrap(block.self_attn), unwrap(block.mlp)
            q, k, v, o = (unwrap(getattr(attn, n)) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
            gate, up, down = (unwrap(getattr(mlp, n)) for n in ("gate_proj", "up_proj", "down_proj"))
            b_qkv = None
            if q.bias is not None:
                b_qkv = torch.cat([q.bias, k.bias, v.bias])
            # nn.Linear stores [d_out, d_in]; ``.T`` is a view (no copy), only the small fused QKV is copied.
            self.layers.append(
                LayerWeights(
                    ln1_w=unwrap(block.input_layernorm).weight,
                    ln1_b=None,
                    W_QKV=torch.cat([q.weight, k.weight, v.weight]).T,
                    b_QKV=b_qkv,
                    W_O=o.weight.T,
                    b_O=o.bias,
                    ln2_w=unwrap(block.post_attention_layernorm).weight,
                    ln2_b=None,
                    W_in=up.weight.T,
                    b_in=up.bias,
                    W_gate=gate.weight.T,
                    b_gate=gate.bias,
                    W_out=down.weight.T,
                    b_out=down.bias,
                    attn_scale=float(attn.scaling),
                )
            )
        self.lnf_w, self.lnf_b = unwrap(body.norm).weight, None
        self._load_unembed(hf)

    def _load_unembed(self, hf: ModuleTree) -> None:
        head = unwrap(hf.lm_head)
        self.W_U = head.weight
        self.b_U = head.bias
        self.d_vocab = self.W_U.shape[0]

    # ------------------------------------------------------------------------------------------------
    # Pieces of a block
    # ------------------------------------------------------------------------------------------------

    def norm(self, x: Float[Tensor, "... d_model"], w: Tensor, b: Tensor | None) -> Float[Tensor, "... d_model"]:
        """LayerNorm (GPT-2) or RMSNorm computed as Hugging Face does (float32 inside)."""
        if self.family == "gpt2":
            return F.layer_norm(x, (self.d_model,), w, b, self.eps)
        variance = x.pow(2).mean(-1, keepdim=True)
        return w * (x * torch.rsqrt(variance + self.eps))

    def rotary_tables(self, n_pos: int, like: Tensor) -> tuple[Tensor, Tensor] | None:
        """``(cos, sin)`` of shape ``[n_pos, d_head]`` from the model's own rotary module (Llama), else None."""
        if self.family != "llama":
            return None
        if n_pos not in self._rotary_cache:
            positions = torch.arange(n_pos, device=like.device)[None]
            cos, sin = self.rotary(like[:1, :1].expand(1, n_pos, -1), positions)
            self._rotary_cache[n_pos] = (cos[0], sin[0])
        return self._rotary_cache[n_pos]

    def qkv(
        self, layer: int, x: Float[Tensor, "n rows d_model"], first_pos: int, n_pos: int
    ) -> tuple[
        Float[Tensor, "n rows head d_head"], Float[Tensor, "n rows kv d_head"], Float[Tensor, "n rows kv d_head"]
    ]:
        """Queries, keys (both post-rotary) and values of residual rows at positions ``first_pos ...``.

        ``x`` is the *un-normalised* residual; ``n_pos`` is the full prompt length (for the rotary table).
        """
        w = self.layers[layer]
        h = self.norm(x, w.ln1_w, w.ln1_b)
        qkv = _linear(h, w.W_QKV, w.b_QKV)
        n_q, n_kv = self.n_heads * self.d_head, self.n_kv_heads * self.d_head
        q = qkv[..., :n_q].unflatten(-1, (self.n_heads, self.d_head))
        k = qkv[..., n_q : n_q + n_kv].unflatten(-1, (self.n_kv_heads, self.d_head))
        v = qkv[..., n_q + n_kv :].unflatten(-1, (self.n_kv_heads, self.d_head))
        tables = self.rotary_tables(n_pos, x)
        if tables is not None:
            rows = x.shape[-2]
            cos = tables[0][first_pos : first_pos + rows, None, :]
            sin = tables[1][first_pos : first_pos + rows, None, :]
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
        return q, k, v

    def attend(
        self,
        layer: int,
        q: Float[Tensor, "n q_rows head d_head"],
        k: Float[Tensor, "n kv_rows kv d_head"],
        v: Float[Tensor, "n kv_rows kv d_head"],
        first_query_pos: int,
        return_pattern: bool = False,
        blocked: Tensor | None = None,
    ) -> tuple[Float[Tensor, "n q_rows head d_head"], Tensor | None]:
        """Causal attention of query rows at positions ``first_query_pos ...`` over key rows ``0 ...``.

        ``k``/``v`` must hold every position from 0 up to the last query position (prefix + recomputed
        rows). Grouped-query heads share a key/value head as in Hugging Face's ``repeat_kv`` (query head
        ``h`` reads key/value head ``h // n_rep``). ``blocked`` (boolean, broadcastable to ``[n, head,
        q_rows, kv_rows]``) sets those scores to ``-inf`` before the softmax (attention knockout).
        """
        n, q_rows = q.shape[0], q.shape[1]
        kv_rows = k.shape[1]
        # [n, kv, rep * q_rows, d_head]: the rep query heads of one key/value head are stacked on rows.
        qh = q.permute(0, 2, 1, 3).reshape(n, self.n_kv_heads, self.n_rep * q_rows, self.d_head)
        kh = k.permute(0, 2, 3, 1)  # [n, kv, d_head, kv_rows]
        vh = v.permute(0, 2, 1, 3)  # [n, kv, kv_rows, d_head]
        scores = torch.matmul(qh, kh) * self.layers[layer].attn_scale
        scores = scores.view(n, self.n_heads, q_rows, kv_rows)
        query_pos = torch.arange(first_query_pos, first_query_pos + q_rows, device=q.device)
        key_pos = torch.arange(kv_rows, device=q.device)
        future = key_pos[None, :] > query_pos[:, None]
        if bool(future.any()):
            scores = scores.masked_fill(future, float("-inf"))
        if blocked is not None:
            scores = scores.masked_fill(blocked, float("-inf"))
        pattern = torch.softmax(scores, dim=-1)
        z = torch.matmul(pattern.view(n, self.n_kv_heads, self.n_rep * q_rows, kv_rows), vh)
        z = z.view(n, self.n_heads, q_rows, self.d_head).permute(0, 2, 1, 3)
        return z, (pattern if return_pattern else None)

    def attn_output(self, layer: int, z: Float[Tensor, "... rows head d_head"]) -> Float[Tensor, "... rows d_model"]:
        w = self.layers[layer]
        return _linear(z.flatten(-2), w.W_O, w.b_O)

    def head_write(self, layer: int, dz: Float[Tensor, "... rows head d_head"]) -> Float[Tensor, "... rows d_model"]:
        """``sum_h dz[h] @ W_O[h]``: the change in attention output caused by a change ``dz`` of head outputs.

        No bias: a change of ``z`` moves the output by the linear map alone.
        """
        return dz.flatten(-2) @ self.layers[layer].W_O

    def mlp(self, layer: int, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """The MLP's output for un-normalised residual rows ``x`` (the block's second norm included)."""
        w = self.layers[layer]
        normed = self.norm(x, w.ln2_w, w.ln2_b)
        h = _linear(normed, w.W_in, w.b_in)
        if w.W_gate is None:
            h = self.act(h)
        else:
            h = self.act(_linear(normed, w.W_gate, w.b_gate)) * h
        return _linear(h, w.W_out, w.b_out)

    def final_norm(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        return self.norm(x, self.lnf_w, self.lnf_b)

    def unembed(self, normed: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
        return F.linear(normed, self.W_U, self.b_U)

    def answer_logits(self, normed: Float[Tensor, "n d_model"], answers: Int[Tensor, "n k"]) -> Float[Tensor, "n k"]:
        """Logits of ``answers[i]`` only, for each row ``i`` (no full unembedding)."""
        columns = self.W_U[answers]  # [n, k, d_model]
        out = torch.einsum("nd,nkd->nk", normed, columns)
        if self.b_U is not None:
            out = out + self.b_U[answers]
        return out

    def logit_diff(
        self, normed: Float[Tensor, "n d_model"], answers: Int[Tensor, "n 2"] | Int[Tensor, "1 2"]
    ) -> Float[Tensor, " n"]:
        """``logit(answers[i, 0]) - logit(answers[i, 1])`` from final-normed rows (one answer pair for all rows when
        ``answers`` has one row)."""
        two = self.answer_logits(normed, answers.expand(normed.shape[0], 2))
        return two[:, 0] - two[:, 1]

    def embed(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        x = self.W_E[tokens]
        if self.W_pos is not None:
            x = x + self.W_pos[: tokens.shape[1]]
        return x

    # ------------------------------------------------------------------------------------------------
    # Whole passes
    # ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def record(
        self,
        tokens: Int[Tensor, "batch pos"],
        keep: Sequence[str] = RECORD_FIELDS,
        embeddings: Float[Tensor, "batch pos d_model"] | None = None,
    ) -> ForwardRecord:
        """One full forward pass keeping the activations named in ``keep`` (see :data:`RECORD_FIELDS`).

        ``embeddings`` replaces ``embed(tokens)`` as the stream entering block 0 (causal tracing records its
        noised runs this way: :meth:`embed` plus noise on the subject's rows).
        """
        unknown = set(keep) - set(RECORD_FIELDS)
        if unknown:
            raise ValueError(f"keep names unknown activations {sorted(unknown)}; choose from {RECORD_FIELDS}")
        n_pos = tokens.shape[1]
        if embeddings is not None and embeddings.shape != (*tokens.shape, self.d_model):
            raise ValueError(
                f"embeddings {tuple(embeddings.shape)} do not match tokens {tuple(tokens.shape)} x d_model {self.d_model}"
            )
        x = self.embed(tokens) if embeddings is None else embeddings
        kept: dict[str, list[Tensor]] = {name: [] for name in keep}

        def put(name: str, value: Tensor | None) -> None:
            if name in kept and value is not None:  # the pattern is None only when it was not asked for
                kept[name].append(value)

        for layer in range(self.n_layers):
            put("resid_pre", x)
            q, k, v = self.qkv(layer, x, 0, n_pos)
            z, pattern = self.attend(layer, q, k, v, 0, return_pattern="pattern" in kept)
            attn_out = self.attn_output(layer, z)
            mid = x + attn_out
            mlp_out = self.mlp(layer, mid)
            x = mid + mlp_out
            for name, value in (
                ("q", q),
                ("k", k),
                ("v", v),
                ("z", z),
                ("pattern", pattern),
                ("attn_out", attn_out),
                ("resid_mid", mid),
                ("mlp_out", mlp_out),
            ):
                put(name, value)
        put("resid_pre", x)
        stacked = {name: torch.stack(values) for name, values in kept.items()}
        return ForwardRecord(tokens=tokens, final_normed=self.final_norm(x[:, -1]), **stacked)

    def _final_stream(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        """The residual stream after the last block (before the final norm), nothing kept on the way."""
        n_pos = tokens.shape[1]
        x = self.embed(tokens)
        for layer in range(self.n_layers):
            q, k, v = self.qkv(layer, x, 0, n_pos)
            z, _ = self.attend(layer, q, k, v, 0)
            x = x + self.attn_output(layer, z)
            x = x + self.mlp(layer, x)
        return x

    @torch.no_grad()
    def logits(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_vocab"]:
        """Full logits at every position (for checks against the bridge; patching never needs them)."""
        return self.unembed(self.final_norm(self._final_stream(tokens)))

    @torch.no_grad()
    def final_normed_at(
        self, tokens: Int[Tensor, "batch pos"], positions: Int[Tensor, " batch"]
    ) -> Float[Tensor, "batch d_model"]:
        """The final-normed residual of row ``i`` at ``positions[i]`` (feed it to :meth:`logit_diff`).

        For right-padded batches of prompts of different lengths: attention is causal, so the padding *after* a
        row's last real token cannot reach it, and ``positions[i]`` = that row's length - 1 reads exactly what the
        prompt alone would give (up to float rounding of the larger matrix products).
        """
        stream = self._final_stream(tokens)
        return self.final_norm(stream[torch.arange(tokens.shape[0], device=tokens.device), positions])

    # ------------------------------------------------------------------------------------------------
    # Cost model (for the benchmark's FLOP floor)
    # ------------------------------------------------------------------------------------------------

    def flops_per_row(self, kv_rows: int) -> dict[str, int]:
        """Multiply-add FLOPs (2 per MAC) of one residual row through one block, split by what needs it.

        ``kv``: norm-free key/value projection; ``rest``: query projection, attention over ``kv_rows`` keys,
        output projection and MLP. A row whose query is not needed (last layer, not the final position)
        costs only ``kv``.
        """
        d, dh = self.d_model, self.d_head
        kv = 2 * d * (2 * self.n_kv_heads * dh)
        q = 2 * d * (self.n_heads * dh)
        attention = 2 * 2 * self.n_heads * dh * kv_rows
        out = 2 * self.n_heads * dh * d
        w = self.layers[0]
        mlp = 2 * (w.W_in.numel() + w.W_out.numel() + (0 if w.W_gate is None else w.W_gate.numel()))
        return {"kv": kv, "rest": q + attention + out + mlp}


_FUNCTIONAL_MODELS: weakref.WeakKeyDictionary[torch.nn.Module, FunctionalTransformer] = weakref.WeakKeyDictionary()


def functional_model(model: ModuleTree) -> FunctionalTransformer:
    """The :class:`FunctionalTransformer` of a ``LoadedModel`` or bridge, built once per Hugging Face model.

    Patching, tracing, knockout and cross-model runs all ask for it; the cache (keyed weakly by the Hugging Face
    module, so it goes when the model goes) reads the weights and fuses the QKV / gate-up matrices only once.
    """
    hf: torch.nn.Module = model
    if hasattr(model, "spec"):  # a LoadedModel
        hf = model.hf_model
    elif hasattr(model, "original_model"):  # a bridge
        hf = model.original_model
    if hf not in _FUNCTIONAL_MODELS:
        _FUNCTIONAL_MODELS[hf] = FunctionalTransformer.from_model(model)
    return _FUNCTIONAL_MODELS[hf]


def _gpt2_qkv(attn_module: ModuleTree, c_attn: ModuleTree) -> tuple[Tensor, Tensor | None]:
    """GPT-2's fused ``[W_Q | W_K | W_V]`` (``[d_model, 3 d_model]``) and bias, *as the forward pass uses them*.

    Inside a TransformerLens bridge, GPT-2's attention runs through three split ``nn.Linear`` maps (``q``,
    ``k``, ``v``) that the bridge cut from ``c_attn`` and then processed (compatibility mode folds the first
    LayerNorm's gain and bias into them and sets that LayerNorm to the identity), while ``c_attn`` itself keeps
    the raw weights and is no longer called. Reading ``c_attn`` there would pair raw weights with a folded
    LayerNorm: correct only when the gains are 1 and the biases 0 (freshly initialised GPT-2), wrong for
    real weights. A plain Hugging Face model has no split maps and uses ``c_attn`` (Conv1D: ``x @ W + b``).
    """
    split = [unwrap(getattr(attn_module, name)) for name in ("q", "k", "v") if hasattr(attn_module, name)]
    linears = [m for m in split if isinstance(m, torch.nn.Linear)]
    if len(linears) == 3:
        W = torch.cat([m.weight for m in linears]).T  # nn.Linear stores [d_out, d_in]
        biases: list[Tensor] = [m.bias for m in linears if m.bias is not None]
        b = torch.cat(biases) if len(biases) == 3 else None
        if W.shape != c_attn.weight.shape:
            raise UnsupportedArchitecture(
                f"GPT-2 attention's split q/k/v maps give {tuple(W.shape)}, c_attn is {tuple(c_attn.weight.shape)}"
            )
        return W, b
    return c_attn.weight, c_attn.bias


def _linear(x: Tensor, W: Tensor, b: Tensor | None) -> Tensor:
    out = x @ W
    return out if b is None else out + b


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _activation(name: str, model_name: str) -> Callable[[Tensor], Tensor]:
    """The MLP nonlinearity by its Hugging Face name (the tanh-approximate GELU for ``gelu_new``)."""
    table: dict[str, Callable[[Tensor], Tensor]] = {
        "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "gelu": F.gelu,
        "relu": F.relu,
        "silu": F.silu,
        "swish": F.silu,
    }
    if name not in table:
        raise UnsupportedArchitecture(
            f"{model_name}: activation {name!r} is not implemented by the functional forward pass"
        )
    return table[name]
