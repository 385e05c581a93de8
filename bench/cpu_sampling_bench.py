"""CPU sampling speed of the small profile's model: ``HFGenerator`` with the fast decoder against ``model.generate``.

    python -m bench.cpu_sampling_bench --out bench/results

SmolLM2-135M-Instruct (``smollm2:135m-instruct``, bf16, its own dtype) samples ``max_new_tokens`` at T=1 for batches
of chat prompts (the "default" system slot and the GPU bench's questions); the model stops where it stops, so new
tokens are counted up to each row's stop token. The two samplers alternate (fast, generate, fast, generate, ...) so
that a machine shared with other work loads both alike; each row of the JSON is one timed call.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

MODEL = "smollm2:135m-instruct"


def one_call(generator, prompts, params) -> dict:
    start = time.perf_counter()
    out = generator.generate(prompts, params)
    seconds = time.perf_counter() - start
    produced = sum(len(c.token_ids) + (c.finish_reason == "stop") for cs in out for c in cs)
    return {"seconds": seconds, "new_tokens": produced, "new_tokens_per_s": produced / seconds,
            "rows_stopped": sum(c.finish_reason == "stop" for cs in out for c in cs)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_sampling_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the results JSON")
    parser.add_argument("--batches", nargs="*", type=int, default=[64, 128])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)

    import torch
    import transformers

    from bench.gpu_bench import QUESTIONS
    from shared.lm import chat, models
    from shared.lm.generation import HFGenerator, SamplingParams

    model = models.load_model(MODEL, device="cpu")
    tokenizer = models.load_tokenizer(MODEL)
    results: dict = {"model": MODEL, "dtype": str(model.dtype), "device": platform.processor() or "cpu",
                     "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                     "torch": torch.__version__, "transformers": transformers.__version__,
                     "load_average_before": os.getloadavg(), "max_new_tokens": args.new_tokens,
                     "sampling": "temperature 1.0, top_p 1.0",
                     "command": f"python -m bench.cpu_sampling_bench --out OUT --batches {' '.join(map(str, args.batches))}"
                                f" --new-tokens {args.new_tokens} --repeats {args.repeats}",
                     "runs": []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "cpu_smollm2_sampling.json"
    for batch in args.batches:
        prompts = [chat.build_prompt(tokenizer, "default", QUESTIONS[i % len(QUESTIONS)]) for i in range(batch)]
        generators = {name: HFGenerator(model, tokenizer, batch_size=batch, sampler=name)
                      for name in ("fast", "generate")}
        warm = SamplingParams(max_new_tokens=2, seed=0)
        for generator in generators.values():
            generator.generate(prompts[:2], warm)
        for repeat in range(args.repeats):
            for name, generator in generators.items():
                params = SamplingParams(max_new_tokens=args.new_tokens, seed=repeat)
                run = {"batch": batch, "sampler": name, "repeat": repeat, **one_call(generator, prompts, params)}
                results["runs"].append(run)
                print(json.dumps(run), flush=True)
                path.write_text(json.dumps(results, indent=2) + "\n")
    summary = {}
    for batch in args.batches:
        rate = {name: statistics.median(r["new_tokens_per_s"] for r in results["runs"]
                                        if r["batch"] == batch and r["sampler"] == name)
                for name in ("fast", "generate")}
        summary[f"batch{batch}"] = {"fast_new_tokens_per_s": rate["fast"],
                                    "generate_new_tokens_per_s": rate["generate"],
                                    "speedup": rate["fast"] / rate["generate"]}
    results["median"] = summary
    results["load_average_after"] = os.getloadavg()
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
