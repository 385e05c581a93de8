"""The soft-prefix student paths against the reference on a real model, in fp32 on the CPU: how far apart are the
summed CE and the prefix gradient?

    python -m bench.student_equality      # writes bench/results/student_equality.json

SmolLM2-135M-Instruct (the small profile's model), a soft(8) prefix, four issue170 questions x 5 replies of
lengths 1-40 (random ids, some stopped), micro-batches small enough that each path splits questions over several
forwards. The paths compute the same sums in other orders and shapes, so they differ by fp32 rounding only.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "smollm2:135m-instruct"


def examples(pair, k: int = 8):
    import torch

    from bench.qwen_tokenizer import questions
    from shared.lm.teacher import with_reply_ids
    from shared.search.soft_prompt import LearnedPrompt

    tokenizer = pair.tokenizer
    prompt = LearnedPrompt(kind="soft", model_ref=MODEL, k=k)
    g = torch.Generator().manual_seed(0)
    out = []
    for question in questions()[:4]:
        for length, stopped in ((1, True), (40, False), (17, True), (8, True), (29, True)):
            reply = torch.randint(3, len(tokenizer) - 3, (length,), generator=g).tolist()
            out.append(with_reply_ids(prompt.build(tokenizer, question), reply,
                                      tokenizer.eos_token_id if stopped else None))
    return out


def run(pair, batch, path: str, max_tokens: int, k: int = 8):
    from shared.lm import chat
    from shared.lm.teacher import n_loss_tokens, student_ce

    weight = pair.student_model.get_input_embeddings().weight
    soft = (weight[10:10 + k].detach().float() + 0.01).clone().requires_grad_(True)
    start = time.perf_counter()
    result = student_ce(pair.student_model, batch, chat.soft_placeholder_id(pair.tokenizer), soft,
                        max_tokens=max_tokens, shared_prompt=path != "current", pack_replies=path == "packed",
                        backward_scale=1 / n_loss_tokens(batch))
    return result, soft.grad, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.student_equality", description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args(argv)
    import torch

    from shared.lm.teacher import load_teacher_student

    pair = load_teacher_student(MODEL, dtype="float32")
    batch = examples(pair)
    reference, reference_grad, reference_s = run(pair, batch, "current", 10**6)
    scale = float(reference_grad.abs().max())
    out = {"command": "python -m bench.student_equality", "model": MODEL, "dtype": "float32",
           "examples": len(batch), "loss_tokens": sum(e.loss_end - e.assistant_start for e in batch),
           "torch_threads": torch.get_num_threads(), "reference": {"ce_sum": reference.ce_sum, "seconds": reference_s},
           "paths": {}}
    for path, max_tokens in (("cache", 200), ("packed", 200)):
        result, grad, seconds = run(pair, batch, path, max_tokens)
        out["paths"][path] = {
            "micro_batch_tokens": max_tokens, "ce_sum": result.ce_sum,
            "ce_relative_difference": abs(result.ce_sum - reference.ce_sum) / abs(reference.ce_sum),
            "grad_max_abs_difference_over_max_grad": float((grad - reference_grad).abs().max()) / scale,
            "tokens": result.tokens, "padded_tokens": result.padded_tokens, "seconds": seconds}
    out["reference"] |= {"tokens": reference.tokens, "padded_tokens": reference.padded_tokens}
    Path(args.results, "student_equality.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
