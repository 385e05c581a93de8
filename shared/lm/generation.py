"""Text generation from token-id prompts: one interface, two backends.

- ``HFGenerator``: batched and left-padded, seeded, soft prompts through ``inputs_embeds``, LoRA adapters through
  peft. Runs anywhere (the tiny profile, CPU tests). It decodes with ``shared.lm.decoding.FastDecoder`` (Llama and
  Qwen2 models: the same greedy ids as ``model.generate``, the same sampling distribution, several times the
  speed) and falls back to transformers' ``model.generate`` for other architectures or when asked
  (``sampler="generate"``).
- ``VLLMGenerator``: vLLM with token-id prompts, ``LoRARequest`` adapters and prompt embeddings. Needs the
  optional ``vllm`` extra and a GPU.

Both take ``chat.PromptIds`` (never text), so the ids a model is evaluated on are the ids ``shared.lm.chat`` built.
Both sample with explicit parameters only: a checkpoint's own generation defaults (Qwen2.5 ships top_k=20 and
repetition_penalty=1.05) never leak in, so the backends agree on what "temperature 1, top_p 1" means.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from shared.lm import chat, models

Sampler = Literal["fast", "generate"]

if TYPE_CHECKING:
    import torch

FinishReason = Literal["stop", "length"]


class SamplingParams(BaseModel):
    """How to sample. ``temperature == 0`` is greedy decoding; ``top_k`` is always off."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n: int = Field(1, ge=1, description="completions per prompt")
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(256, ge=1)
    seed: int = Field(0, ge=0)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Completion(BaseModel):
    """One completion: the generated ids without the stop token, and their text without special tokens.

    ``stop_token_id`` is the stop token the model ended on (Qwen2.5 has two), so a student trained on the
    completion learns to end its turn the same way; None when it ran to the length limit or was not seen.
    """

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    stop_token_id: int | None = None


class Generator(Protocol):
    def generate(
        self,
        prompts: Sequence[chat.PromptIds],
        params: SamplingParams,
        *,
        lora_uri: str | None = None,
        prompt_embeds: torch.Tensor | None = None,
    ) -> list[list[Completion]]:
        """``params.n`` completions for each prompt, in prompt order.

        ``prompt_embeds`` fills the soft(K) system slot of every prompt: ``[K, H]`` (shared) or ``[P, K, H]``
        (one per prompt). ``lora_uri`` names a stored LoRA adapter to generate with.
        """
        ...


def make_generator(
    backend: Literal["hf", "vllm"],
    model_ref: str | models.ModelRef,
    *,
    adapter_uri: str | None = None,
    dtype: str | None = None,
    device: str | None = None,
    batch_size: int = 32,
    progress: bool = False,
    sampler: Sampler = "fast",
    **vllm_kwargs: Any,
) -> Generator:
    """A generator for ``model_ref``; ``adapter_uri`` is the LoRA used whenever a call names none."""
    if backend == "hf":
        if vllm_kwargs:
            raise ValueError(f"options {sorted(vllm_kwargs)} are for the vllm backend only")
        return HFGenerator.from_ref(
            model_ref,
            adapter_uri=adapter_uri,
            dtype=dtype,
            device=device,
            batch_size=batch_size,
            progress=progress,
            sampler=sampler,
        )
    if backend == "vllm":
        return VLLMGenerator(
            model_ref, adapter_uri=adapter_uri, dtype=dtype, progress=progress, **vllm_kwargs
        )
    raise ValueError(f"unknown generation backend {backend!r}: expected 'hf' or 'vllm'")


# ---------------------------------------------------------------------------------------------------------------
# shared helpers


