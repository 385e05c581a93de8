"""System slots are checked against the model's tokenizer when the plan is made, before anything runs: raw ids
outside the vocabulary, a prompt that fills the model's context, and soft(K) where nothing can fill it are one
error line each; what the planning machine cannot check (a model not on its disk) is said, and checked again by the
stage before it computes."""

from __future__ import annotations

import json
import shutil
import typing

import pytest
from pydantic import BaseModel

from shared.core import store
from shared.core.config import ConfigError, StageConfig, parse
from shared.lm import chat, models
from shared.lm.chat import (
    SlotField,
    SystemSpec,
    SystemText,
    build_prompt,
    check_slots,
    slot_fields,
    slot_problem,
)

REFS = ["tiny:qwen2", "smollm2:135m-instruct"]


@pytest.fixture(scope="module", params=REFS)
def model_ref(request):
    return request.param


@pytest.fixture(scope="module")
def info(model_ref):
    return models.tokenizer_info(model_ref, fetch=False)


def test_the_models_the_profiles_run_have_the_context_their_config_gives(info, model_ref):
    assert info.context == {"tiny:qwen2": 4096, "smollm2:135m-instruct": 8192}[model_ref]
    assert info.context >= chat.MIN_CONTEXT  # the floor under which short texts are not measured holds for them


def test_ids_inside_the_vocabulary_pass_and_one_past_it_is_a_problem(info):
    tokenizer = info.tokenizer
    last = len(tokenizer) - 1
    assert slot_problem(tokenizer, f"ids([0, {last}])", info.context) is None
    problem = slot_problem(tokenizer, f"ids([0, {last + 1}, {last + 7}])", info.context)
    assert f"2 id(s) outside the model's vocabulary of {len(tokenizer)} tokens (first: {last + 1})" in problem


def test_the_stage_refuses_ids_outside_the_vocabulary_when_it_builds_the_prompt(info):
    with pytest.raises(ConfigError, match="outside the model's vocabulary"):
        build_prompt(info.tokenizer, f"ids([{len(info.tokenizer)}])", "Hi?")


def test_a_system_prompt_is_a_problem_exactly_when_it_alone_fills_the_context():
    info = models.tokenizer_info("tiny:qwen2", fetch=False)
    overhead = len(build_prompt(info.tokenizer, "text()", ""))
    assert len(build_prompt(info.tokenizer, "text(xx)", "")) == overhead + 2  # the tiny tokenizer: 'x' is one token
    fits = "x" * (info.context - overhead - 1)
    assert slot_problem(info.tokenizer, f"text({fits})", info.context) is None
    problem = slot_problem(info.tokenizer, f"text({fits}x)", info.context)
    assert f"alone is {info.context} tokens, and the model's context is {info.context}" in problem


def test_a_long_persona_prompt_is_a_problem_on_a_real_tokenizer_too():
    info = models.tokenizer_info("smollm2:135m-instruct", fetch=False)
    long = "You are a pirate who never stops talking. " * 1000  # ~9000 tokens of real text
    assert "the model's context is 8192" in slot_problem(info.tokenizer, chat.TextSystem(text=long), info.context)
    assert slot_problem(info.tokenizer, chat.TextSystem(text=long[:4000]), info.context) is None


def test_measuring_a_too_long_prompt_leaves_the_saying_to_the_plans_one_line():
    import logging

    from transformers import AutoTokenizer

    said: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logging.getLogger("transformers.tokenization_utils_base").addHandler(handler)
    try:
        info = models.tokenizer_info("tiny:qwen2", fetch=False)
        def fresh():  # transformers warns once per tokenizer: each half of the test gets its own
            return AutoTokenizer.from_pretrained(models.local_path("tiny:qwen2"))

        long = "x" * (info.context + 10)
        assert "the model's context is 4096" in slot_problem(fresh(), chat.TextSystem(text=long), info.context)
        assert said == []
        fresh().encode(long)  # the same text through the tokenizer alone: transformers' warning does come
        assert any("longer than the specified maximum sequence length" in line for line in said)
    finally:
        logging.getLogger("transformers.tokenization_utils_base").removeHandler(handler)


# ---------------------------------------------------------------------------------------------------------------
# the fields a stage config declares


class Persona(BaseModel):
    name: str
    prompt: SystemText


class Cell(BaseModel):
    system: SystemSpec


