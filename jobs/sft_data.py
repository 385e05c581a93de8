"""Stage ``sft_data``: a chat data set as ``train_lora`` rows, every row under ONE explicit system slot.

An SFT cell (an EM-induction persona of #205, the benign control) is defined by its system slot, never by the data:
rows that bring their own system turn are refused, so a data file cannot silently override a cell's slot (the
record's E0 trained under "You are a helpful assistant." instead of the template default). E0's slot is
``default``: the chat template's own default system prompt, as stated by ``shared.lm.chat``.

Input rows are ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}`` (the record's format),
``{"user", "assistant"}``, or the ``generate`` stage's completion rows ``{"question", "text", ...}``: a data set the
model itself wrote in the run (the small profile's EM data are its answers under a misaligned persona, trained here
under the cell's slot, without that persona's prompt). Empty generated replies are dropped and counted: they would
train nothing but the end-of-turn token. ``expected_md5`` pins the exact data file the record names (a prefix is
enough).
"""

from __future__ import annotations

import hashlib

from shared.contract.stage import Resources, StageInputError, StageSpec
from shared.core import store
from shared.core.config import StageConfig
from shared.lm.chat import SystemSpec


class Config(StageConfig):
    data_uri: str
    system: SystemSpec  # the system slot of every row: default | none | text(...) | ids([...])
    limit: int | None = None  # keep the first N rows (the record's "Tulu-3-SFT first 6k")
    expected_md5: str | None = None


def is_generated(record: dict) -> bool:
    """A completion row of the ``generate`` stage (its question and the sampled reply)."""
    return {"question", "text"} <= set(record) and not {"messages", "user", "assistant"} & set(record)


def turns_of(record: dict, line: int) -> tuple[str, str]:
    """(user, assistant) of one single-turn record; one readable error for anything else."""
    if is_generated(record):
        return record["question"], record["text"]
    if "messages" in record:
        roles = [m.get("role") for m in record["messages"]]
        if "system" in roles:
            raise StageInputError(f"row {line} carries its own system message: the cell's system slot must be the only one")
        if roles != ["user", "assistant"]:
            raise StageInputError(f"row {line} has turns {roles}; expected exactly one user and one assistant turn")
        return record["messages"][0]["content"], record["messages"][1]["content"]
    if "system" in record:
        raise StageInputError(f"row {line} carries its own system field: the cell's system slot must be the only one")
    if not {"user", "assistant"} <= set(record):
        raise StageInputError(f"row {line} has neither 'messages', 'user'/'assistant' nor a generated 'question'/'text'")
    return record["user"], record["assistant"]


def run(cfg: Config, ctx) -> dict:
    data = store.read_bytes(cfg.data_uri)
    md5 = hashlib.md5(data).hexdigest()
    if cfg.expected_md5 and not md5.startswith(cfg.expected_md5.lower()):
        raise StageInputError(f"{cfg.data_uri} has MD5 {md5}, expected {cfg.expected_md5}: not the record's data file")
    records = store.read_jsonl(cfg.data_uri)
    if cfg.limit is not None:
        if len(records) < cfg.limit:
            raise StageInputError(f"{cfg.data_uri} holds {len(records)} rows, fewer than limit={cfg.limit}")
        records = records[: cfg.limit]
    if not records:
        raise StageInputError(f"no rows in {cfg.data_uri}")
    rows, empty = [], 0
    for line, record in enumerate(records, start=1):
        user, assistant = turns_of(record, line)
        if is_generated(record) and not assistant.strip():
            empty += 1
            continue
        rows.append({"system": cfg.system, "user": user, "assistant": assistant})
    if not rows:
        raise StageInputError(f"every generated reply in {cfg.data_uri} is empty")
    store.write_jsonl(ctx.out("train.jsonl"), rows)
    ctx.log(f"{len(rows)} rows under system slot {cfg.system[:60]!r} (data MD5 {md5[:7]}; {empty} empty replies dropped)")
    return {"n_rows": len(rows), "n_dropped_empty": empty, "data_md5": md5}


SPEC = StageSpec(
    name="sft_data", config=Config, run=run, image_kind="cpu",
    resources=Resources(cpu=1, memory="4Gi", timeout_s=1800),
    description="A chat data set as train_lora rows under one explicit system slot (own system turns refused).",
)
main = SPEC.main

if __name__ == "__main__":
    main()