def _check_soft_prompts(prompts: Sequence[chat.PromptIds], prompt_embeds) -> None:
    # A soft slot generated without embeddings would silently condition on placeholder tokens.
    with_soft = [p.soft_slice is not None for p in prompts]
    if prompt_embeds is None and any(with_soft):
        raise ValueError("prompts have a soft(K) system slot but no prompt_embeds were given")
    if prompt_embeds is not None and not all(with_soft):
        raise ValueError("prompt_embeds given, but not every prompt has a soft(K) system slot")
    if prompt_embeds is not None and prompt_embeds.dim() == 3 and prompt_embeds.shape[0] != len(prompts):
        raise ValueError(
            f"prompt_embeds hold {prompt_embeds.shape[0]} soft prompts for {len(prompts)} prompts"
        )


def _soft_for(prompt_embeds, prompt_index: int):
    return prompt_embeds if prompt_embeds.dim() == 2 else prompt_embeds[prompt_index]


def derived_seed(seed: int, *stream: int) -> int:
    """A well-mixed 32-bit seed for one sub-stream (a batch, a prompt) of a run seeded with ``seed``."""
    import numpy as np

    return int(np.random.SeedSequence([seed, *stream]).generate_state(1)[0])


def _stop_ids(configured: int | list[int] | None, tokenizer) -> set[int]:
    """The checkpoint's generation-config eos ids plus the tokenizer's eos (Qwen2.5 lists two)."""
    ids = set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def trim_at_stop(token_ids: Sequence[int], stop_ids: set[int]) -> tuple[list[int], FinishReason]:
    """Cut generated ids at the first stop token (dropping it and any padding after it)."""
    kept, finish, _ = split_at_stop(token_ids, stop_ids)
    return kept, finish


def split_at_stop(token_ids: Sequence[int], stop_ids: set[int]) -> tuple[list[int], FinishReason, int | None]:
    """``trim_at_stop`` that also returns the stop token it cut at (None when there was none)."""
    for position, token in enumerate(token_ids):
        if token in stop_ids:
            return list(token_ids[:position]), "stop", int(token)
    return list(token_ids), "length", None


# ---------------------------------------------------------------------------------------------------------------
# transformers backend


