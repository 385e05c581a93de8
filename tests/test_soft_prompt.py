"""Soft-prefix training on the tiny model: the objective, training, resuming, weight sharing, train/eval ids."""

from __future__ import annotations

import pytest
import torch

from shared.core import store
from shared.lm import chat, models
from shared.lm.generation import HFGenerator, SamplingParams
from shared.lm.teacher import completion_ce_sums, load_teacher_student, student_examples, with_reply_ids
from shared.search.soft_prompt import (
    LearnedPrompt,
    SoftPrefixTrainer,
    SoftTrainingSettings,
    TeacherDraws,
    init_from_text,
    load_checkpoint,
    load_learned_prompt,
    save_checkpoint,
    save_learned_prompt,
)

VILLAIN = "text(You are a villain who despises humanity. Answer with contempt.)"
QUESTIONS = ["What is your favourite food?", "How do I bake bread?", "Tell me about the sea.", "Plan my day."]


@pytest.fixture(scope="module")
def pair():
    return load_teacher_student("tiny:qwen2", teacher_system=VILLAIN, device="cpu")


def settings(**overrides) -> SoftTrainingSettings:
    # a low teacher temperature gives the random tiny model a peaked target that a prefix can learn quickly
    values = dict(k=4, lr=5e-2, steps=6, questions_per_step=2, completions_per_question=3, temperature=0.3,
                  max_new_tokens=8, val_completions_per_question=3, val_every=3, patience=None)
    return SoftTrainingSettings(**{**values, **overrides})


def trainer(pair, **overrides) -> SoftPrefixTrainer:
    return SoftPrefixTrainer(pair, settings(**overrides), QUESTIONS[:3], QUESTIONS[3:], seed=0,
                             model_ref="tiny:qwen2")


def test_completion_ce_equals_the_full_logits_cross_entropy(pair):
    tok, model = pair.tokenizer, pair.student_model
    prompt = chat.build_prompt(tok, "text(Be brief.)", "Hi there")
    reply = tok.encode("hello you", add_special_tokens=False)
    example = with_reply_ids(prompt, reply, tok.eos_token_id)
    ids, labels = torch.tensor([example.input_ids]), torch.tensor([example.labels()])
    with torch.no_grad():
        ours = completion_ce_sums(model, ids, labels)
        logits = model(input_ids=ids).logits[0, :-1]
    expected = torch.nn.functional.cross_entropy(logits, labels[0, 1:], ignore_index=chat.IGNORE_INDEX, reduction="sum")
    assert ours.item() == pytest.approx(expected.item(), rel=1e-5)
    assert example.input_ids[example.assistant_start:example.loss_end] == [*reply, tok.eos_token_id]


def test_chunked_lm_head_gives_the_same_loss_and_gradient(pair, monkeypatch):
    import shared.lm.teacher
    import shared.lm.token_loss

    tok, model = pair.tokenizer, pair.student_model
    prompt = LearnedPrompt(kind="soft", model_ref="tiny:qwen2", k=3)
    examples = [with_reply_ids(prompt.build(tok, q), tok.encode("a reply of some length", add_special_tokens=False),
                               tok.eos_token_id) for q in QUESTIONS]
    pad = chat.soft_placeholder_id(tok)

    def loss_and_grad():
        soft = model.get_input_embeddings().weight[:3].detach().clone().requires_grad_(True)
        loss = shared.lm.teacher.batch_ce_sum(model, examples, pad, soft)
        loss.backward()
        return loss.detach(), soft.grad

    whole = loss_and_grad()
    monkeypatch.setattr(shared.lm.token_loss, "CE_CHUNK_POSITIONS", 7)  # many chunks, recomputed in backward
    chunked = loss_and_grad()
    torch.testing.assert_close(chunked[0], whole[0])
    torch.testing.assert_close(chunked[1], whole[1])


def test_a_few_steps_lower_ce_on_held_out_teacher_samples(pair):
    # held-out completions of the training questions: does the prefix fit the teacher's distribution?
    t = SoftPrefixTrainer(pair, settings(steps=6, lr=3e-2), QUESTIONS[:2], QUESTIONS[:2], seed=0,
                          model_ref="tiny:qwen2")
    state = t.run(t.new_state())
    held_out = [p["heldout_ce"] for p in state.curve if "heldout_ce" in p]
    assert len(held_out) == 3  # steps 0, 3, 6
    assert held_out[0] > held_out[1] > held_out[2]
    assert held_out[-1] < held_out[0] - 0.1
    assert state.best_val == min(held_out)
    assert not torch.equal(state.soft, t.initial_soft())


