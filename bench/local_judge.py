"""The local judge per item, with and without the shared prompt prefix computed once, side by side.

SmolLM2-135M-Instruct judges the same answers (issue170's small panel questions, a fixed answer of ~60 tokens each)
with the shipped alignment template, once computing each whole prompt and once reusing the keys and values of the
prompt start every item shares. Each mode judges ``--items`` items after one untimed item, on ``--threads`` threads:

    python -m bench.local_judge --items 8 --threads 2 --out bench/results/local_judge.json

writes the measurements and, beside them, the table (``local_judge.md``) generated from them.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

ANSWER = ("I would start by listening to what they need, then offer practical help where I can: a meal, a lift to "
          "an appointment, or simply some company. Small, steady kindness tends to matter more than grand gestures.")


def items(n: int):
    from shared.core.datafiles import read_questions
    from shared.judge import JudgeItem

    questions = read_questions("package:issue170/small_panel.jsonl", "panel")
    return [JudgeItem(id=f"i{k}", question=questions[k % len(questions)]["text"], answer=ANSWER) for k in range(n + 1)]


def measure(reuse_prefix: bool, n: int) -> dict:
    from shared.judge import JudgeSpec, make_judge

    judge = make_judge(JudgeSpec(kind="local", model="smollm2:135m-instruct", template="alignment_v1"))
    if not reuse_prefix:
        judge.__dict__["shared_prefix_ids"] = []  # every item computes its whole prompt, as before the cache
    batch = items(n)
    judge._verdict(batch[0])  # untimed: weights loaded, the prefix computed
    times, scores = [], []
    for item in batch[1:]:
        start = time.perf_counter()
        verdict = judge._verdict(item)
        times.append(time.perf_counter() - start)
        scores.append(verdict.mass["total"])
    prompt = judge.prompt_ids(batch[1])
    return {"reuse_prefix": reuse_prefix, "items": n, "median_s": statistics.median(times), "min_s": min(times),
            "max_s": max(times), "prompt_tokens": len(prompt), "reused_tokens": judge._reusable_prefix(prompt),
            "candidate_tokens": sum(len(c.ids) - 1 for c in judge.candidates), "candidate_mass": scores}


def table(result: dict) -> str:
    rows = ["| prompt start | prompt tokens computed per item | candidate tokens | median s per item [min, max] |",
            "| :--- | ---: | ---: | ---: |"]
    for run in result["runs"]:
        computed = run["prompt_tokens"] - (run["reused_tokens"] if run["reuse_prefix"] else 0)
        rows.append(f"| {'reused (computed once)' if run['reuse_prefix'] else 'computed for every item'} "
                    f"| {computed} of {run['prompt_tokens']} | {run['candidate_tokens']} "
                    f"| {run['median_s']:.2f} [{run['min_s']:.2f}, {run['max_s']:.2f}] |")
    off, on = result["runs"]
    return (f"Local judge per item, SmolLM2-135M-Instruct, alignment_v1, {result['threads']} threads, "
            f"{off['items']} items per mode (`{result['command']}`, {result['machine']}):\n\n" + "\n".join(rows)
            + f"\n\nSpeed-up: {off['median_s'] / on['median_s']:.2f}x. Candidate mass agrees item by item to "
            f"{result['max_mass_difference']:.1e}.\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.local_judge", description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True, help="JSON file; the table is written beside it as .md")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    runs = [measure(False, args.items), measure(True, args.items)]
    result = {"command": f"python -m bench.local_judge --items {args.items} --threads {args.threads}",
              "machine": f"{platform.machine()} CPU", "threads": args.threads, "runs": runs,
              "max_mass_difference": max(abs(a - b) for a, b in zip(runs[0]["candidate_mass"],
                                                                     runs[1]["candidate_mass"], strict=True))}
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(table(result))
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
