"""The fast #170 paths against the current ones, measured side by side in one run (``python -m bench.gpu_bench``).

- sampling: ``HFGenerator`` with the fast decoder (``shared.lm.decoding``) against ``model.generate`` (the baseline), at
  the teacher's batch (320 token-id prompts) and the evaluation's (1024 soft-prefix prompts through
  ``inputs_embeds``), 256 new tokens. Two length regimes: ``fixed`` (every row runs 256 tokens: a random-weight
  model never emits the stop token) and ``uniform`` (each row stops at a length drawn uniformly from 32-256, the stop
  honoured as if the model had emitted it, so finished rows leave the batch as real ones do);
- the greedy check: the fast decoder's greedy ids against the argmax of one plain forward over them;
- the soft-prefix training step at the record's setting, new path (fast teacher, length-bucketed micro-batches)
  against the current one (``model.generate`` teacher, micro-batches in draw order), with a profile of one
  micro-batch's forward/backward;
- the soft-prefix training step's student paths side by side (every example in full against each prompt run once,
  ``shared_prompt``), for a separate teacher and an adapter teacher, at fixed 256-token replies and at replies whose
  lengths are drawn uniformly from 32-256 with the stop honoured (``DrawnLengthTeacher``: the bench's stand-in for a
  real teacher's stops);
- the GCG step at the record's setting with the screen on, one step checked against the full evaluation.
"""

from __future__ import annotations

import dataclasses
import time

from shared.lm.generation import HFGenerator

UNIFORM_LENGTHS = (32, 256)  # the realistic regime: each row's length drawn uniformly from this range (inclusive)
# reply-length regimes besides "fixed" (every row max_new_tokens): each row's length drawn uniformly from a range;
# "record" has the mean of the record's own estimate of its replies (~200 tokens)
LENGTH_REGIMES = {"uniform": UNIFORM_LENGTHS, "record": (144, 256)}


def now() -> float:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def length_budgets(rows: int, new_tokens: int, seed: int = 0, regime: str = "uniform"):
    """Each row's length: uniform over the regime's range (``LENGTH_REGIMES``, capped at ``new_tokens``)."""
    import torch

    low, high = LENGTH_REGIMES[regime]
    g = torch.Generator().manual_seed(seed)
    return torch.randint(min(low, new_tokens), min(high, new_tokens) + 1, (rows,), generator=g)


# ---------------------------------------------------------------------------------------------------------------
# sampling


def _prompts_and_soft(model, tokenizer, rows: int, soft_k: int | None, questions):
    import torch

    from shared.search.soft_prompt import LearnedPrompt

    if soft_k is None:
        from shared.lm import chat

        return [chat.build_prompt(tokenizer, "default", questions[i % len(questions)]) for i in range(rows)], None
    prompt = LearnedPrompt(kind="soft", model_ref="bench", k=soft_k)
    soft = torch.randn(soft_k, model.config.hidden_size, device=model.device, dtype=model.dtype) * 0.02
    return [prompt.build(tokenizer, questions[i % len(questions)]) for i in range(rows)], soft


class _StopAt:
    """A logits processor for the baseline's uniform regime: row r emits the stop token at its drawn length."""

    def __init__(self, budgets, prompt_len: int, stop_id: int):
        self.budgets, self.prompt_len, self.stop_id = budgets, prompt_len, stop_id

    def __call__(self, input_ids, scores):
        import torch

        due = (input_ids.shape[1] - self.prompt_len + 1) >= self.budgets.to(scores.device)
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.stop_id] = 0.0
        return torch.where(due[:, None], forced, scores)


def run_chunk(generator, prompts, soft, new_tokens: int, budgets=None, seed: int = 0) -> list[list[int]]:
    """One batch through ``HFGenerator``'s own chunk path (the path ``generate`` takes per batch); ``budgets`` gives
    each row its length (the uniform regime)."""
    import torch

    with torch.inference_mode():  # as HFGenerator.generate runs it
        return _run_chunk(generator, prompts, soft, new_tokens, budgets, seed)


