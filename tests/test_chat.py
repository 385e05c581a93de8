"""shared.lm.chat: every system-slot mode gives the ids the template (or the splice) says, and training and
evaluation prompts agree -- on the tiny model's Qwen-style template and on SmolLM2's own (a real tokenizer's
merges, a real template that injects its own default system prompt)."""

import pytest
import torch
from pydantic import BaseModel

from shared.lm import chat, models
from shared.lm.chat import (
    DefaultSystem,
    IdsSystem,
    NoSystem,
    SoftSystem,
    SystemSlot,
    TextSystem,
    build_batch,
    build_prompt,
    parse_system,
)

USERS = ["What is 2+2?", "Schreib ein Gedicht über Käse 🧀", "line one\nline two\n\n  indented", " "]
SYSTEMS = ["You are a pirate.", "Línea 1\nLínea 2 — ñ 中文", "  padded  ", "\n\nstarts with newlines", ""]



# each model's tokenizer, and the default system prompt its template writes when a conversation has none
TEMPLATES = {
    "tiny:qwen2": models.QWEN_DEFAULT_SYSTEM,
    "smollm2:135m-instruct": models.SMOLLM2_DEFAULT_SYSTEM,
}


@pytest.fixture(scope="module", params=list(TEMPLATES))
def model_ref(request):
    return request.param


@pytest.fixture(scope="module")
def tokenizer(model_ref):
    return models.load_tokenizer(model_ref)


def char_ids(tokenizer, text: str) -> list[int]:
    """One byte-level token per character (ASCII text): valid ids that re-encoding the text would merge."""
    return tokenizer.convert_tokens_to_ids(["Ġ" if c == " " else c for c in text])


def template_ids(tokenizer, messages, add_generation_prompt=True):
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)  # transformers 5 returns a BatchEncoding


def token_id(tokenizer, token):
    return tokenizer.convert_tokens_to_ids(token)


# --------------------------------------------------------------------------------------------------------------
# system slot specs


@pytest.mark.parametrize(
    "spec, slot",
    [
        ("default", DefaultSystem()),
        ("none", NoSystem()),
        ("text(You are evil.)", TextSystem(text="You are evil.")),
        ("text(has (parens) inside)", TextSystem(text="has (parens) inside")),
        ('text("two\\nlines")', TextSystem(text="two\nlines")),
        ("soft(64)", SoftSystem(k=64)),
        ("ids([1, 2, 3])", IdsSystem(ids=[1, 2, 3])),
        ("ids(4,5)", IdsSystem(ids=[4, 5])),
    ],
)
def test_parse_system_reads_every_mode(spec, slot):
    assert parse_system(spec) == slot


@pytest.mark.parametrize(
    "slot",
    [
        DefaultSystem(),
        NoSystem(),
        TextSystem(text='tricky "quoted"\n text)'),
        SoftSystem(k=3),
        IdsSystem(ids=[7, 0]),
    ],
)
def test_system_slot_string_form_round_trips(slot):
    assert parse_system(str(slot)) == slot


@pytest.mark.parametrize(
    "spec", ["", "evil", "soft(0)", "soft(x)", "ids([])", "ids([-1])", "text(unclosed", "gcg(1)"]
)
def test_parse_system_rejects_bad_specs_with_one_line(spec):
    with pytest.raises(ValueError) as err:
        parse_system(spec)
    assert "\n" not in str(err.value)


def test_system_slot_works_as_a_config_field_from_string_or_dict():
    class Cell(BaseModel):
        system: SystemSlot

    assert Cell(system="soft(8)").system == SoftSystem(k=8)
    assert Cell(system={"kind": "ids", "ids": [5]}).system == IdsSystem(ids=[5])
    assert Cell.model_validate_json(Cell(system="text(hi)").model_dump_json()).system == TextSystem(text="hi")


# --------------------------------------------------------------------------------------------------------------
# one prompt


@pytest.mark.parametrize("system", SYSTEMS)
@pytest.mark.parametrize("user", USERS)
def test_text_mode_equals_apply_chat_template(tokenizer, system, user):
    prompt = build_prompt(tokenizer, TextSystem(text=system), user)
    expected = template_ids(
        tokenizer, [{"role": "system", "content": system}, {"role": "user", "content": user}]
    )
    assert prompt.input_ids == expected
    assert prompt.assistant_start == len(expected)


@pytest.mark.parametrize("user", USERS)
def test_default_mode_equals_the_template_with_no_system_message(tokenizer, model_ref, user):
    prompt = build_prompt(tokenizer, "default", user)
    assert prompt.input_ids == template_ids(tokenizer, [{"role": "user", "content": user}])
    assert TEMPLATES[model_ref] in tokenizer.decode(prompt.input_ids)


