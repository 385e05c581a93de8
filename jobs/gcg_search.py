"""Stage ``gcg_search``: one hard-prompt cell of #170 -- GCG over L token ids, or the random-suffix baseline.

``slot: system`` puts the ids in the system slot (the record's main sweep); ``slot: user`` appends them to the user
turn with ``user_slot_system`` in the system slot (the #94 user-slot sanity variant; ``none`` by default, as its
training had no system block). ``mode: random`` draws L random ids and only measures their held-out CE: draw
``draw`` of the null, from a random stream of its own (so no null suffix is a GCG start, which is drawn from the
training seed).

The suffix is ids throughout and is written as ids in ``prompt.json``; ``eval_prompt_cell`` splices exactly those
ids. By default they are also text: the start (and the random baseline) and every kept candidate are printable
tokens whose decoded text, typed into the slot, gives back the same ids in the prompt of every question the suffix
is used with -- training, validation and ``evaluation_panel`` (``shared.search.gcg.SuffixRules``); a candidate that fails
on any of them is rejected. ``metrics.json`` records the kept suffix's text, its start, in how many of those
prompts the text round-trips (all of them, or the stage fails), and the candidate screen's settings and its
measured agreement with the full evaluation. Checkpoints (``checkpoint/``) let a preempted search resume.
"""

from __future__ import annotations

import statistics
from typing import Literal

from pydantic import BaseModel, Field, NonNegativeInt

from shared.contract.stage import Context, Resources, StageInputError, StageSpec
from shared.core import store
from shared.core.config import StageConfig
from shared.lm.chat import SystemSpec
from shared.lm.teacher import TeacherSpec
from shared.search.gcg import GcgSettings


class Question(BaseModel):
    id: str
    text: str


class Config(StageConfig):
    model_ref: str
    teacher: TeacherSpec
    train_questions: list[Question] = Field(min_length=1)
    val_questions: list[Question] = Field(min_length=1)
    # the questions the kept suffix will be evaluated on: its text's round trip is reported on them too
    evaluation_panel: list[Question] = []
    slot: Literal["system", "user"] = "system"
    user_slot_system: SystemSpec = "none"
    mode: Literal["search", "random"] = "search"
    draw: NonNegativeInt = 0  # mode random: which draw of the null
    search: GcgSettings
    dtype: str | None = None
    sample_batch_size: int = 64