def _run_chunk(generator, prompts, soft, new_tokens, budgets, seed):
    import torch

    from shared.lm import chat
    from shared.lm.decoding import DecodeSettings
    from shared.lm.generation import SamplingParams

    params = SamplingParams(n=1, temperature=1.0, max_new_tokens=new_tokens, seed=seed)
    soft_rows = None if soft is None else soft.expand(len(prompts), -1, -1)
    if budgets is None:
        return generator._generate_chunk(prompts, soft_rows, params, seed)
    device = generator._device()
    batch = chat.build_batch(prompts, pad_id=generator._pad_id, padding_side="left").to(device)
    embedding = generator.model.get_input_embeddings()
    embeds = embedding(batch.input_ids) if soft is None else chat.inputs_embeds(batch, embedding, soft_rows)
    if generator.sampler == "fast":
        settings = DecodeSettings(max_new_tokens=new_tokens)
        torch_generator = torch.Generator(device=device).manual_seed(seed)
        return generator._decoder.generate(generator.model, embeds, batch.attention_mask, settings, torch_generator,
                                           row_budgets=budgets)
    stop = min(generator._stop_ids)
    kwargs = generator._generate_kwargs(params)
    inputs = {"input_ids": batch.input_ids} if soft is None else {"inputs_embeds": embeds}
    output = generator.model.generate(**inputs, attention_mask=batch.attention_mask,
                                      logits_processor=[_StopAt(budgets, batch.input_ids.shape[1] if soft is None
                                                                else 0, stop)], **kwargs)
    return (output[:, batch.input_ids.shape[1]:] if soft is None else output).tolist()


def generated_tokens(rows: list[list[int]], stop_ids: set[int], budgets=None) -> int:
    """Tokens a row really produced: up to and including its stop token, or its budget."""
    total = 0
    for index, ids in enumerate(rows):
        cut = next((i + 1 for i, t in enumerate(ids) if t in stop_ids), len(ids))
        if budgets is not None:
            cut = min(cut, int(budgets[index]))
        total += cut
    return total


def bench_sampling(model, tokenizer, *, rows: int, new_tokens: int, soft_k: int | None, lengths: str,
                   sampler: str, questions, batch_size: int | None = None) -> dict:
    import torch

    from shared.lm.generation import HFGenerator

    generator = HFGenerator(model, tokenizer, batch_size=batch_size or rows, sampler=sampler)
    prompts, soft = _prompts_and_soft(model, tokenizer, rows, soft_k, questions)
    budgets = length_budgets(rows, new_tokens) if lengths == "uniform" else None
    reset_peak()
    start = now()
    out = run_chunk(generator, prompts, soft, new_tokens, budgets)
    seconds = now() - start
    produced = generated_tokens(out, generator._stop_ids, budgets)
    result = {"sampler": generator.sampler, "rows": rows, "max_new_tokens": new_tokens, "lengths": lengths,
              "inputs": f"inputs_embeds (soft prefix K={soft_k})" if soft_k else "input_ids",
              "prompt_tokens": max(len(p) for p in prompts), "new_tokens": produced, "seconds": seconds,
              "new_tokens_per_s": produced / seconds, "peak_gib": peak_gib()}
    if generator.sampler == "fast":
        result["decoder"] = dataclasses.asdict(generator._decoder.stats)
    if lengths == "uniform":
        result["length_distribution"] = f"uniform {UNIFORM_LENGTHS[0]}-{UNIFORM_LENGTHS[1]} (stop token honoured)"
        result["mean_length"] = float(budgets.float().mean())
    del out
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return result


def decode_step_time(model, tokenizer, questions, rows: int, soft_k: int | None = None, profile: bool = False,
                     short: int = 8, long: int = 72) -> dict:
    """The fast decoder's time per decode step without the prefill: (t(long) - t(short)) / (long - short) new
    tokens at a fixed batch; optionally where the GPU and host time of the long run goes."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from shared.lm.generation import HFGenerator

    generator = HFGenerator(model, tokenizer, batch_size=rows)
    prompts, soft = _prompts_and_soft(model, tokenizer, rows, soft_k, questions)
    run_chunk(generator, prompts, soft, short)
    start = now()
    run_chunk(generator, prompts, soft, short)
    short_s = now() - start
    start = now()
    run_chunk(generator, prompts, soft, long)
    long_s = now() - start
    result = {"rows": rows, "inputs": "inputs_embeds" if soft_k else "input_ids",
              "ms_per_step": 1000 * (long_s - short_s) / (long - short), "prefill_and_short_s": short_s,
              "decoder": dataclasses.asdict(generator._decoder.stats)}
    if profile:
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run_chunk(generator, prompts, soft, long)
        result["top_cuda"] = prof.key_averages().table(sort_by="self_device_time_total", row_limit=16)
        result["top_cpu"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8)
    return result


def compile_warmup(model, tokenizer, questions, soft_k: int | None = None) -> dict:
    """The fast decoder's first call (compiles the layer step on CUDA) and the same call again."""
    from shared.lm.generation import HFGenerator

    generator = HFGenerator(model, tokenizer, batch_size=8)
    prompts, soft = _prompts_and_soft(model, tokenizer, 8, soft_k, questions)
    start = now()
    run_chunk(generator, prompts, soft, 8)
    first = now() - start
    start = now()
    run_chunk(generator, prompts, soft, 8)
    again = now() - start
    return {"first_call_s": first, "again_s": again, "compile_s": first - again}