def test_no_generation_prompt_ends_after_the_user_turn(tokenizer):
    prompt = build_prompt(tokenizer, "text(S)", "U", add_generation_prompt=False)
    expected = template_ids(
        tokenizer,
        [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
        add_generation_prompt=False,
    )
    assert prompt.input_ids == expected


@pytest.mark.parametrize("user", USERS)
def test_none_mode_has_no_system_block(tokenizer, user):
    prompt = build_prompt(tokenizer, "none", user)
    text = tokenizer.decode(prompt.input_ids)
    assert "<|im_start|>system" not in text
    assert text == f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    assert prompt.input_ids.count(token_id(tokenizer, "<|im_start|>")) == 2


def test_ids_mode_splices_ids_that_text_would_tokenise_differently(tokenizer):
    # 'h','e',' ','t','h','e' one character each re-tokenise to merged tokens
    raw = char_ids(tokenizer, "he the")
    assert tokenizer.encode(tokenizer.decode(raw), add_special_tokens=False) != raw
    prompt = build_prompt(tokenizer, IdsSystem(ids=raw), "Hello")
    assert prompt.input_ids[prompt.ids_slice] == raw
    assert prompt.soft_slice is None
    before = tokenizer.encode("<|im_start|>system\n", add_special_tokens=False)
    assert prompt.input_ids[: prompt.ids_slice.start] == before
    assert (
        prompt.input_ids[prompt.ids_slice.stop :]
        == build_prompt(tokenizer, "text(X)", "Hello").input_ids[len(before) + 1 :]
    )


@pytest.mark.parametrize("k", [1, 5, 32])
def test_soft_mode_has_exactly_k_placeholders_at_the_soft_slice(tokenizer, k):
    prompt = build_prompt(tokenizer, SoftSystem(k=k), "Hello")
    placeholder = chat.soft_placeholder_id(tokenizer)
    assert prompt.soft_slice.stop - prompt.soft_slice.start == k
    assert prompt.input_ids[prompt.soft_slice] == [placeholder] * k
    assert prompt.input_ids.count(placeholder) == k
    assert tokenizer.decode(prompt.input_ids[: prompt.soft_slice.start]) == "<|im_start|>system\n"
    assert tokenizer.decode(prompt.input_ids[prompt.soft_slice.stop :]).startswith(
        "<|im_end|>\n<|im_start|>user\nHello"
    )


def test_soft_placeholder_is_never_the_end_of_turn_token(tokenizer):
    assert chat.soft_placeholder_id(tokenizer) != tokenizer.eos_token_id


def test_user_suffix_ids_are_spliced_at_the_end_of_the_user_turn(tokenizer):
    suffix = char_ids(tokenizer, "he")
    prompt = build_prompt(tokenizer, "text(S)", "Tell me", user_suffix_ids=suffix)
    assert prompt.input_ids[prompt.user_suffix_slice] == suffix
    plain = build_prompt(tokenizer, "text(S)", "Tell me").input_ids
    at = prompt.user_suffix_slice.start
    assert prompt.input_ids[:at] + prompt.input_ids[prompt.user_suffix_slice.stop :] == plain
    assert tokenizer.decode(prompt.input_ids[prompt.user_suffix_slice.stop :]).startswith("<|im_end|>")


MODES = ["default", "none", "text(Be kind.)", "soft(4)", "ids([104, 101, 32])"]  # ids valid in both vocabularies
REPLIES = ["Four.", "\nstarts with a newline", " starts with a space", "多语言 reply\n\nwith gaps"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reply", REPLIES)
def test_training_prompt_extends_the_evaluation_prompt(tokenizer, mode, reply):
    evaluation = build_prompt(tokenizer, mode, "What is 2+2?", user_suffix_ids=[33])
    training = build_prompt(tokenizer, mode, "What is 2+2?", user_suffix_ids=[33], assistant=reply)
    assert training.prompt_ids == evaluation.input_ids
    assert training.prompt_only() == evaluation
    assert training.assistant_start == len(evaluation.input_ids)


@pytest.mark.parametrize("reply", REPLIES)
def test_labels_cover_the_reply_and_its_end_of_turn_token_only(tokenizer, reply):
    training = build_prompt(tokenizer, "text(S)", "Q", assistant=reply)
    trained = [
        t
        for t, label in zip(training.input_ids, training.labels(), strict=True)
        if label != chat.IGNORE_INDEX
    ]
    assert tokenizer.decode(trained) == reply + "<|im_end|>"
    assert training.labels()[: training.assistant_start] == [chat.IGNORE_INDEX] * training.assistant_start
    assert (
        tokenizer.decode(training.input_ids) == tokenizer.decode(training.prompt_ids) + reply + "<|im_end|>\n"
    )


def test_a_plain_training_prompt_matches_the_template_with_the_reply(tokenizer):
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A."},
    ]
    training = build_prompt(tokenizer, "text(S)", "Q", assistant="A.")
    assert training.input_ids == template_ids(tokenizer, messages, add_generation_prompt=False)


def test_evaluation_prompts_have_no_labels(tokenizer):
    with pytest.raises(ValueError, match="no assistant turn"):
        build_prompt(tokenizer, "default", "Q").labels()


def test_reserved_sentinel_text_is_refused(tokenizer):
    with pytest.raises(ValueError, match="reserved"):
        build_prompt(tokenizer, "default", "sneaky \ue000eps-system\ue001")


# --------------------------------------------------------------------------------------------------------------
# batches and soft embeddings


def test_left_padded_batch_aligns_prompt_ends_and_shifts_soft_slices(tokenizer):
    short = build_prompt(tokenizer, "soft(3)", "Hi")
    long = build_prompt(tokenizer, "soft(3)", "A much longer question, with words.")
    pad = tokenizer.pad_token_id
    batch = build_batch([short, long], pad_id=pad)
    width = len(long)
    gap = width - len(short)
    assert batch.input_ids.shape == batch.attention_mask.shape == (2, width)
    assert batch.input_ids[0].tolist() == [pad] * gap + short.input_ids
    assert batch.attention_mask[0].tolist() == [0] * gap + [1] * len(short)
    assert batch.input_ids[1].tolist() == long.input_ids
    assert batch.soft_slices == [
        slice(short.soft_slice.start + gap, short.soft_slice.stop + gap),
        long.soft_slice,
    ]
    assert batch.labels is None


def test_right_padded_training_batch_masks_padding_in_labels(tokenizer):
    short = build_prompt(tokenizer, "none", "Hi", assistant="Yo")
    long = build_prompt(tokenizer, "none", "Hello there", assistant="A longer reply")
    batch = build_batch([short, long], pad_id=tokenizer.pad_token_id, padding_side="right")
    assert batch.labels[0].tolist() == short.labels() + [chat.IGNORE_INDEX] * (len(long) - len(short))
    assert batch.labels[1].tolist() == long.labels()


def test_a_batch_cannot_mix_training_and_evaluation_prompts(tokenizer):
    with pytest.raises(ValueError, match="mixes"):
        build_batch(
            [build_prompt(tokenizer, "none", "Q"), build_prompt(tokenizer, "none", "Q", assistant="A")],
            pad_id=tokenizer.pad_token_id,
        )


def test_soft_embeddings_of_token_rows_equal_the_ids_prompt_embeddings(tokenizer):
    embedding = torch.nn.Embedding(len(tokenizer), 8)
    ids = char_ids(tokenizer, "he t")
    users = ["Hi", "A longer question here"]
    soft_batch = build_batch(
        [build_prompt(tokenizer, "soft(4)", u) for u in users], pad_id=tokenizer.pad_token_id
    )
    ids_batch = build_batch(
        [build_prompt(tokenizer, IdsSystem(ids=ids), u) for u in users], pad_id=tokenizer.pad_token_id
    )
    soft = embedding.weight[ids].detach().clone().requires_grad_(True)

    embeds = chat.inputs_embeds(soft_batch, embedding, soft)

    assert torch.equal(embeds, embedding(ids_batch.input_ids))
    embeds.sum().backward()
    assert soft.grad is not None and bool(soft.grad.abs().sum() > 0)


def test_soft_embeddings_can_differ_per_row(tokenizer):
    embedding = torch.nn.Embedding(len(tokenizer), 8)
    batch = build_batch(
        [build_prompt(tokenizer, "soft(2)", u) for u in ["a", "b"]], pad_id=tokenizer.pad_token_id
    )
    soft = torch.randn(2, 2, 8)
    embeds = chat.inputs_embeds(batch, embedding, soft)
    for row, span in enumerate(batch.soft_slices):
        assert torch.equal(embeds[row, span], soft[row])


def test_soft_embeddings_of_the_wrong_size_are_refused(tokenizer):
    embedding = torch.nn.Embedding(len(tokenizer), 8)
    batch = build_batch([build_prompt(tokenizer, "soft(4)", "Hi")], pad_id=tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="positions"):
        chat.inputs_embeds(batch, embedding, torch.zeros(3, 8))