class HFGenerator:
    """Generation over left-padded batches of ``batch_size`` sequences (prompt x completion rows).

    ``sampler``: ``"fast"`` decodes with ``shared.lm.decoding.FastDecoder`` where the architecture allows
    (else ``model.generate``); ``"generate"`` always uses transformers' ``model.generate`` (the reference).
    Sampling is seeded per batch from ``params.seed``, so the same prompts, parameters, batch size and sampler give
    the same completions; the caller's global RNG state is left as it was.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        adapter_uri: str | None = None,
        batch_size: int = 32,
        progress: bool = False,
        sampler: Sampler = "fast",
    ):
        from shared.lm import decoding

        self.model = model
        self.tokenizer = tokenizer
        self.default_adapter_uri = adapter_uri
        self.batch_size = batch_size
        self.progress = progress
        self._adapter_names: dict[str, str] = {}
        self._stop_ids = _stop_ids(model.generation_config.eos_token_id, tokenizer)
        self._pad_id = chat.soft_placeholder_id(tokenizer)
        self.sampler: Sampler = sampler if decoding.unsupported_reason(model) is None else "generate"
        self._decoder = decoding.FastDecoder(self._stop_ids) if self.sampler == "fast" else None

    @classmethod
    def from_ref(
        cls,
        model_ref: str | models.ModelRef,
        *,
        adapter_uri: str | None = None,
        dtype: str | None = None,
        device: str | None = None,
        batch_size: int = 32,
        progress: bool = False,
        sampler: Sampler = "fast",
    ) -> HFGenerator:
        model = models.load_model(model_ref, dtype=dtype, device=device)
        tokenizer = models.load_tokenizer(model_ref)
        return cls(model, tokenizer, adapter_uri=adapter_uri, batch_size=batch_size, progress=progress,
                   sampler=sampler)

    def generate(
        self,
        prompts: Sequence[chat.PromptIds],
        params: SamplingParams,
        *,
        lora_uri: str | None = None,
        prompt_embeds: torch.Tensor | None = None,
    ) -> list[list[Completion]]:
        import torch

        _check_soft_prompts(prompts, prompt_embeds)
        rows = [index for index in range(len(prompts)) for _ in range(params.n)]  # n copies, prompt-major
        chunks = [rows[at : at + self.batch_size] for at in range(0, len(rows), self.batch_size)]
        results: list[list[Completion]] = [[] for _ in prompts]
        with self._adapter(lora_uri or self.default_adapter_uri), torch.inference_mode():
            for chunk_index, chunk in enumerate(self._progress(chunks)):
                generated = self._generate_chunk(
                    [prompts[i] for i in chunk],
                    None
                    if prompt_embeds is None
                    else torch.stack([_soft_for(prompt_embeds, i) for i in chunk]),
                    params,
                    derived_seed(params.seed, chunk_index),
                )
                for prompt_index, token_ids in zip(chunk, generated, strict=True):
                    results[prompt_index].append(self._completion(token_ids))
        return results

    def _generate_chunk(self, prompts, soft, params: SamplingParams, seed: int) -> list[list[int]]:
        import torch

        device = self._device()
        batch = chat.build_batch(prompts, pad_id=self._pad_id, padding_side="left").to(device)
        embedding = self.model.get_input_embeddings()
        if self._decoder is not None:
            from shared.lm.decoding import DecodeSettings

            embeds = embedding(batch.input_ids) if soft is None else chat.inputs_embeds(batch, embedding,
                                                                                          soft.to(device))
            settings = DecodeSettings(max_new_tokens=params.max_new_tokens, temperature=params.temperature,
                                      top_p=params.top_p)
            generator = torch.Generator(device=device).manual_seed(seed)
            return self._decoder.generate(self.model, embeds, batch.attention_mask, settings, generator)
        if soft is None:
            inputs = {"input_ids": batch.input_ids}
        else:
            inputs = {"inputs_embeds": chat.inputs_embeds(batch, embedding, soft.to(device))}
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            output = self.model.generate(
                **inputs, attention_mask=batch.attention_mask, **self._generate_kwargs(params)
            )
        # With input_ids the output repeats the prompt; with inputs_embeds it holds only the new tokens.
        new_tokens = output[:, batch.input_ids.shape[1] :] if soft is None else output
        return new_tokens.tolist()

    def _generate_kwargs(self, params: SamplingParams) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(
            max_new_tokens=params.max_new_tokens,
            eos_token_id=sorted(self._stop_ids),
            pad_token_id=self._pad_id,
            repetition_penalty=1.0,
        )
        if params.greedy:
            return kwargs | dict(do_sample=False)
        return kwargs | dict(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)

    def _completion(self, generated: list[int]) -> Completion:
        token_ids, finish, stop = split_at_stop(generated, self._stop_ids)
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        return Completion(text=text, token_ids=token_ids, finish_reason=finish, stop_token_id=stop)

    def _device(self):
        return next(self.model.parameters()).device

    def _progress(self, chunks: list) -> Iterator:
        if not self.progress:
            return iter(chunks)
        from tqdm.auto import tqdm

        return iter(tqdm(chunks, desc="generate", unit="batch"))

    @contextlib.contextmanager
    def _adapter(self, adapter_uri: str | None):
        """Generate with the named LoRA adapter (loaded once per URI), or with none.

        peft injects adapter layers into the model in place: the wrapped model object is changed too, but
        generates as the base model whenever no adapter is selected."""
        from peft import PeftModel

        if adapter_uri is None:
            if isinstance(self.model, PeftModel):
                with self.model.disable_adapter():
                    yield
            else:
                yield
            return
        name = self._adapter_names.get(adapter_uri)
        if name is None:
            name = f"adapter{len(self._adapter_names)}"
            path = str(models.fetch_store_dir(adapter_uri))
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(path, adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name)
            self.model.eval()
            self._adapter_names[adapter_uri] = name
        self.model.set_adapter(name)
        yield


# ---------------------------------------------------------------------------------------------------------------
# vLLM backend

VLLM_MISSING = (
    "the vllm generation backend needs vLLM, which is not installed: install the `vllm` extra "
    "(pip install 'explore-persona-space[vllm]') on a GPU machine, or use backend 'hf'"
)


class VLLMGenerator:
    """vLLM offline inference on token-id prompts. Each prompt gets its own sampling seed derived from
    ``params.seed`` and its index, so completions do not depend on how vLLM schedules the batch."""

    def __init__(
        self,
        model_ref: str | models.ModelRef,
        *,
        adapter_uri: str | None = None,
        dtype: str | None = None,
        enable_lora: bool = False,
        max_lora_rank: int = 64,
        enable_prompt_embeds: bool = False,
        progress: bool = False,
        **llm_kwargs: Any,
    ):
        try:
            import vllm
        except ImportError as err:
            raise RuntimeError(VLLM_MISSING) from err
        self._vllm = vllm
        self.model_ref = model_ref
        self.default_adapter_uri = adapter_uri
        self.progress = progress
        self.lora_enabled = enable_lora or adapter_uri is not None
        self.prompt_embeds_enabled = enable_prompt_embeds
        path = models.local_path(model_ref)
        self.tokenizer = models.load_tokenizer(model_ref)
        lora_kwargs = dict(enable_lora=True, max_lora_rank=max_lora_rank) if self.lora_enabled else {}
        embeds_kwargs = dict(enable_prompt_embeds=True) if enable_prompt_embeds else {}
        self.llm = vllm.LLM(
            model=path, tokenizer=path, dtype=dtype or "auto", **lora_kwargs, **embeds_kwargs, **llm_kwargs
        )
        self._stop_ids = _stop_ids(_configured_eos(path), self.tokenizer)
        self._lora_ids: dict[str, int] = {}
        self._embedding: torch.Tensor | None = None

    def generate(
        self,
        prompts: Sequence[chat.PromptIds],
        params: SamplingParams,
        *,
        lora_uri: str | None = None,
        prompt_embeds: torch.Tensor | None = None,
    ) -> list[list[Completion]]:
        _check_soft_prompts(prompts, prompt_embeds)
        inputs = self._inputs(prompts, prompt_embeds)
        sampling = [self._sampling(params, derived_seed(params.seed, i)) for i in range(len(prompts))]
        lora = self._lora_request(lora_uri or self.default_adapter_uri)
        outputs = self.llm.generate(inputs, sampling, lora_request=lora, use_tqdm=self.progress)
        return [[self._completion(o) for o in request.outputs] for request in outputs]

    def _inputs(self, prompts, prompt_embeds) -> list[dict]:
        if prompt_embeds is None:
            return [{"prompt_token_ids": list(p.input_ids)} for p in prompts]
        if not self.prompt_embeds_enabled:
            raise ValueError("prompt_embeds need VLLMGenerator(..., enable_prompt_embeds=True)")
        return [
            {"prompt_embeds": self._full_embeds(p, _soft_for(prompt_embeds, i))}
            for i, p in enumerate(prompts)
        ]

    def _full_embeds(self, prompt: chat.PromptIds, soft):
        import torch

        if self._embedding is None:
            self._embedding = models.load_input_embeddings(self.model_ref)
        batch = chat.build_batch([prompt], pad_id=0)
        embedding = torch.nn.Embedding.from_pretrained(self._embedding)
        return chat.inputs_embeds(batch, embedding, soft.detach().cpu())[0]

    def _sampling(self, params: SamplingParams, seed: int):
        return self._vllm.SamplingParams(
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=params.max_new_tokens,
            seed=seed,
            skip_special_tokens=True,
        )

    def _lora_request(self, adapter_uri: str | None):
        if adapter_uri is None:
            return None
        if not self.lora_enabled:
            raise ValueError("LoRA generation needs VLLMGenerator(..., enable_lora=True) or an adapter_uri")
        from vllm.lora.request import LoRARequest

        lora_id = self._lora_ids.setdefault(adapter_uri, len(self._lora_ids) + 1)  # vLLM ids start at 1
        return LoRARequest(f"lora{lora_id}", lora_id, str(models.fetch_store_dir(adapter_uri)))

    def _completion(self, output) -> Completion:
        token_ids, _, stop = split_at_stop(list(output.token_ids), self._stop_ids)
        finish: FinishReason = "length" if output.finish_reason == "length" else "stop"
        return Completion(text=output.text, token_ids=token_ids, finish_reason=finish,
                          stop_token_id=stop if finish == "stop" else None)


def _configured_eos(model_dir: str) -> int | list[int] | None:
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_dir).eos_token_id
    except OSError:  # no generation_config.json
        return None


# ---------------------------------------------------------------------------------------------------------------
# soft prefixes: vLLM's prompt-embeddings input where it works, else the fast HF path

VLLM_PROBE_TIMEOUT_S = 300.0  # the record's vLLM 0.11 hung on prompt embeddings for minutes

_PROBE = """
import sys
import torch, vllm
from transformers import AutoConfig
path, dtype = sys.argv[1], sys.argv[2]
config = AutoConfig.from_pretrained(path)
llm = vllm.LLM(model=path, tokenizer=path, dtype=dtype, enable_prompt_embeds=True, enforce_eager=True,
               gpu_memory_utilization=0.3, max_model_len=256)
