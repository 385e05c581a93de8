"""The fast sampler behind ``HFGenerator``: a decode loop over the model's own modules and a static KV cache.

Why not ``model.generate`` (bench/README.md has the numbers):

- it samples with ``torch.multinomial``, which draws an exponential variate for every vocabulary entry of every
  row (37% of SmolLM2's CPU generate time). Here one uniform per row picks the token by inverse CDF on the
  cumulative probabilities (``sample_tokens``), the same distribution;
- with a padding mask its SDPA path repeats the KV cache once per query head of a group (7x on Qwen2.5-7B) at every
  decode step. Here the query heads that share a KV head are attended together against the cache as it is;
- it syncs with the host at every step and runs every row until the longest is done. Here the stop check runs every
  ``check_every`` steps, and rows that finished leave the batch (the cache is compacted) once a quarter has;
- on CUDA each decoder layer's decode step is compiled once (one code path shared by every layer: regional
  compilation) with a symbolic batch and cache length, so compaction and a training loop's next call reuse it.

The prefill and the decode steps call the model's own modules (norms, projections -- LoRA layers included --, MLP,
rotary embedding), so LoRA adapters and soft prefixes (``inputs_embeds``) work unchanged. Only what every
Llama/Qwen2-style decoder does between them is written here: rotary position, cache write, attention through
``torch.nn.functional.scaled_dot_product_attention``, residuals. Other architectures (``supports`` says why) use
``model.generate``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
PREFILL_TOKENS = 16384  # rows x prompt length per prefill forward: bounds the prefill's activation memory
COMPACT_BELOW = 0.75
CACHE_ALIGN = 64
MIN_COMPACT_ROWS_CUDA = 32  # below this a CUDA decode step is bound by reading the weights: shrinking saves little  # cache length rounded up to this: aligned rows for the attention kernels, fewer distinct shapes  # compact the batch once at most this fraction of its rows is still running


def unsupported_reason(model) -> str | None:
    """Why the fast decoder cannot run ``model`` (None when it can)."""
    lm = _causal_lm(model)
    config = lm.config
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {config.model_type!r} is not one of {SUPPORTED_MODEL_TYPES}"
    if getattr(config, "use_sliding_window", False) or any(
        t != "full_attention" for t in (getattr(config, "layer_types", None) or [])
    ):
        return "sliding-window attention"
    backbone = lm.get_decoder()
    if not all(hasattr(backbone, name) for name in ("layers", "norm", "rotary_emb", "embed_tokens")):
        return f"{type(backbone).__name__} lacks layers/norm/rotary_emb/embed_tokens"
    return None


def _causal_lm(model):
    """The transformers model inside a peft wrapper (LoRA layers stay injected in its modules)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# ---------------------------------------------------------------------------------------------------------------
# sampling


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None):
    """One token per row of ``logits`` ([B, V], fp32): greedy at temperature 0, else a draw from
    softmax(logits / T) restricted to the top-p nucleus -- the tokens, from the most probable down, whose
    preceding mass is below ``top_p`` (transformers' TopPLogitsWarper keeps the same set).

    Inverse CDF: one uniform per row, located on the cumulative probabilities. Each token's share of the cumulative
    sum is its probability to within one rounding of the running sum (float64 on CUDA, where it costs nothing;
    float32 on the CPU, where it halves the cost: ~6e-8 per token at worst)."""
    import torch

    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits if temperature == 1 else logits / temperature, dim=-1)
    order = None
    if top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True)
        mass_before = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill(mass_before >= top_p, 0.0)
    cdf = (probs.double() if probs.is_cuda else probs).cumsum(dim=-1)
    total = cdf[:, -1:]
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device, dtype=cdf.dtype) * total
    # kept strictly below the total (u * total can round up to it): the first cumulative value above u then always
    # ends a token of nonzero probability
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    picked = torch.searchsorted(cdf, u, right=True)
    return (picked if order is None else order.gather(1, picked)).squeeze(1)


# ---------------------------------------------------------------------------------------------------------------
# the decoder


@dataclass
class DecodeSettings:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0


@dataclass
class DecodeStats:
    """What the last ``generate`` call did (the benchmark reports it)."""

    steps: int = 0
    prefill_rows: int = 0  # rows the prefill ran: each run of identical prompts once (``share_prefill``)
    compactions: int = 0
    graphs_captured: int = 0
    compiled: bool = False
    fallback: str | None = None  # why compiling or graph capture was given up, if it was


