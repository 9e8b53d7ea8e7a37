"""The offline world: procedural shape scenes with ground truth, SFT examples across the ten
VaPR task categories, and a grader for any answer. ``--source shapes`` names it.

Imports only pairforge modules (plus PIL / numpy; ``datasets`` through pairforge.schema);
no torch.
"""

from pairforge.world.dataset import derive_seed, example_at, features, sft_dataset
from pairforge.world.defaults import default_clip, default_vlm, scenes
from pairforge.world.grader import GRADES, caption_credit, grade, iou
from pairforge.world.scenes import (
    BACKGROUNDS, COLORS, KINDS, OCR_WORDS, PLURALS, SIZES, WORLD_NAME, Obj, Scene, colors_for,
    render_scene, sample_scene,
)
from pairforge.world.tasks import (
    FILTER_REASONS, NUMBER_WORDS, RELATIONS, TASKS, make_example, make_examples, tokenize,
    vocabulary,
)

__all__ = [
    "BACKGROUNDS", "COLORS", "FILTER_REASONS", "GRADES", "KINDS", "NUMBER_WORDS", "OCR_WORDS",
    "Obj", "PLURALS", "RELATIONS", "SIZES", "Scene", "TASKS", "WORLD_NAME", "colors_for",
    "caption_credit", "default_clip", "default_vlm", "derive_seed", "example_at", "features", "grade", "iou", "make_example", "make_examples",
    "render_scene", "sample_scene", "scenes", "sft_dataset", "tokenize", "vocabulary",
]