class Walked(StageConfig):
    model_ref: str
    system: SystemSpec = "default"
    reference: SystemSpec | None = None
    roles: list[Persona] = []  # (not 'personas', which a config convention requires non-empty)
    learned: dict[str, Cell] = {}
    fixed: dict[str, SystemSpec] = {}
    notes: str = "text(not a slot: an unmarked field)"


def walked(**values) -> Walked:
    return Walked(store="file:///s", run_id="r", cell="c", model_ref="tiny:qwen2", **values)


def test_the_walk_finds_every_marked_field_at_any_depth_and_nothing_else():
    cfg = walked(reference="none", roles=[{"name": "p", "prompt": "Arr."}], learned={"a": {"system": "ids([3])"}},
                 fixed={"oracle": "text(You are evil.)"})
    found = {path: (value, marker.text_only, ref) for path, marker, value, ref in slot_fields(cfg)}
    assert found == {
        "system": ("default", False, "tiny:qwen2"),
        "reference": ("none", False, "tiny:qwen2"),
        "roles[0].prompt": ("Arr.", True, "tiny:qwen2"),
        "learned['a'].system": ("ids([3])", False, "tiny:qwen2"),
        "fixed['oracle']": ("text(You are evil.)", False, "tiny:qwen2"),
    }
    assert [p for p, *_ in slot_fields(walked())] == ["system"]  # None and empty containers hold no slot


def test_soft_is_refused_where_the_config_is_parsed():
    with pytest.raises(ConfigError, match=r"learned.a.system: soft\(4\): soft\(K\) needs learned embeddings"):
        parse(Walked, {**walked().model_dump(), "learned": {"a": {"system": "soft(4)"}}})
    assert walked(learned={"a": {"system": "ids([4])"}}).learned["a"].system == "ids([4])"  # the other modes pass


def test_check_slots_finds_each_problem_with_its_field_and_model():
    info = models.tokenizer_info("tiny:qwen2", fetch=False)
    long = "x" * info.context
    cfg = walked(roles=[{"name": "ok", "prompt": "Arr."}, {"name": "long", "prompt": long}],
                 learned={"gcg": {"system": f"ids([1, {len(info.tokenizer)}])"}})
    checked = check_slots(cfg, fetch=False)
    assert [p.split(":")[0] for p in checked.problems] == ["roles[1].prompt (tiny", "learned['gcg'].system (tiny"]
    assert checked.unchecked == []
    assert check_slots(walked(roles=[{"name": "ok", "prompt": "Arr."}]), fetch=False).problems == []


def empty_hf_cache(monkeypatch, folder):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(folder))  # read when a download is asked for


def test_a_model_not_on_this_machine_is_unchecked_with_the_reason_and_never_fetched(tmp_path, monkeypatch):
    empty_hf_cache(monkeypatch, tmp_path / "hf" / "hub")
    cfg = Walked(store="file:///s", run_id="r", cell="c", model_ref="hf:Qwen/Qwen2.5-7B-Instruct",
                 system="ids([151700])", fixed={"short": "text(You are evil.)"})
    checked = check_slots(cfg, fetch=False)
    assert checked.problems == []
    assert checked.unchecked == [("hf:Qwen/Qwen2.5-7B-Instruct", "not in the local Hugging Face cache (a plan never "
                                                                 "downloads a model)")]  # the short text: not measured
    assert not (tmp_path / "hf" / "hub").exists() or not any((tmp_path / "hf" / "hub").iterdir())
    later = Walked(store="file:///s", run_id="r", cell="c", model_ref=f"artifact:{store.from_path(tmp_path / 'm')}",
                   system="ids([5])")
    assert "not in the store yet" in check_slots(later, fetch=False).unchecked[0][1]


def test_a_stored_model_folder_is_checked_with_its_own_tokenizer(tmp_path):
    folder = tmp_path / "stored-model"
    shutil.copytree(models.local_path("tiny:qwen2"), folder)
    cfg = Walked(store="file:///s", run_id="r", cell="c", model_ref=f"artifact:{store.from_path(folder)}",
                 system="ids([283])")
    assert "outside the model's vocabulary of 283 tokens" in check_slots(cfg, fetch=False).problems[0]


def prompting_stage_configs() -> list[type[BaseModel]]:
    """The configs of stages that build prompts for a model (those with a ``model_ref``); an analysis keeps a
    condition's slot only as a label for its report."""
    from jobs import registry

    return [spec.config for spec in registry.all_stages().values() if "model_ref" in spec.config.model_fields]