class FastDecoder:
    """Batched decoding of one left-padded batch; ``generate`` returns each row's new ids, ending with the stop
    token when the row stopped.

    ``compile``: compile the per-layer decode step (default: on CUDA only; compiling on a 2-core CPU costs more than
    it saves). ``cuda_graphs``: replay each batch shape's decode step as a captured CUDA graph (default: on CUDA),
    so the host's per-kernel launch cost does not set the pace. ``check_every``: decode steps between stop checks
    (each is a host sync; default 1 on CPU, 8 on CUDA). ``share_prefill``: consecutive rows with the same prompt
    (a prompt's n completions) are prefilled once and their cache rows copied (default on).
    """

    def __init__(self, stop_ids: Sequence[int], *, compile: bool | None = None, cuda_graphs: bool | None = None,
                 check_every: int | None = None, compact_below: float = COMPACT_BELOW, share_prefill: bool = True):
        self.share_prefill = share_prefill
        self.stop_ids = sorted({int(t) for t in stop_ids})
        self.compile = compile
        self.cuda_graphs = cuda_graphs
        self.check_every = check_every
        self.compact_below = compact_below
        self.stats = DecodeStats()

    def generate(self, model, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, settings: DecodeSettings,
                 generator: torch.Generator | None = None, *, row_budgets: torch.Tensor | None = None
                 ) -> list[list[int]]:
        """New ids for each row of a left-padded batch of ``model`` (``inputs_embeds`` [B, T, H], ``attention_mask``
        [B, T]).

        ``row_budgets`` ([B]) caps each row's new tokens below ``max_new_tokens`` (a row reaching its budget ends
        there, as if it had stopped): the benchmark's stand-in for the varied lengths a real model stops at."""
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"the fast decoder cannot run this model: {reason}")
        on_cuda = inputs_embeds.device.type == "cuda"
        compiled = (self.compile if self.compile is not None else on_cuda) and not _FAILED.get("compile")
        graphs = (self.cuda_graphs if self.cuda_graphs is not None else on_cuda) and on_cuda \
            and not _FAILED.get("graphs")
        self.stats = DecodeStats(compiled=compiled)
        if not compiled:
            return self._decode(model, inputs_embeds, attention_mask, settings, generator, row_budgets,
                                _layer_decode, graphs)
        try:
            return self._decode(model, inputs_embeds, attention_mask, settings, generator, row_budgets,
                                _compiled_layer_decode(), graphs)
        except Exception as err:  # noqa: BLE001 -- any compiler failure: decode uncompiled rather than stop a run
            import torch

            if isinstance(err, torch.OutOfMemoryError):
                raise
            _FAILED["compile"] = f"{type(err).__name__}: {err}"
            warnings.warn(f"compiling the decode step failed ({_FAILED['compile'][:300]}); decoding uncompiled",
                          stacklevel=2)
            self.stats = DecodeStats(fallback=_FAILED["compile"][:300])
            return self._decode(model, inputs_embeds, attention_mask, settings, generator, row_budgets,
                                _layer_decode, graphs)

    def _decode(self, model, inputs_embeds, attention_mask, settings, generator, row_budgets, layer_step, graphs):
        import torch

        lm = _causal_lm(model)
        device = inputs_embeds.device
        check_every = self.check_every or (8 if device.type == "cuda" else 1)
        min_rows = MIN_COMPACT_ROWS_CUDA if device.type == "cuda" else 2

        rows, prompt_len, _ = inputs_embeds.shape
        cache_len = -(-(prompt_len + settings.max_new_tokens) // CACHE_ALIGN) * CACHE_ALIGN
        mask = attention_mask.to(device=device, dtype=torch.bool)
        pads = (~mask).sum(dim=1)  # left padding per row
        firsts, owner = repeated_rows(inputs_embeds, mask) if self.share_prefill else (None, None)
        caches = _allocate_cache(lm, rows if firsts is None else len(firsts), cache_len, inputs_embeds.dtype, device)
        with attention_without_cudnn():
            if firsts is None:
                logits = _prefill(lm, inputs_embeds, mask, caches)
            else:  # each distinct prompt once, then its cache and logits copied to each of its rows
                logits = _prefill(lm, inputs_embeds[firsts], mask[firsts], caches)[owner]
                caches = [(k.index_select(0, owner), v.index_select(0, owner)) for k, v in caches]
        self.stats.prefill_rows = rows if firsts is None else len(firsts)

        stop_ids = torch.tensor(self.stop_ids, device=device, dtype=torch.long)
        budget = torch.full((rows,), settings.max_new_tokens, device=device, dtype=torch.long)
        if row_budgets is not None:
            budget = torch.minimum(budget, row_budgets.to(device=device, dtype=torch.long))
        out = torch.zeros(rows, settings.max_new_tokens, device=device, dtype=torch.long)
        length = torch.full((rows,), settings.max_new_tokens, device=device, dtype=torch.long)
        row_ids = torch.arange(rows, device=device)  # the original row of each batch row
        running = torch.ones(rows, device=device, dtype=torch.bool)
        steps = _StepRunner(lm, layer_step, caches, pads, graphs, self.stats)

        for step in range(settings.max_new_tokens):
            token = sample_tokens(logits, settings.temperature, settings.top_p, generator)
            out[row_ids, step] = token
            ends = running & (torch.isin(token, stop_ids) | (budget <= step + 1))
            length[row_ids] = torch.where(ends, step + 1, length[row_ids])
            running = running & ~ends
            self.stats.steps = step + 1
            if step + 1 == settings.max_new_tokens:
                break
            if (step + 1) % check_every == 0:
                still = int(running.sum())
                if still == 0:
                    break
                if still <= self.compact_below * running.shape[0] and still >= min_rows:
                    keep = running.nonzero().squeeze(1)
                    caches = [(k.index_select(0, keep), v.index_select(0, keep)) for k, v in steps.caches]
                    token, pads, budget, row_ids, running = (
                        t.index_select(0, keep) for t in (token, pads, budget, row_ids, running))
                    steps.release()
                    steps = _StepRunner(lm, layer_step, caches, pads, graphs, self.stats)
                    self.stats.compactions += 1
            logits = steps(token, prompt_len + step)
        steps.release()
        lengths = length.tolist()
        return [ids[:n] for ids, n in zip(out.tolist(), lengths, strict=True)]


def repeated_rows(inputs_embeds: torch.Tensor, mask: torch.Tensor):
    """Runs of consecutive identical rows (same embeddings, same mask): the first row of each run and, for every
    row, the index of its run; ``(None, None)`` when no two consecutive rows are the same."""
    import torch

    same = ((inputs_embeds[1:] == inputs_embeds[:-1]).flatten(1).all(1) & (mask[1:] == mask[:-1]).all(1))
    if not bool(same.any()):
        return None, None
    starts = torch.cat([torch.ones(1, dtype=torch.bool, device=same.device), ~same])
    return starts.nonzero().squeeze(1), starts.long().cumsum(0) - 1


class _StepRunner:
    """Decode steps for one batch shape: the first runs as it is (and warms the kernels), then -- on CUDA with
    graphs on -- the step is captured once and every later step replays it, its inputs copied into fixed tensors."""

    def __init__(self, lm, layer_step, caches, pads, graphs: bool, stats: DecodeStats):
        import torch

        self.lm, self.layer_step, self.caches, self.pads = lm, layer_step, caches, pads
        self.graphs, self.stats = graphs, stats
        device = pads.device
        self.token = torch.zeros(pads.shape[0], device=device, dtype=torch.long)
        self.at = torch.zeros(1, device=device, dtype=torch.long)
        self.positions = torch.arange(caches[0][0].shape[2], device=device)
        self.graph = None
        self.logits = None

    def _run(self):
        return _step_logits(self.lm, self.layer_step, self.token, self.pads, self.at, self.caches, self.positions)

    def __call__(self, token, write_at: int):
        import torch

        self.token.copy_(token)
        self.at.fill_(write_at)
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        if not self.graphs:
            return self._run()
        # warm-up on a side stream (as CUDA graph capture wants), then capture; re-running a step writes the same
        # key and value at the same position, so the warm-up is this step's real computation
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            logits = self._run()
        torch.cuda.current_stream().wait_stream(side)
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # a teacher may draw in a thread
                self.logits = self._run()
            self.graph = graph
            self.stats.graphs_captured += 1
        except Exception as err:  # noqa: BLE001 -- capture unsupported here: run the steps without graphs
            _FAILED["graphs"] = f"{type(err).__name__}: {err}"
            warnings.warn(f"CUDA graph capture failed ({_FAILED['graphs'][:300]}); decoding without graphs",
                          stacklevel=2)
            self.stats.fallback = _FAILED["graphs"][:300]
            self.graphs = False
        return logits

    def release(self) -> None:
        self.graph = self.logits = None


def _step_logits(lm, layer_step, token, pads, at, caches, positions):
    """One decode step: the next-token logits (fp32, [B, V]) of ``token`` written at cache position ``at``."""
    backbone = lm.get_decoder()
    hidden = backbone.embed_tokens(token)
    cos, sin = backbone.rotary_emb(hidden.unsqueeze(1), (at - pads).unsqueeze(1))
    visible = ((positions >= pads.unsqueeze(1)) & (positions <= at))[:, None, None, :]
    for layer, (keys, values) in zip(backbone.layers, caches, strict=True):
        hidden = layer_step(layer, hidden, cos[:, 0], sin[:, 0], keys, values, at, visible)
    return lm.get_output_embeddings()(backbone.norm(hidden)).float()


def _allocate_cache(lm, rows: int, cache_len: int, dtype, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    import torch

    config = lm.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    shape = (rows, config.num_key_value_heads, cache_len, head_dim)
    return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(config.num_hidden_layers)]


def _rotate(x, cos, sin):
    import torch

    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def attention_without_cudnn():
    """Scaled-dot-product attention on any backend but cuDNN's, which builds an execution plan for every new shape
    (every new batch or length: a training loop with varied reply lengths pays it again and again)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])



def _prefill(lm, inputs_embeds, mask, caches) -> torch.Tensor:
    """Run the prompts, fill the caches' first T positions; the last position's logits (fp32, [B, V])."""
    import torch
    import torch.nn.functional as F

    backbone = lm.get_decoder()
    rows, length, _ = inputs_embeds.shape
    positions = (mask.long().cumsum(-1) - 1).clamp_(min=0)
    causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril_()
    eye = torch.eye(length, dtype=torch.bool, device=mask.device)
    logits = []
    step = max(1, PREFILL_TOKENS // length)
    for start in range(0, rows, step):
        part = slice(start, start + step)
        hidden = inputs_embeds[part]
        # padding queries attend to themselves only (an all-masked row would be NaN); their outputs are never read
        attend = (causal & mask[part, None, None, :]) | eye
        cos, sin = backbone.rotary_emb(hidden, positions[part])
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        for layer, (keys, values) in zip(backbone.layers, caches, strict=True):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            shape = (*x.shape[:2], -1, attn.head_dim)
            q = _rotate(attn.q_proj(x).view(shape).transpose(1, 2), cos, sin)
            k = _rotate(attn.k_proj(x).view(shape).transpose(1, 2), cos, sin)
            v = attn.v_proj(x).view(shape).transpose(1, 2)
            keys[part, :, :length] = k
            values[part, :, :length] = v
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, scale=attn.scaling,
                                               enable_gqa=q.shape[1] != k.shape[1])
            hidden = hidden + attn.o_proj(o.transpose(1, 2).reshape(*x.shape[:2], -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        logits.append(lm.get_output_embeddings()(backbone.norm(hidden[:, -1])).float())
    return torch.cat(logits)


def _layer_decode(layer, hidden, cos, sin, keys, values, at, visible):
    """One decoder layer for one new token per row: ``hidden`` [B, H] -> [B, H]; writes the token's key and value
    at cache position ``at``. The G query heads sharing a KV head attend as G queries of that head, so the cache is
    read as stored, never repeated; the arithmetic is transformers' eager attention (bf16 scores, fp32 softmax)."""
    import torch

    attn = layer.self_attn
    rows = hidden.shape[0]
    x = layer.input_layernorm(hidden)
    q = _rotate(attn.q_proj(x).view(rows, -1, attn.head_dim), cos.unsqueeze(1), sin.unsqueeze(1))
    k = _rotate(attn.k_proj(x).view(rows, -1, attn.head_dim), cos.unsqueeze(1), sin.unsqueeze(1))
    v = attn.v_proj(x).view(rows, -1, attn.head_dim)
    keys.index_copy_(2, at, k.unsqueeze(2))
    values.index_copy_(2, at, v.unsqueeze(2))
    grouped = q.view(rows, keys.shape[1], -1, attn.head_dim)  # [B, KV heads, G, D]
    scores = torch.matmul(grouped, keys.transpose(2, 3)) * attn.scaling  # [B, KV heads, G, S]
    scores = scores.masked_fill(~visible, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
    o = torch.matmul(weights, values)  # [B, KV heads, G, D]
    hidden = hidden + attn.o_proj(o.reshape(rows, -1))
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


_COMPILED: dict = {}
_FAILED: dict = {}  # what failed once in this process (compile, graphs) is not tried again


def _compiled_layer_decode():
    """``_layer_decode`` compiled once per process: every layer (same code, same shapes) and every later call
    reuses it; batch and cache length are symbolic, so compaction does not recompile."""
    if "layer" not in _COMPILED:
        import torch

        _COMPILED["layer"] = torch.compile(_layer_decode, dynamic=True, fullgraph=True)
    return _COMPILED["layer"]
