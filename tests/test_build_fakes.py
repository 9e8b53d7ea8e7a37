"""Small fake recipes that the build-engine tests drive (the real recipes are tested in their
own files); registered in ``RECIPES`` by :func:`register`, also inside a subprocess.

- ``echo``: one pair per example (chosen: the reference answer; rejected: a word drawn from
  ``ctx.rng(ex)`` plus a running count: cross-example state), rejects one task, optional
  sleep per batch, a crash on a chosen example id (env ``PAIRFORGE_FAKE_CRASH_ID``: a
  RuntimeError, which stops the build) and a data error on others (env
  ``PAIRFORGE_FAKE_BAD_IDS``, comma-separated: a ZeroDivisionError, a per-example reject);
- ``crops``: two rows per example (P2-DPO-like), with single-image columns;
- ``windowed``: two P2-DPO rows per example with a known ``p2dpo_margin`` each (from a hash of
  the example id), and P2-DPO's own whole-run margin window as its ``run_pass``;
- ``invalid``: every third example's row has an empty rejected answer;
- ``short``: returns one outcome too few;
- ``judged``: needs a judge model; ``undeclared``: writes a column of an undeclared group;
- ``lazy``: a required policy and an optional editor it asks for only with ``use_editor``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from pairforge.recipes import RECIPES
from pairforge.recipes.base import BuildContext, Example, Outcome, Recipe, Reject
from pairforge.schema import make_pair

HERE = Path(__file__).resolve().parent
CRASH_ENV = "PAIRFORGE_FAKE_CRASH_ID"
BAD_ENV = "PAIRFORGE_FAKE_BAD_IDS"
WORDS = ("maybe", "never", "purple", "seven", "nothing")


def register() -> None:
    """Put the fakes in ``RECIPES`` (this file's folder on ``sys.path``)."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    for name, cls in (("echo", "Echo"), ("crops", "Crops"), ("invalid", "Invalid"),
                      ("short", "Short"), ("judged", "Judged"), ("undeclared", "Undeclared"),
                      ("lazy", "Lazy"), ("windowed", "Windowed")):
        RECIPES[name] = f"test_build_fakes:{cls}"


class Echo:
    name = "echo"
    groups: tuple[str, ...] = ()
    roles: tuple = ()
    batches: list[int] = []  # sizes of the batches process() got (class-wide, for tests)

    def __init__(self, params: dict):
        self.p = {"reject_task": "counting", "sleep": 0.0, **params}
        self.seen = 0

    @classmethod
    def from_params(cls, params):
        return cls(dict(params))

    def params(self) -> dict:
        return dict(self.p)

    def templates(self) -> dict:
        return {"rejected": "{word} (after {n} examples)"}

    def check(self, ctx: BuildContext) -> None:
        pass

    def process(self, examples, ctx):
        Echo.batches.append(len(examples))
        if self.p["sleep"]:
            time.sleep(self.p["sleep"])
        out = []
        for ex in examples:
            if os.environ.get(CRASH_ENV) == ex.id:
                raise RuntimeError(f"fake crash on {ex.id}")
            if ex.id in os.environ.get(BAD_ENV, "").split(","):
                raise ZeroDivisionError(f"fake data error on {object()}")
            self.seen += 1
            out.append(self.one(ex, ctx))
        return out

    def one(self, ex: Example, ctx: BuildContext) -> Outcome:
        if ex.task == self.p["reject_task"]:
            return Outcome(reject=Reject("filter", f"task {ex.task} is not used"))
        word = ctx.rng(ex).choice(WORDS)
        row = make_pair(prompt=ex.prompt_messages, chosen=ex.answer,
                        rejected=f"{word} (after {self.seen} examples)", images=ex.images)
        return Outcome(rows=[row], stats={"pairs_made": 1})

    def state_dict(self) -> dict:
        return {"seen": self.seen}

    def load_state_dict(self, state) -> None:
        self.seen = state["seen"]


class Crops(Echo):
    name = "crops"
    groups = ("p2dpo",)

    def one(self, ex, ctx):
        if not ex.images:
            return Outcome(reject=Reject("filter", "text-only"))
        img = ex.images[0]
        box = (0, 0, img.width // 2, img.height // 2)
        rows = [make_pair(prompt=ex.prompt_messages, chosen=ex.answer, rejected=f"{kind} no",
                          images=ex.images, id=f"{ex.id}-{kind}", p2dpo_kind=kind,
                          crop_box=list(box), crop_image=img.crop(box), noisy_image=None,
                          models=[{"role": "annotator", "name": "fake-annotator"}])
                for kind in ("focus", "robust")]
        return Outcome(rows=rows)


def fake_margin(example_id: str, kind: str) -> float:
    """The ``windowed`` recipe's margin of a pair: uniform in [−0.5, 0.5) from the id, doubled
    for robust pairs."""
    from pairforge.schema import derive_seed

    m = (derive_seed("fake-margin", example_id) % 1000) / 1000 - 0.5
    return m if kind == "focus" else 2 * m


class Windowed(Echo):
    name = "windowed"
    groups = ("p2dpo",)

    def one(self, ex, ctx):
        rows = [make_pair(prompt=ex.prompt_messages, chosen=ex.answer, rejected=f"{kind} no",
                          images=ex.images, id=f"{ex.id}-{kind}", p2dpo_kind=kind, p2dpo_example=ex.id,
                          p2dpo_margin=fake_margin(ex.id, kind))
                for kind in ("focus", "robust")]
        return Outcome(rows=rows, stats={"focus_kept": 1, "robust_kept": 1})

    def run_pass(self):
        from pairforge.recipes.p2dpo import P2DPO

        return P2DPO.from_params({k: v for k, v in self.p.items() if k.startswith("margin")}).run_pass()


class Lazy(Echo):
    """A required policy and an optional editor, used only with ``use_editor``."""

    name = "lazy"
    roles = (("policy", True, "tiny-vlm"), ("editor", False, "smollm2"))

    def one(self, ex, ctx):
        assert ctx.models["policy"] is not None
        if self.p.get("use_editor"):
            assert ctx.models.get("editor") is not None
        return super().one(ex, ctx)


class Invalid(Echo):
    name = "invalid"

    def one(self, ex, ctx):
        rejected = "" if self.seen % 3 == 0 else "no"
        return Outcome(rows=[make_pair(prompt=ex.prompt_messages, chosen=ex.answer,
                                       rejected=rejected, images=ex.images)])


class Short(Echo):
    name = "short"

    def process(self, examples, ctx):
        return super().process(examples, ctx)[:-1]


class Judged(Echo):
    name = "judged"
    roles = (("judge", True, None),)


class Undeclared(Echo):
    name = "undeclared"

    def one(self, ex, ctx):
        out = super().one(ex, ctx)
        for r in out.rows:
            r["m3p_score"] = 1.0
        return out


def test_fakes_follow_the_recipe_protocol():
    for cls in (Echo, Crops, Invalid, Short, Judged, Undeclared, Lazy):
        assert isinstance(cls({}), Recipe)