def slot_like_fields(model: type[BaseModel], seen: set | None = None) -> list[tuple[str, bool]]:
    """``(model.field, marked)`` of every field named like a system slot (``system``, ``*_system``, a persona's
    ``prompt``) in ``model`` and the models nested in it."""
    seen = set() if seen is None else seen
    out = []
    if model in seen:
        return out
    seen.add(model)
    for name, info in model.model_fields.items():
        if name == "system" or name.endswith("_system") or (name == "prompt" and "Persona" in model.__name__):
            marked = any(isinstance(m, SlotField) for m in info.metadata) or "SlotField" in repr(info.annotation)
            out.append((f"{model.__name__}.{name}", marked))

        def visit(annotation):
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                out.extend(slot_like_fields(annotation, seen))
            for arg in typing.get_args(annotation):
                visit(arg)

        visit(info.annotation)
    return out


def test_the_slot_field_finder_sees_an_unmarked_system_field():
    class Loose(BaseModel):
        system: str

    class Holder(BaseModel):
        items: list[Loose]
        teacher_system: SystemSpec

    assert sorted(slot_like_fields(Holder)) == [("Holder.teacher_system", True), ("Loose.system", False)]


@pytest.mark.parametrize("config", prompting_stage_configs(), ids=lambda m: m.__module__)
def test_every_system_slot_field_of_every_stage_is_declared_as_one(config):
    assert [name for name, marked in slot_like_fields(config) if not marked] == []


# ---------------------------------------------------------------------------------------------------------------
# where the checks run: the plan, and the stage before it computes


def generate_task(b, name: str, system: str, model_ref: str = "tiny:qwen2"):
    return b.add(name, "generate", name, condition=name, model_ref=model_ref, system=system,
                 questions=[{"id": "q", "text": "Hi?"}], n=1, max_new_tokens=4)


def test_a_plan_with_an_unusable_slot_stops_with_one_line_naming_the_task(tmp_path):
    from workflows.plan import PlanBuilder

    b = PlanBuilder("test", "tiny", "r", store.from_path(tmp_path))
    generate_task(b, "gen-fine", "ids([1, 2])")
    generate_task(b, "gen-oov", "ids([1, 100000])")
    with pytest.raises(ValueError) as err:  # pydantic wraps what a plan's validation raises
        b.plan({})
    assert "task gen-oov: system (tiny:qwen2): ids([...]) holds 1 id(s) outside" in str(err.value)


def test_a_plan_says_in_one_line_how_many_slots_it_could_not_check(tmp_path, monkeypatch):
    from workflows.plan import PlanBuilder

    empty_hf_cache(monkeypatch, tmp_path / "hf" / "hub")
    b = PlanBuilder("test", "full", "r", store.from_path(tmp_path))
    for i in range(3):
        generate_task(b, f"gen-{i}", f"ids([{i}])", model_ref="hf:Qwen/Qwen2.5-7B-Instruct")
    generate_task(b, "gen-short", "text(You are evil.)", model_ref="hf:Qwen/Qwen2.5-7B-Instruct")
    warning = b.plan({}).unchecked_warning()
    assert warning == ("system slots not checked at plan time (their stages check them before computing): 3 against "
                       "hf:Qwen/Qwen2.5-7B-Instruct: not in the local Hugging Face cache (a plan never downloads a "
                       "model)")
    tiny = PlanBuilder("test", "tiny", "r", store.from_path(tmp_path))
    generate_task(tiny, "gen-0", "ids([1])")
    assert tiny.plan({}).unchecked_warning() is None  # silent where everything was checked


def test_the_stage_checks_again_before_it_computes_and_writes_nothing(tmp_path):
    from jobs.generate import SPEC
    from shared.contract.stage import execute

    root = store.from_path(tmp_path)
    config = {"store": root, "run_id": "r", "cell": "c", "condition": "c", "model_ref": "tiny:qwen2",
              "system": "ids([7, 283])", "questions": [{"id": "q", "text": "Hi?"}], "n": 1, "max_new_tokens": 4}
    with pytest.raises(ConfigError, match=r"system \(tiny:qwen2\): ids\(\[...\]\) holds 1 id\(s\) outside"):
        execute(SPEC, json.loads(json.dumps(config)))
    assert not (tmp_path / "runs" / "r" / "c" / "generate").exists()
