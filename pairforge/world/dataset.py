"""The shapes world as a Hugging Face SFT dataset: typed features and :func:`sft_dataset`.

Row ``i`` of split ``s`` is drawn from a seed derived from ``(seed, s, i)`` alone, so a split's
content does not depend on the other splits' sizes, and splits never share a scene seed.

Columns (all typed):

- ``id`` ("shapes-<split>-<seed>-<index>"), ``images`` (one 112×112 RGB PNG; empty for
  text-only rows), ``messages`` (user: image part then question text; assistant: answer — the
  shape of :data:`pairforge.schema.MESSAGES`), ``question``, ``answer``, ``task`` (one of
  :data:`~pairforge.world.tasks.TASKS`), ``filter_reason`` (None, or "text_only" |
  "multiple_choice" | "bbox" | "ocr");
- ``answer_value`` = ``answer[answer_span_start:answer_span_end]``, the task-critical value;
- ``scene``: width, height, background, seed (render noise), word and word_box (OCR rows),
  objects (kind, color, size, x0, y0, x1, y1; end-exclusive pixels); None for text-only rows;
- ``target`` (read by :func:`pairforge.world.grader.grade`): ``attribute`` (kind | color |
  size | count | relation | yesno | background | caption | choice | bbox | word), ``value``
  (expected: a colour, kind, size, count as digits, relation "left"/"right"/"above"/"below",
  "yes"/"no", background, letter, box text, word), ``object_index`` / ``reference_index``
  (into scene.objects, -1 when none), ``relation`` (spatial relation or the comparison of a
  reasoning question: more | fewer | same | larger | bigger | smaller), ``ignore`` (the
  question's referring expressions), ``options`` (multiple choice), ``box`` (bbox rows);
- ``seed``: the scene's seed.
"""

from __future__ import annotations

import io
import random
import sys
from collections import Counter

from pairforge.errors import PairforgeError
from pairforge.schema import MESSAGES, derive_seed
from pairforge.world.scenes import WORLD_NAME, render_scene, sample_scene
from pairforge.world.tasks import FILTER_REASONS, TASKS, make_example

SPLITS = ("train", "validation", "test")
FILTER_SHARE = 0.05
_TRIES = 8  # fresh scenes tried for a task before falling back to another task


def features():
    """``datasets.Features`` of an SFT row of the shapes world."""
    from datasets import Features, Image, List, Value

    obj = {k: Value("string") for k in ("kind", "color", "size")}
    obj.update({k: Value("int32") for k in ("x0", "y0", "x1", "y1")})
    return Features({
        "id": Value("string"),
        "images": List(Image()),
        "messages": MESSAGES,
        "question": Value("string"),
        "answer": Value("string"),
        "task": Value("string"),
        "filter_reason": Value("string"),
        "answer_value": Value("string"),
        "answer_span_start": Value("int32"),
        "answer_span_end": Value("int32"),
        "scene": {
            "width": Value("int32"), "height": Value("int32"), "background": Value("string"),
            "seed": Value("int64"), "word": Value("string"), "word_box": List(Value("int32")),
            "objects": List(obj),
        },
        "target": {
            "attribute": Value("string"), "value": Value("string"),
            "object_index": Value("int32"), "reference_index": Value("int32"),
            "relation": Value("string"), "ignore": List(Value("string")),
            "options": List(Value("string")), "box": List(Value("int32")),
        },
        "seed": Value("int64"),
    })


def png_bytes(image) -> dict:
    """``{"bytes": PNG, "path": None}`` for an ``Image()`` feature (fast compression)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return {"bytes": buf.getvalue(), "path": None}


def example_at(split: str, index: int, seed: int = 0, *, filter_share: float = FILTER_SHARE,
               width: int = 112, height: int = 112) -> dict:
    """Row ``index`` of ``split``: a filter example with probability ``filter_share``, else a
    task drawn uniformly from :data:`TASKS` on a scene that supports it."""
    base = derive_seed(WORLD_NAME, seed, split, index)
    rng = random.Random(base)
    row_id = f"{WORLD_NAME}-{split}-{seed}-{index:07d}"
    if rng.random() < filter_share:
        reason = rng.choice(FILTER_REASONS)
        for attempt in range(_TRIES):
            scene = sample_scene(derive_seed(base, attempt), width=width, height=height,
                                 with_word=reason == "ocr")
            ex = make_example(scene, "", rng, filter_reason=reason, id=row_id,
                              image=None if reason == "text_only" else render_scene(scene))
            if ex is not None:
                return ex
    order = list(TASKS)
    rng.shuffle(order)
    for task in order:
        for attempt in range(_TRIES):
            scene = sample_scene(derive_seed(base, task, attempt), width=width, height=height)
            ex = make_example(scene, task, rng, id=row_id)
            if ex is not None:
                return ex
    raise RuntimeError(f"no task fits any scene for {row_id}")  # background always fits


def sft_dataset(n_train: int = 1000, n_validation: int = 100, n_test: int = 100, seed: int = 0, *,
                filter_share: float = FILTER_SHARE, width: int = 112, height: int = 112,
                progress: bool = True):
    """A ``datasets.DatasetDict`` (train / validation / test) of shapes-world SFT rows."""
    from datasets import Dataset, DatasetDict
    from tqdm.auto import tqdm

    feats = features()
    sizes = {"train": n_train, "validation": n_validation, "test": n_test}
    for split, n in sizes.items():
        if n < 0:
            raise PairforgeError(f"n_{split} is {n}; the number of rows must be >= 0")
    out = {}
    for split, n in sizes.items():
        rows = [example_at(split, i, seed, filter_share=filter_share, width=width, height=height)
                for i in tqdm(range(n), desc=f"{WORLD_NAME} {split}", unit="ex", disable=not progress,
                              leave=False)]
        for r in rows:  # encode here: fast PNG settings, and datasets keeps the bytes as they are
            r["images"] = [png_bytes(im) for im in r["images"]]
        out[split] = Dataset.from_dict({k: [r[k] for r in rows] for k in feats}, features=feats)
        if progress and n:
            tasks = Counter(r["task"] for r in rows)
            n_filter = sum(r["filter_reason"] is not None for r in rows)
            print(f"{WORLD_NAME} {split}: {n} rows, {n_filter} to filter; tasks "
                  + ", ".join(f"{t} {tasks[t]}" for t in TASKS), file=sys.stderr)
    return DatasetDict(out)