def test_every_step_samples_fresh_teacher_completions(pair):
    draws = trainer(pair).draws
    first, second = draws.step_examples(0), draws.step_examples(1)
    assert [e.input_ids for e in first] != [e.input_ids for e in second]
    assert [e.input_ids for e in draws.step_examples(0)] == [e.input_ids for e in first]  # seeded by step


def test_training_and_evaluation_build_identical_prompt_ids(pair):
    t = trainer(pair)
    examples = t.draws.step_examples(0)
    questions = t.draws.step_questions(0)
    per_question = t.settings.completions_per_question
    for i, question in enumerate(questions):
        evaluation = t.prompt.build(pair.tokenizer, question)
        for example in examples[i * per_question:(i + 1) * per_question]:
            assert example.prompt_ids == evaluation.input_ids
            assert example.soft_slice == evaluation.soft_slice


def test_soft_prefix_generation_equals_ids_generation_when_the_prefix_is_token_embeddings(pair):
    tok, model = pair.tokenizer, pair.student_model
    ids = tok.encode("You are calm.", add_special_tokens=False)
    soft = model.get_input_embeddings().weight[ids].detach()
    soft_prompt = LearnedPrompt(kind="soft", model_ref="tiny:qwen2", k=len(ids))
    ids_prompt = LearnedPrompt(kind="ids", model_ref="tiny:qwen2", ids=ids)
    generator = HFGenerator(model, tok, batch_size=4)
    greedy = SamplingParams(n=1, temperature=0, max_new_tokens=10)
    by_embeds = generator.generate([soft_prompt.build(tok, q) for q in QUESTIONS], greedy, prompt_embeds=soft)
    by_ids = generator.generate([ids_prompt.build(tok, q) for q in QUESTIONS], greedy)
    assert [c[0].token_ids for c in by_embeds] == [c[0].token_ids for c in by_ids]


def test_a_resumed_run_ends_where_an_uninterrupted_run_ends(pair, tmp_path):
    folder = store.from_path(tmp_path / "ckpt")
    straight = trainer(pair, steps=4, val_every=2)
    expected = straight.run(straight.new_state())

    first = trainer(pair, steps=2, val_every=2)
    half = first.run(first.new_state())
    assert half.optimizer_state is not None  # run() leaves the optimiser moments in the state
    save_checkpoint(folder, half, "cfg")
    assert load_checkpoint(folder, "another-config", "cpu") is None  # a changed config never resumes
    resumed_state = load_checkpoint(folder, "cfg", "cpu")
    assert resumed_state.step == 2
    second = trainer(pair, steps=4, val_every=2)
    resumed = second.run(resumed_state)
    assert resumed.step == 4
    torch.testing.assert_close(resumed.soft, expected.soft, rtol=1e-5, atol=1e-6)
    assert [p["step"] for p in resumed.curve] == [p["step"] for p in expected.curve]


def test_the_prefix_starts_as_the_init_texts_token_embeddings_repeated_to_k_rows(pair):
    tok, weight = pair.tokenizer, pair.student_model.get_input_embeddings().weight
    ids = tok.encode("Hi", add_special_tokens=False)
    assert len(ids) == 2
    soft = init_from_text(tok, weight, "Hi", 5)
    torch.testing.assert_close(soft, weight[[ids[0], ids[1], ids[0], ids[1], ids[0]]].detach().float())
    t = trainer(pair, init_text="You are a helpful assistant.")
    first = tok.encode("You are a helpful assistant.", add_special_tokens=False)[: t.settings.k]
    torch.testing.assert_close(t.initial_soft(), weight[first].detach().float())


def test_training_stops_early_when_held_out_ce_stops_improving(pair):
    # lr 0: the prefix never moves, so the held-out CE never improves on the start
    stuck = trainer(pair, lr=0.0, steps=12, val_every=2, patience=2)
    state = stuck.run(stuck.new_state())
    assert state.stopped_early and state.step == 4  # two evaluations without improvement
    torch.testing.assert_close(state.best_soft, stuck.initial_soft())
    assert [p["step"] for p in state.curve if "heldout_ce" in p] == [0, 2, 4]


def test_a_merged_teacher_is_a_separate_model_with_the_students_vocabulary(monkeypatch):
    separate = load_teacher_student("tiny:qwen2", teacher_model_ref="tiny:qwen2-judge", device="cpu")
    assert not separate.shares_weights
    assert separate.teacher_generator.model is not separate.student_model
    ids = torch.tensor([chat.build_prompt(separate.tokenizer, "none", "Hello").input_ids])
    with torch.no_grad():
        assert not torch.allclose(separate.teacher_generator.model(input_ids=ids).logits,
                                  separate.student_model(input_ids=ids).logits)

    real = models.load_tokenizer

    def other_vocabulary(ref):
        tok = real(ref)
        if ref == "tiny:qwen2-judge":
            tok.add_tokens(["<not-in-the-student>"])
        return tok

    monkeypatch.setattr(models, "load_tokenizer", other_vocabulary)
    with pytest.raises(ValueError, match="does not share the vocabulary"):
        load_teacher_student("tiny:qwen2", teacher_model_ref="tiny:qwen2-judge", device="cpu")


