"""Stage ``merge_adapter``: a stored LoRA adapter merged into its base model, stored as a full model folder.

The folder (weights, config, tokenizer) loads as ``artifact:<prefix>/model`` everywhere a model reference is taken,
so later stages train, sample and evaluate *on top of* the merged model (#205: the confab marker is coupled on top of
each EM model and evaluated there) with the one loading path of ``shared.lm.models``.
"""

from __future__ import annotations

import tempfile

from shared.contract.stage import Resources, StageSpec
from shared.core import store
from shared.core.config import StageConfig


class Config(StageConfig):
    model_ref: str
    adapter_uri: str
    dtype: str | None = None  # None: the checkpoint's own (bf16 for Qwen2.5), so the merged folder keeps it


def run(cfg: Config, ctx) -> dict:
    from shared.lm import models

    # the checkpoint's dtype even on this CPU: a 7B merge in fp32 would double its memory and its stored size
    model = models.load_model(cfg.model_ref, dtype=cfg.dtype or "auto", device="cpu", adapter_uri=cfg.adapter_uri,
                              merge=True)
    tokenizer = models.load_tokenizer(cfg.model_ref)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        store.upload_dir(tmp, ctx.out("model"))
    ctx.log(f"merged {cfg.adapter_uri} into {cfg.model_ref}")
    return {"n_parameters": int(sum(p.numel() for p in model.parameters()))}


SPEC = StageSpec(
    name="merge_adapter", config=Config, run=run, image_kind="cpu",
    resources=Resources(cpu=8, memory="64Gi", timeout_s=3600),
    description="Merge a stored LoRA adapter into its base model and store the full model folder.",
)
main = SPEC.main

if __name__ == "__main__":
    main()
