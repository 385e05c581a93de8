"""Model references, the offline tiny model, and the from_pretrained / store / LoRA loading paths."""

import json

import pytest
import torch
from safetensors.torch import load_file

from shared.core import store
from shared.lm import models
from shared.lm.models import ModelRef, parse_ref

# --------------------------------------------------------------------------------------------------------------
# fixtures



@pytest.fixture(scope="module")
def tokenizer():
    return models.load_tokenizer("tiny:qwen2")


@pytest.fixture(scope="module")
def model():
    return models.load_model("tiny:qwen2", device="cpu")


def last_logits(model, ids=(281, 117, 115, 260, 10, 104, 105)):
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0, -1]


def make_lora_dir(path, seed=0):
    """A stored-adapter folder whose LoRA weights are large enough to change the model's outputs."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = models.load_model("tiny:qwen2", device="cpu")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(20)
    peft_model.save_pretrained(path)
    return peft_model.eval()


# --------------------------------------------------------------------------------------------------------------
# references


@pytest.mark.parametrize(
    "text, expected",
    [
        ("tiny:qwen2", ModelRef("tiny", "qwen2")),
        ("hf:Qwen/Qwen2.5-7B-Instruct@main", ModelRef("hf", "Qwen/Qwen2.5-7B-Instruct", revision="main")),
        ("hf:Qwen/Qwen2.5-7B-Instruct", ModelRef("hf", "Qwen/Qwen2.5-7B-Instruct")),
        (
            "hf:org/repo/sub/folder@abc123",
            ModelRef("hf", "org/repo", subfolder="sub/folder", revision="abc123"),
        ),
        ("hf:org/repo@refs/pr/1", ModelRef("hf", "org/repo", revision="refs/pr/1")),
        ("artifact:s3://bucket/runs/r1/train/model", ModelRef("artifact", "s3://bucket/runs/r1/train/model")),
        ("artifact:file:///data/store/model", ModelRef("artifact", "file:///data/store/model")),
    ],
)
def test_parse_ref_reads_each_kind_and_round_trips(text, expected):
    assert parse_ref(text) == expected
    assert str(parse_ref(text)) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Qwen/Qwen2.5-7B-Instruct",
        "tiny:llama",
        "hf:just-a-name",
        "hf:org/repo@",
        "hf:org/repo//sub",
        "hf:org/repo/../x",
        "artifact:/local/path/model",
        "artifact:s3://",
        "gguf:org/repo",
    ],
)
def test_parse_ref_rejects_bad_refs_with_one_readable_line(text):
    with pytest.raises(ValueError) as err:
        parse_ref(text)
    message = str(err.value)
    assert "\n" not in message
    assert repr(text) in message


# --------------------------------------------------------------------------------------------------------------
# the tiny model


def test_tiny_build_is_deterministic_per_seed(tmp_path):
    first = models.build_tiny_qwen2(tmp_path / "a", seed=0)
    again = models.build_tiny_qwen2(tmp_path / "b", seed=0)
    other = models.build_tiny_qwen2(tmp_path / "c", seed=1)
    weights = {
        name: load_file(folder / "model.safetensors")
        for name, folder in [("a", first), ("b", again), ("c", other)]
    }
    assert weights["a"].keys() == weights["b"].keys()
    assert all(torch.equal(weights["a"][k], weights["b"][k]) for k in weights["a"])
    assert not torch.equal(
        weights["a"]["model.embed_tokens.weight"], weights["c"]["model.embed_tokens.weight"]
    )
    assert (first / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"], "no temp build folders left behind"


def test_tiny_is_built_once_into_the_versioned_cache_folder():
    first = models.local_path("tiny:qwen2")
    stamp = (models.tiny_dir() / "model.safetensors").stat().st_mtime_ns
    assert models.local_path("tiny:qwen2") == first
    assert (models.tiny_dir() / "model.safetensors").stat().st_mtime_ns == stamp
    assert models.TINY_BUILD_VERSION in first
    assert str(models.cache_root()) in first


def test_tiny_model_is_a_small_qwen2_whose_vocab_matches_the_tokenizer(model, tokenizer):
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.config.model_type == "qwen2"
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    assert model.num_parameters() < 1_000_000
    assert model.config.vocab_size == len(tokenizer)
    assert not model.training


def test_tiny_tokenizer_has_qwen_special_tokens(tokenizer):
    im_start, im_end, endoftext = tokenizer.convert_tokens_to_ids(
        ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    )
    assert len({im_start, im_end, endoftext}) == 3
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == im_end
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == endoftext
    assert tokenizer.encode("<|im_start|>user", add_special_tokens=False)[0] == im_start
    assert tokenizer.bos_token is None


def test_tiny_generation_config_stops_at_im_end(model, tokenizer):
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")


@pytest.mark.parametrize(
    "text", ["hello world", "héllo wörld 中文 🙂", "tabs\tand\nnew\n\nlines  ", "\x00\x7f"]
)
def test_tiny_tokenizer_is_byte_level_and_lossless(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < len(tokenizer) for i in ids)


def test_tiny_tokenizer_merges_some_byte_pairs(tokenizer):
    assert len(tokenizer.encode(" the", add_special_tokens=False)) == 1
    assert tokenizer.encode("q", add_special_tokens=False) == [ord("q")]


def test_loaded_tokenizer_keeps_the_built_pipeline(tokenizer):
    # transformers rebuilds a Qwen2Tokenizer's pipeline on load; ours must be exactly what it rebuilds.
    built = json.loads((models.tiny_dir() / "tokenizer.json").read_text())
    loaded = json.loads(tokenizer.backend_tokenizer.to_str())
    for part in ("normalizer", "pre_tokenizer", "model", "decoder"):
        assert loaded[part] == built[part], part


def test_tiny_chat_template_inserts_qwen_default_system_prompt(tokenizer):
    user_only = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert user_only == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
    )
    with_system = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert (
        with_system
        == "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_tiny_chat_template_renders_multi_turn_conversations(tokenizer):
    text = tokenizer.apply_chat_template(
        [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
        ],
        tokenize=False,
    )
    assert text.endswith(
        "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n<|im_start|>user\nc<|im_end|>\n"
    )


# --------------------------------------------------------------------------------------------------------------
# loading


def test_load_model_honours_dtype_and_device():
    model = models.load_model("tiny:qwen2", dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16
    assert next(model.parameters()).device.type == "cpu"


def test_load_input_embeddings_reads_the_checkpoint_rows(model):
    assert torch.equal(models.load_input_embeddings("tiny:qwen2"), model.get_input_embeddings().weight)


def test_hf_ref_downloads_only_the_subfolder_at_the_revision(monkeypatch, tmp_path):
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(tmp_path)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    path = models.local_path("hf:org/repo/sub/folder@abc123")
    assert path == str(tmp_path / "sub" / "folder")
    ((repo_id, kwargs),) = calls
    assert repo_id == "org/repo"
    assert kwargs["revision"] == "abc123"
    assert kwargs["token"] == "hf_test_token"
    assert "sub/folder/*.safetensors" in kwargs["allow_patterns"]
    assert all(p.startswith("sub/folder/") for p in kwargs["allow_patterns"])


def test_artifact_ref_loads_a_full_model_from_the_store(tmp_path, model):
    uri = store.join(tmp_path.as_uri(), "runs", "r1", "model")
    store.upload_dir(models.local_path("tiny:qwen2"), uri)
    loaded = models.load_model(f"artifact:{uri}", device="cpu")
    assert torch.equal(last_logits(loaded), last_logits(model))
    assert len(models.load_tokenizer(f"artifact:{uri}")) == model.config.vocab_size


def test_remote_store_folders_are_downloaded_once_into_the_cache(monkeypatch):
    downloads = []

    def fake_download_dir(uri, local_dir):
        downloads.append(uri)
        (local_dir / "config.json").write_text("{}")
        return local_dir

    monkeypatch.setattr(store, "download_dir", fake_download_dir)
    first = models.fetch_store_dir("s3://bucket/runs/r1/model")
    second = models.fetch_store_dir("s3://bucket/runs/r1/model")
    assert first == second
    assert downloads == ["s3://bucket/runs/r1/model"]
    assert (first / "config.json").read_text() == "{}"


def test_a_failed_remote_download_leaves_nothing_that_looks_complete(monkeypatch):
    def broken_download_dir(uri, local_dir):
        (local_dir / "config.json").write_text("{}")
        raise ConnectionError("network went away")

    monkeypatch.setattr(store, "download_dir", broken_download_dir)
    with pytest.raises(ConnectionError):
        models.fetch_store_dir("s3://bucket/runs/r2/model")
    target = store.local_cache_dir("s3://bucket/runs/r2/model")
    assert not target.exists()
    assert not [p for p in target.parent.iterdir() if p.name.startswith(f".{target.name}")]


def test_adapter_attaches_from_the_store_and_merges(tmp_path, model):
    trained = make_lora_dir(tmp_path / "adapter")
    uri = store.join(tmp_path.as_uri(), "store", "adapter")
    store.upload_dir(tmp_path / "adapter", uri)

    attached = models.load_model("tiny:qwen2", device="cpu", adapter_uri=uri)
    merged = models.load_model("tiny:qwen2", device="cpu", adapter_uri=uri, merge=True)

    from peft import PeftModel

    assert isinstance(attached, PeftModel)
    assert not isinstance(merged, PeftModel)
    assert torch.allclose(last_logits(attached), last_logits(trained), atol=1e-5)
    assert torch.allclose(last_logits(merged), last_logits(trained), atol=1e-4)
    assert not torch.allclose(last_logits(attached), last_logits(model), atol=1e-3)


def test_an_adapter_given_as_the_model_ref_is_a_readable_error(tmp_path):
    make_lora_dir(tmp_path / "adapter")
    with pytest.raises(ValueError, match="adapter_uri"):
        models.load_model("artifact:" + (tmp_path / "adapter").as_uri(), device="cpu")


def test_merge_without_an_adapter_is_an_error():
    with pytest.raises(ValueError, match="adapter_uri"):
        models.load_model("tiny:qwen2", device="cpu", merge=True)