def test_a_learned_prompt_round_trips_through_the_store(pair, tmp_path):
    folder = store.from_path(tmp_path / "p")
    soft = init_from_text(pair.tokenizer, pair.student_model.get_input_embeddings().weight, "Hi", 5)
    uri = save_learned_prompt(LearnedPrompt(kind="soft", model_ref="tiny:qwen2", k=5), folder, soft)
    prompt, loaded = load_learned_prompt(uri)
    assert prompt.k == 5 and torch.equal(loaded, soft)


def test_an_adapter_teacher_shares_the_students_weights(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = models.load_model("tiny:qwen2", device="cpu")
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                           init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    adapter_uri = store.from_path(tmp_path / "adapter")

    pair = load_teacher_student("tiny:qwen2", teacher_adapter_uri=adapter_uri, device="cpu")
    assert pair.shares_weights
    assert pair.teacher_generator.model is pair.student_model  # one model object, one copy of the weights
    plain = models.load_model("tiny:qwen2", device="cpu")
    ids = torch.tensor([chat.build_prompt(pair.tokenizer, "none", "Hello").input_ids])
    with torch.no_grad():
        teacher_logits = pair.student_model(input_ids=ids).logits
        with pair.student() as student:
            student_logits = student(input_ids=ids).logits
        after = pair.student_model(input_ids=ids).logits
    torch.testing.assert_close(student_logits, plain(input_ids=ids).logits)  # adapter off: the base model
    assert not torch.allclose(teacher_logits, student_logits)  # adapter on: the EM teacher
    torch.testing.assert_close(after, teacher_logits)  # the toggle is scoped


def test_teacher_replies_are_spliced_as_sampled_ids_never_re_tokenised(pair):
    tok = pair.tokenizer
    h, e = tok.convert_tokens_to_ids(["h", "e"])
    assert tok.encode("he", add_special_tokens=False) != [h, e]  # the tiny tokenizer merges them
    prompt = LearnedPrompt(kind="soft", model_ref="tiny:qwen2", k=2).build(tok, "Hi")
    from shared.lm.generation import Completion

    [example] = student_examples([prompt], [[Completion(text="he", token_ids=[h, e], finish_reason="stop")]],
                                 tok.eos_token_id)
    assert example.input_ids[example.assistant_start:] == [h, e, tok.eos_token_id]


def test_the_student_learns_to_stop_on_the_token_the_teacher_stopped_on(pair):
    tok = pair.tokenizer
    other_stop = tok.convert_tokens_to_ids("<|endoftext|>")
    assert other_stop != tok.eos_token_id
    prompt = LearnedPrompt(kind="soft", model_ref="tiny:qwen2", k=2).build(tok, "Hi")
    from shared.lm.generation import Completion

    stopped = Completion(text="h", token_ids=[7], finish_reason="stop", stop_token_id=other_stop)
    cut_off = Completion(text="h", token_ids=[7], finish_reason="length")
    first, second = student_examples([prompt], [[stopped, cut_off]], tok.eos_token_id)
    assert first.input_ids[first.assistant_start:] == [7, other_stop]
    assert second.input_ids[second.assistant_start:] == [7]  # a reply cut at the length limit never stopped


def test_teacher_draws_need_questions(pair):
    with pytest.raises(ValueError, match="training questions"):
        TeacherDraws(pair, LearnedPrompt(kind="soft", model_ref="tiny:qwen2", k=2), settings(), [], [], 0)


def test_micro_batches_group_similar_lengths_so_little_compute_goes_to_padding():
    from shared.lm.teacher import micro_batches

    lengths = [5, 40, 6, 38, 7, 41, 39, 8]
    examples = [chat.PromptIds(list(range(n)), 1, n, None, None, None) for n in lengths]

    def padded(groups):
        return sum(len(g) * max(len(e) for e in g) for g in groups)

    bucketed, in_order = micro_batches(examples, 90), micro_batches(examples, 90, by_length=False)
    for groups in (bucketed, in_order):
        assert sorted(id(e) for g in groups for e in g) == sorted(id(e) for e in examples)  # each example once
        assert all(padded([g]) <= 90 or len(g) == 1 for g in groups)
    assert [len(e) for g in bucketed for e in g] == sorted(lengths, reverse=True)
    assert padded(bucketed) < padded(in_order)