def run(cfg: Config, ctx: Context) -> dict:
    from shared.search.gcg import GcgSearch, GcgState, SuffixRules, SuffixText
    from shared.search.soft_prompt import (
        LearnedPrompt,
        examples_from_json,
        examples_to_json,
        save_learned_prompt,
    )

    overlap = {q.id for q in cfg.train_questions} & {q.id for q in cfg.val_questions}
    if overlap:
        raise StageInputError(f"questions {sorted(overlap)[:3]} are in both the training and validation split")
    pair = cfg.teacher.load(cfg.model_ref, dtype=cfg.dtype, sample_batch_size=cfg.sample_batch_size)
    vocab = pair.student_model.get_input_embeddings().weight.shape[0]
    val_texts = [q.text for q in cfg.val_questions]
    used_with = [q.text for q in cfg.train_questions + cfg.val_questions + cfg.evaluation_panel]
    # candidates are screened on the validation questions; a suffix is kept only if it round-trips on all of them
    rules = SuffixRules.of(pair.tokenizer, vocab, cfg.search, used_with, slot=cfg.slot, system=cfg.user_slot_system,
                           screen_questions=val_texts)
    try:
        start = rules.random_suffix(cfg.search.length, start_seed(cfg))
    except ValueError as err:
        raise StageInputError(str(err)) from None
    prompt = LearnedPrompt(kind="ids", model_ref=cfg.model_ref, slot=cfg.slot, ids=start, system=cfg.user_slot_system)
    search = GcgSearch(pair, prompt, cfg.search, [q.text for q in cfg.train_questions], val_texts, seed=cfg.seed,
                       rules=rules)
    checkpoint_dir = ctx.out("checkpoint")
    state_uri, val_uri = store.join(checkpoint_dir, "state.json"), store.join(checkpoint_dir, "val_set.json")
    state = None
    if store.exists(state_uri) and store.exists(val_uri):
        saved = store.read_json(state_uri)
        if saved.pop("config_hash", None) == cfg.config_hash():
            state = GcgState(**saved)
            search.val_examples = examples_from_json(store.read_json(val_uri))
            ctx.log(f"resuming from the checkpoint at step {state.step}")
    if state is None:
        state = search.new_state()
        search.val_examples = search.draws.val_examples()
        store.write_json(val_uri, examples_to_json(search.val_examples))

    def checkpoint(s: GcgState) -> None:
        store.write_json(state_uri, {"config_hash": cfg.config_hash(), "step": s.step, "suffix": s.suffix,
                                     "best_suffix": s.best_suffix, "best_val": s.best_val, "curve": s.curve})

    every = max(1, cfg.search.steps // 20)

    tracked = 0  # curve points sent to the tracker (a resumed run sends the checkpoint's too)

    def on_step(stats) -> None:
        nonlocal tracked
        tracked = ctx.track.log_curve(state.curve, since=tracked)
        if stats.step % every == 0 or stats.step + 1 == cfg.search.steps:
            kept = "kept the current suffix" if stats.kept_current else "took a candidate"
            ctx.log(f"step {stats.step + 1}/{cfg.search.steps} CE {stats.loss:.4f}, {kept} (teacher "
                    f"{stats.teacher_s:.1f}s, gradient {stats.gradient_s:.1f}s, {stats.scored} of "
                    f"{stats.sampled} candidates scored -- {stats.duplicates} duplicates, {stats.rejected} not text "
                    f"-- {stats.candidates_s:.1f}s)")

    if cfg.mode == "random":
        state.best_val = search.held_out_ce(state.suffix)
        state.curve = [{"step": 0, "heldout_ce": state.best_val}]
        ctx.log(f"random {cfg.slot}-slot suffix of {cfg.search.length} ids: held-out CE {state.best_val:.4f}")
    else:
        ctx.log(f"GCG in the {cfg.slot} slot, L={cfg.search.length}, {cfg.search.steps} steps, width "
                f"{cfg.search.search_width}, top-k {cfg.search.topk}, {cfg.search.pairs_per_step} pairs per step")
        state = search.run(state, on_step=on_step, checkpoint=checkpoint)
    checkpoint(state)
    save_learned_prompt(prompt.with_ids(state.best_suffix), ctx.out())
    store.write_jsonl(ctx.out("curve.jsonl"), state.curve)
    questions = cfg.train_questions + cfg.val_questions
    kept = prompt.with_ids(state.best_suffix)
    everywhere = SuffixText(pair.tokenizer, used_with, slot=cfg.slot, system=cfg.user_slot_system)
    round_trips = everywhere.count(state.best_suffix)
    if cfg.search.round_trip and round_trips < len(everywhere.questions):
        raise StageInputError(f"the kept suffix {state.best_suffix} round-trips in only {round_trips} of "
                              f"{len(everywhere.questions)} prompts it is used with: rejected")
    store.write_json(ctx.out("train_prompt_ids.json"), {q.id: kept.build(pair.tokenizer, q.text).input_ids
                                                        for q in questions})
    steps = [p for p in state.curve if "train_ce" in p]
    held_out = [p["heldout_ce"] for p in state.curve if "heldout_ce" in p]
    metrics = {
        "mode": cfg.mode, "slot": cfg.slot, "length": cfg.search.length, "steps": state.step,
        "best_heldout_ce": state.best_val, "initial_heldout_ce": held_out[0], "final_heldout_ce": held_out[-1],
        "step_s_mean": statistics.fmean(p["teacher_s"] + p["gradient_s"] + p["candidates_s"] for p in steps)
        if steps else None,
        "teacher_s_mean": statistics.fmean(p["teacher_s"] for p in steps) if steps else None,
        "gradient_s_mean": statistics.fmean(p["gradient_s"] for p in steps) if steps else None,
        "candidates_s_mean": statistics.fmean(p["candidates_s"] for p in steps) if steps else None,
        "candidate_tokens_per_s": sum(p["candidate_tokens"] for p in steps) / max(sum(p["candidates_s"] for p in steps), 1e-9)
        if steps else None,
        "suffix_ids": state.best_suffix, "start_ids": start, "draw": cfg.draw if cfg.mode == "random" else None,
        **(screen_settings(cfg.search) if cfg.mode == "search" else {}),
        **screen_summary(steps),
        **candidate_summary(steps),
        "vocabulary": cfg.search.vocabulary, "round_trip_required": cfg.search.round_trip,
        # what the ids read as (evaluation splices the ids), and whether typing that text gives them back
        "suffix_text": everywhere.text(state.best_suffix),
        "suffix_pieces": [everywhere.text([i]) for i in state.best_suffix],
        "suffix_round_trip": {"prompts": len(everywhere.questions), "round_trips": round_trips},
    }
    store.write_json(ctx.out("metrics.json"), metrics)
    return {k: v for k, v in metrics.items() if not k.startswith("suffix_")}


RANDOM_STREAM = 170  # the random-suffix null's stream: apart from the GCG starts, which use the seed itself


def start_seed(cfg: Config) -> int:
    """Where the suffix is drawn from: the training seed for a GCG start, a stream of its own per null draw."""
    from shared.lm.generation import derived_seed

    return cfg.seed if cfg.mode == "search" else derived_seed(cfg.seed, RANDOM_STREAM, cfg.draw)


def screen_settings(search: GcgSettings) -> dict:
    """The candidate screen this search ran with (the report states it beside its measured agreement)."""
    return {"screen_on": search.screen_on, "screen_pairs": search.screen_pairs, "screen_keep": search.screen_keep,
            "screen_check_every": search.screen_check_every, "pairs_per_step": search.pairs_per_step,
            "search_width": search.search_width}


def candidate_summary(steps: list[dict]) -> dict:
    """How many sampled candidates the steps scored, dropped as duplicates or rejected as not text, and how often
    no candidate beat the current suffix."""
    if not steps:
        return {}
    sampled = sum(p["candidates_sampled"] for p in steps)
    return {"candidates_sampled": sampled,
            "candidates_duplicate_share": sum(p["candidates_duplicate"] for p in steps) / max(sampled, 1),
            "candidates_rejected_share": sum(p["candidates_rejected"] for p in steps) / max(sampled, 1),
            "steps_kept_current": sum(bool(p["kept_current"]) for p in steps)}


def screen_summary(steps: list[dict]) -> dict:
    """How often the candidate screen kept the full evaluation's best candidate, on the steps that checked it."""
    checked = [p for p in steps if p.get("screen_checked")]
    if not checked:
        return {"screen_checks": 0}
    return {"screen_checks": len(checked),
            "screen_agreement": statistics.fmean(float(p["screen_agreed"]) for p in checked),
            "screen_mean_rank": statistics.fmean(p["screen_rank"] for p in checked),
            "screen_mean_gap": statistics.fmean(p["screen_gap"] for p in checked)}


SPEC = StageSpec(
    name="gcg_search", config=Config, run=run, image_kind="gpu",
    resources=Resources(gpu_class="h100", gpus=1, cpu=8, memory="64Gi", timeout_s=72 * 3600),  # ~31 s/step, screen on (H200 bench)
    description="GCG over L system-slot (or user-suffix) token ids against fresh EM-teacher samples, or a random suffix.",
)
main = SPEC.main

if __name__ == "__main__":
    main()