embeds = torch.zeros(4, config.hidden_size, dtype=getattr(torch, dtype) if dtype != "auto" else torch.bfloat16)
out = llm.generate([{"prompt_embeds": embeds}], vllm.SamplingParams(max_tokens=2), use_tqdm=False)
assert len(out[0].outputs[0].token_ids) >= 1
"""


def vllm_prompt_embeds_probe(model_ref: str | models.ModelRef, *, dtype: str | None = None,
                             timeout_s: float = VLLM_PROBE_TIMEOUT_S) -> str | None:
    """None when the installed vLLM generates from prompt embeddings for ``model_ref`` within ``timeout_s``, else
    why not. Runs in a child process, so a hang ends with it and leaves no GPU memory behind."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed"
    command = [sys.executable, "-c", _PROBE, models.local_path(model_ref), dtype or "auto"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"vLLM did not generate from prompt embeddings within {timeout_s:.0f} s"
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        return f"vLLM failed on prompt embeddings: {lines[-1] if lines else f'exit code {done.returncode}'}"
    return None


def soft_prompt_generator(
    backend: Literal["hf", "vllm"],
    model_ref: str | models.ModelRef,
    *,
    dtype: str | None = None,
    batch_size: int = 1024,
    probe_timeout_s: float = VLLM_PROBE_TIMEOUT_S,
    progress: bool = False,
) -> Generator:
    """A generator that takes soft prefixes (``prompt_embeds``): vLLM when asked for and its prompt-embeddings input
    passes ``vllm_prompt_embeds_probe`` here, otherwise ``HFGenerator`` with the fast decoder."""
    import warnings

    if backend == "vllm":
        reason = vllm_prompt_embeds_probe(model_ref, dtype=dtype, timeout_s=probe_timeout_s)
        if reason is None:
            return VLLMGenerator(model_ref, dtype=dtype, enable_prompt_embeds=True, progress=progress)
        warnings.warn(f"soft prefixes generate with the HF backend: {reason}", stacklevel=2)
    elif backend != "hf":
        raise ValueError(f"unknown generation backend {backend!r}: expected 'hf' or 'vllm'")
    return HFGenerator.from_ref(model_ref, dtype=dtype, batch_size=batch_size, progress=progress)