def greedy_check(model, tokenizer, questions, rows: int = 64, new_tokens: int = 32) -> dict:
    """Does the fast decoder compute the model? Its greedy tokens against the argmax of one plain forward of
    transformers over prompt + those tokens (teacher forcing); where they differ, how far from a tie they were."""
    import torch

    from shared.lm import chat
    from shared.lm.decoding import DecodeSettings
    from shared.lm.generation import HFGenerator

    generator = HFGenerator(model, tokenizer, batch_size=rows)
    prompts, _ = _prompts_and_soft(model, tokenizer, rows, None, questions)
    device = generator._device()
    batch = chat.build_batch(prompts, pad_id=generator._pad_id, padding_side="left").to(device)
    with torch.inference_mode():
        embeds = model.get_input_embeddings()(batch.input_ids)
        out = generator._decoder.generate(model, embeds, batch.attention_mask, DecodeSettings(new_tokens, 0.0))
    full = [ids + [generator._pad_id] * (new_tokens - len(ids)) for ids in out]
    generated = torch.tensor(full, device=device)
    ids = torch.cat([batch.input_ids, generated], dim=1)
    mask = torch.cat([batch.attention_mask, torch.ones_like(generated)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    prompt_len = batch.input_ids.shape[1]
    predicted = logits[:, prompt_len - 1:-1].float()
    lengths = torch.tensor([len(o) for o in out], device=device)
    valid = torch.arange(new_tokens, device=device)[None, :] < lengths[:, None]
    agree = (predicted.argmax(-1) == generated) & valid
    chosen = predicted.gather(-1, generated.unsqueeze(-1)).squeeze(-1)
    gap = (predicted.max(-1).values - chosen)[valid & ~agree]
    top2 = predicted.topk(2, dim=-1).values
    return {"rows": rows, "new_tokens": new_tokens, "tokens_compared": int(valid.sum()),
            "agreement": float(agree.sum() / valid.sum()),
            "disagreements": int((valid & ~agree).sum()),
            "max_logit_gap_at_disagreement": float(gap.max()) if gap.numel() else 0.0,
            "median_top1_top2_logit_gap": float((top2[..., 0] - top2[..., 1])[valid].median()),
            "dtype": str(model.dtype)}


# ---------------------------------------------------------------------------------------------------------------
# soft-prefix training step


class DrawnLengthTeacher(HFGenerator):
    """Bench only: a teacher whose rows stop at lengths drawn uniformly from ``UNIFORM_LENGTHS`` (a random-weight
    model never emits the stop token itself). Each batch draws its rows' lengths from its own seed; the fast decoder
    ends a row at its length (``row_budgets``) and the row's last token becomes the stop token, so the completion
    stops there and the student trains on the stop as on a real one."""

    regime = "uniform"

    @classmethod
    def like(cls, generator: HFGenerator, regime: str = "uniform") -> DrawnLengthTeacher:
        if generator.sampler != "fast":
            raise ValueError("drawn lengths need the fast decoder")
        teacher = cls(generator.model, generator.tokenizer, batch_size=generator.batch_size)
        teacher.regime = regime
        return teacher

    def _generate_chunk(self, prompts, soft, params, seed) -> list[list[int]]:
        import torch

        from shared.lm import chat
        from shared.lm.decoding import DecodeSettings

        budgets = length_budgets(len(prompts), params.max_new_tokens, seed, self.regime)
        device = self._device()
        batch = chat.build_batch(prompts, pad_id=self._pad_id, padding_side="left").to(device)
        embedding = self.model.get_input_embeddings()
        embeds = embedding(batch.input_ids) if soft is None else chat.inputs_embeds(batch, embedding, soft.to(device))
        settings = DecodeSettings(max_new_tokens=params.max_new_tokens, temperature=params.temperature,
                                  top_p=params.top_p)
        rows = self._decoder.generate(self.model, embeds, batch.attention_mask, settings,
                                      torch.Generator(device=device).manual_seed(seed), row_budgets=budgets)
        stop = min(self._stop_ids)
        return [ids if (ids and ids[-1] in self._stop_ids) or len(ids) < int(budget) else ids[:-1] + [stop]
                for ids, budget in zip(rows, budgets, strict=True)]


def with_teacher_lengths(pair, lengths: str):
    """``pair`` as is (``fixed``: a random model runs every reply to the limit) or with its teacher stopping at drawn
    lengths (``uniform``)."""
    if lengths == "fixed":
        return pair
    return dataclasses.replace(pair, teacher_generator=DrawnLengthTeacher.like(pair.teacher_generator, lengths))


def bench_train_step(pair, cfg: dict, questions, *, micro_batch_tokens: int, bucket_by_length: bool,
                     shared_prompt: bool = False, lengths: str = "fixed", params: dict | None = None,
                     matmul_tflops: float | None = None, profile: bool = False) -> dict:
    """One soft-prefix training step at the record's setting (step 0: the same draws for every path of a teacher).

    ``params`` and ``matmul_tflops`` add the student's compute floor: 4 FLOP per matmul parameter per token (forward,
    and the backward to the activations: no weight gradients), the backbone over the tokens the path runs (padding
    excluded), the LM head over the loss tokens, at the calibrated GEMM rate."""
    from shared.search.soft_prompt import SoftPrefixTrainer, SoftTrainingSettings

    settings = SoftTrainingSettings(k=cfg["soft_k"], lr=5e-4, steps=1, questions_per_step=cfg["soft_questions"],
                                    completions_per_question=cfg["soft_completions"],
                                    max_new_tokens=cfg["max_new_tokens"], micro_batch_tokens=micro_batch_tokens,
                                    bucket_by_length=bucket_by_length, shared_prompt=shared_prompt)
    pair = with_teacher_lengths(pair, lengths)
    trainer = SoftPrefixTrainer(pair, settings, questions, questions[:1], seed=0, model_ref="bench")
    soft = trainer.initial_soft().requires_grad_(True)
    optimizer = trainer.make_optimizer(soft)
    reset_peak()
    start = now()
    stats = trainer.train_step(0, soft, optimizer)
    total = now() - start
    result = {"sampler": pair.teacher_generator.sampler, "bucket_by_length": bucket_by_length,
              "shared_prompt": shared_prompt, "lengths": lengths,
              "k": settings.k, "questions": settings.questions_per_step,
              "completions_per_question": settings.completions_per_question, "pairs": stats.n_pairs,
              "loss_tokens": stats.n_tokens, "max_new_tokens": settings.max_new_tokens,
              "micro_batch_tokens": micro_batch_tokens, "step_s": total, "teacher_s": stats.teacher_s,
              "forward_backward_s": stats.forward_backward_s, "train_ce": stats.train_ce, "peak_gib": peak_gib(),
              "student_tokens": stats.student_tokens, "student_padded_tokens": stats.padded_tokens}
    if lengths == "uniform":
        result["length_distribution"] = f"uniform {UNIFORM_LENGTHS[0]}-{UNIFORM_LENGTHS[1]} (stop token honoured)"
        result["mean_reply_tokens"] = stats.n_tokens / stats.n_pairs
    if params and matmul_tflops:
        flop = 4 * (stats.student_tokens * params["backbone_matmul"] + stats.n_tokens * params["lm_head"])
        result["floor_s_at_matmul_rate"] = flop / (matmul_tflops * 1e12)
        result["floor_formula"] = "4 x (student_tokens x backbone matmul params + loss_tokens x lm_head params) / rate"
    if profile:
        result["profile_one_micro_batch"] = profile_micro_batch(trainer, soft)
    return result


def profile_student_passes(pair, cfg: dict, questions, micro_batch_tokens: int) -> dict:
    """Where the student's forward/backward spends GPU time on one draw (fixed lengths), each path: the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    from shared.lm.teacher import n_loss_tokens
    from shared.search.soft_prompt import SoftPrefixTrainer, SoftTrainingSettings

    out = {}
    examples = None
    for shared in (False, True):
        settings = SoftTrainingSettings(k=cfg["soft_k"], lr=5e-4, steps=1, questions_per_step=cfg["soft_questions"],
                                        completions_per_question=cfg["soft_completions"],
                                        max_new_tokens=cfg["max_new_tokens"], micro_batch_tokens=micro_batch_tokens,
                                        shared_prompt=shared)
        trainer = SoftPrefixTrainer(pair, settings, questions, questions[:1], seed=0, model_ref="bench")
        examples = examples or trainer.draws.step_examples(0)
        soft = trainer.initial_soft().requires_grad_(True)
        with trainer.pair.student() as model:
            start = now()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                trainer.student_pass(model, examples, soft, backward_scale=1 / n_loss_tokens(examples))
            seconds = now() - start
        out["shared" if shared else "current"] = {
            "seconds_profiled": seconds,
            "top_cuda": prof.key_averages().table(sort_by="self_device_time_total", row_limit=14)}
    return out


def profile_micro_batch(trainer, soft) -> dict:
    """Where one micro-batch's forward/backward spends GPU time (the top kernels)."""
    from torch.profiler import ProfilerActivity, profile

    from shared.lm.teacher import batch_ce_sum, micro_batches

    examples = trainer.draws.step_examples(1)
    group = micro_batches(examples, trainer.settings.micro_batch_tokens)[0]
    with trainer.pair.student() as model:
        batch_ce_sum(model, group, trainer.pad_id, soft).backward()  # warm
        start = now()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            batch_ce_sum(model, group, trainer.pad_id, soft).backward()
        seconds = now() - start
    return {"rows": len(group), "tokens": sum(len(e) for e in group), "seconds_profiled": seconds,
            "top_cuda": prof.key_averages().table(sort_by="self_device_time_total", row_limit=14)}


# ---------------------------------------------------------------------------------------------------------------
# GCG step with the screen


def bench_gcg_screen(pair, cfg: dict, params: dict, questions, matmul_tflops: float) -> dict:
    from shared.search.gcg import GcgSearch, GcgSettings, SuffixRules
    from shared.search.soft_prompt import LearnedPrompt

    settings = GcgSettings(length=cfg["suffix_length"], steps=1, search_width=cfg["search_width"], topk=cfg["topk"],
                           questions_per_step=cfg["gcg_questions"], completions_per_question=cfg["gcg_completions"],
                           max_new_tokens=cfg["max_new_tokens"], micro_batch_tokens=cfg["micro_batch_tokens"],
                           max_tokens_per_forward=cfg["max_tokens_per_forward"], screen_pairs=cfg["screen_pairs"],
                           screen_keep=cfg["screen_keep"], screen_check_every=1)
    rules = SuffixRules.of(pair.tokenizer, pair.student_model.config.vocab_size, settings, questions[:1])
    prompt = LearnedPrompt(kind="ids", model_ref="bench", ids=rules.random_suffix(settings.length, 0))
    search = GcgSearch(pair, prompt, settings, questions, questions[:1], seed=0, rules=rules)
    reset_peak()
    start = now()
    _, stats = search.step(0, prompt.ids)
    total = now() - start
    screen = dataclasses.asdict(stats.screen) if stats.screen else None
    check_s = (screen or {}).get("check_s") or 0.0
    step_s = total - check_s  # the step as a search runs it on an unchecked step
    full_tokens = (screen or {}).get("full_tokens") or stats.candidate_tokens
    return {
        "pairs": settings.pairs_per_step, "search_width": settings.search_width, "topk": settings.topk,
        "suffix_length": settings.length, "teacher_max_new_tokens": settings.max_new_tokens,
        "screen_pairs": settings.screen_pairs, "screen_keep": settings.screen_keep,
        "step_s": step_s, "step_s_with_check": total, "teacher_s": stats.teacher_s, "gradient_s": stats.gradient_s,
        "candidates_s": stats.candidates_s, "filter_s": stats.filter_s, "candidate_tokens": stats.candidate_tokens,
        "forwards": stats.forwards, "candidates_scored": stats.scored, "candidates_rejected": stats.rejected,
        "screen": screen,
        "full_evaluation_s": stats.candidates_s - (screen or {}).get("kept_s", 0.0) + check_s,
        "full_evaluation_tokens": full_tokens,
        "full_evaluation_floor_s_at_matmul_rate": full_tokens * 2 * params["matmul"] / (matmul_tflops * 1e12),
        "peak_gib": peak_gib(), "loss": stats.loss,
        "note": "random weights: candidate losses differ little, so the screen's agreement here says little; "
                "see the real-model agreement on CPU",
    }


def teacher_draw_s(pair, cfg: dict, questions) -> dict:
    """One GCG step's teacher draw (questions x completions, max_new_tokens) through this pair's sampler."""
    from shared.lm.generation import SamplingParams

    params = SamplingParams(n=cfg["gcg_completions"], max_new_tokens=cfg["max_new_tokens"], seed=0)
    start = now()
    out = pair.sample(questions[: cfg["gcg_questions"]], params)
    return {"sampler": pair.teacher_generator.sampler, "rows": sum(len(c) for c in out), "seconds": now() - start}
