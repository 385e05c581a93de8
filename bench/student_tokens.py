"""What each soft-prefix student path runs per step at the record's shape, counted on the CPU (no GPU, no model).

    python -m bench.student_tokens          # writes bench/results/student_tokens.json and .md

One step: K=64, 16 questions x 20 completions, the issue170 questions with their Qwen2.5 ids (``bench.qwen_tokenizer``),
reply lengths drawn as the GPU bench draws them (``fixed`` 256, ``uniform`` 32-256, ``record`` 144-256, the
stop token ending each drawn reply), micro-batches of 8192 tokens. For each path: the tokens its backbone runs
(padding excluded) and with padding, counted by the paths' own grouping code (``micro_batches``,
``length_groups``, ``pack``; tests/test_student_tokens.py checks the counts against ``StudentPass`` on the tiny
model). Also the teacher's prefill rows and tokens with and without the shared prefill.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.fast_paths import length_budgets
from bench.qwen_tokenizer import bench_tokenizer, questions

RESULTS = Path(__file__).resolve().parent / "results"
ALIGN_CUDA = 128  # packed rows are padded to FlexAttention's block size on CUDA


def step_examples(tokenizer, regime: str, *, k: int = 64, n_questions: int = 16, completions: int = 20,
                  new_tokens: int = 256, seed: int = 0):
    """One step's student examples: each question's soft(k) prompt with replies of drawn lengths (random ids)."""
    import torch

    from shared.lm.teacher import with_reply_ids
    from shared.search.soft_prompt import LearnedPrompt

    prompt = LearnedPrompt(kind="soft", model_ref="bench", k=k)
    rows = n_questions * completions
    lengths = [new_tokens] * rows if regime == "fixed" else length_budgets(rows, new_tokens, seed, regime).tolist()
    g = torch.Generator().manual_seed(seed)
    out = []
    for index, length in enumerate(lengths):
        question = questions()[index // completions]
        stopped = regime != "fixed"  # a drawn length ends with the stop token, within the length
        reply = torch.randint(0, 8000, (length - stopped,), generator=g).tolist()
        out.append(with_reply_ids(prompt.build(tokenizer, question), reply,
                                  tokenizer.eos_token_id if stopped else None))
    return out


def counts(examples, path: str, max_tokens: int) -> dict:
    """The tokens a path's backbone runs for ``examples`` and the same with padding (as its ``StudentPass``)."""
    from shared.lm.packed import pack
    from shared.lm.teacher import _reply_tail, distinct_prompts, length_groups, micro_batches

    if path == "current":
        groups = micro_batches(examples, max_tokens)
        return {"tokens": sum(len(e) for e in examples),
                "padded_tokens": sum(len(g) * max(len(e) for e in g) for g in groups), "forwards": len(groups)}
    if path == "cache":
        prompts, _ = distinct_prompts(examples)
        heads = [len(p) - 1 for p in prompts]
        tails = [len(_reply_tail(e)[0]) for e in examples]
        groups = length_groups(tails, max_tokens)
        return {"tokens": sum(heads) + sum(tails),
                "padded_tokens": len(heads) * max(heads) + sum(len(g) * max(tails[i] for i in g) for g in groups),
                "forwards": 1 + len(groups)}
    rows = pack(examples, max_tokens)
    return {"tokens": sum(len(r) for r in rows), "padded_tokens": sum(len(r) + (-len(r) % ALIGN_CUDA) for r in rows),
            "forwards": len(rows)}


def measure(max_tokens: int = 8192) -> dict:
    tokenizer = bench_tokenizer()
    out: dict = {"command": "python -m bench.student_tokens", "micro_batch_tokens": max_tokens,
                 "setting": "K=64, 16 questions x 20 completions, Qwen2.5 ids of the issue170 questions",
                 "regimes": {}}
    for regime in ("fixed", "uniform", "record"):
        examples = step_examples(tokenizer, regime)
        loss = sum(e.loss_end - e.assistant_start for e in examples)
        paths = {path: counts(examples, path, max_tokens) for path in ("current", "cache", "packed")}
        for c in paths.values():
            c["padding_share"] = 1 - c["tokens"] / c["padded_tokens"]
            c["of_current_padded"] = c["padded_tokens"] / paths["current"]["padded_tokens"]
        out["regimes"][regime] = {"loss_tokens": loss, "mean_reply_tokens": loss / len(examples), "paths": paths}
    teacher = [len(p) for p in _teacher_prompts(tokenizer)]
    out["teacher_prefill"] = {"rows_without_sharing": 16 * 20, "rows_shared": 16,
                              "tokens_without_sharing": 20 * sum(teacher), "tokens_shared": sum(teacher)}
    return out


def _teacher_prompts(tokenizer):
    from shared.lm import chat

    return [chat.build_prompt(tokenizer, "default", q) for q in questions()[:16]]


def table(r: dict) -> list[str]:
    lines = [f"{r['setting']}, micro-batches of {r['micro_batch_tokens']} tokens; `{r['command']}`", "",
             "| replies | loss tokens | student path | tokens run | with padding | padding | forwards | "
             "padded tokens vs current |", "| :--- | ---: | :--- | ---: | ---: | ---: | ---: | ---: |"]
    names = {"current": "every example in full", "cache": "each prompt once, KV cache",
             "packed": "packed, offset mask (CUDA: rows to 128)"}
    for regime, g in r["regimes"].items():
        for path, c in g["paths"].items():
            lines.append(f"| {regime} (mean {g['mean_reply_tokens']:.0f}) | {g['loss_tokens']:,} | {names[path]} | "
                         f"{c['tokens']:,} | {c['padded_tokens']:,} | {100 * c['padding_share']:.1f}% | "
                         f"{c['forwards']} | {c['of_current_padded']:.2f} |")
    t = r["teacher_prefill"]
    lines += ["", f"Teacher prefill per step: {t['rows_shared']} rows, {t['tokens_shared']:,} tokens with the shared "
              f"prefill against {t['rows_without_sharing']} rows, {t['tokens_without_sharing']:,} tokens without."]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.student_tokens", description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args(argv)
    r = measure()
    folder = Path(args.results)
    (folder / "student_tokens.json").write_text(json.dumps(r, indent=1) + "\n")
    text = "\n".join(table(r)) + "\n"
    (folder / "student_tokens.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
