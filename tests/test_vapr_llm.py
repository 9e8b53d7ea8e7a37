"""VaPR's LLM editor path: prompts, batching, retry -> rule fallback -> reject, with a scripted
fake editor; and one real edit by SmolLM2 (marker ``smollm2``)."""

from __future__ import annotations

import re

import pytest

from pairforge.errors import PairforgeError
from pairforge.models.base import Capability, Completion
from pairforge.recipes import BuildContext, Example
from pairforge.recipes.vapr import VaPR
from pairforge.recipes.vapr.llm import editor_prompt, parse_edit, token_budget
from pairforge.schema import assistant_message, message_text, response_text, template_hash, user_message

_LAST = re.compile(r"Answer: (.*)\nWrong answer:\s*$")


class FakeEditor:
    """Replies from a script: ``script[(answer, attempt)]`` (attempt 0 or 1), else the answer."""

    name = "fake-editor"
    revision = "r1"
    capabilities = frozenset({Capability.GENERATE})

    def __init__(self, script: dict[tuple[str, int], str]):
        self.script = script
        self.calls: list[list[str]] = []
        self.prompts: dict[str, str] = {}

    def generate(self, requests, n, sampling):
        assert n == 1 and sampling.temperature == 0
        self.calls.append([r.id for r in requests])
        out = []
        for r in requests:
            prompt = message_text(r.messages[-1])
            assert not r.images and "<image>" not in prompt
            self.prompts[r.id] = prompt
            answer = _LAST.search(prompt).group(1)
            attempt = int(r.id.endswith("/retry"))
            out.append([Completion(text=self.script.get((answer, attempt), answer), token_logprobs=[])])
        return out


def example(answer: str, id: str, question: str = "What colour is the object on the table?") -> Example:
    return Example(id=id, messages=[user_message(question), assistant_message(answer)], images=["img"])


A = "The cube on the table is red."
B = "The ball on the table is green."
C = "The box on the table is white."
D = "I am not sure about the colour."
SCRIPT = {
    (A, 0): "Wrong answer: The cube on the table is blue.\n\nThis is wrong because ...",
    (B, 0): B,                                           # unchanged -> retry
    (B, 1): '"The ball on the table is pink."',
    (C, 0): "A completely different sentence about boxes.",
    (C, 1): C,                                           # fails twice -> rule editor
    (D, 0): "I am not sure about the size.",
    (D, 1): "Honestly, I really do not know which colour it has.",  # the rule editor finds no colour
}


@pytest.fixture()
def run():
    recipe = VaPR.from_params({"editor": "llm"})
    editor = FakeEditor(SCRIPT)
    ctx = BuildContext(seed=3, models={"editor": editor})
    recipe.check(ctx)
    outs = recipe.process([example(A, "a"), example(B, "b"), example(C, "c"), example(D, "d")], ctx)
    return recipe, editor, outs


def test_first_try_retry_fallback_reject(run):
    recipe, editor, (a, b, c, d) = run
    assert editor.calls == [["a", "b", "c", "d"], ["b/retry", "c/retry", "d/retry"]]  # batched
    assert response_text(a.rows[0]["rejected"]) == "The cube on the table is blue."
    assert a.stats["llm/first_try"] == 1 and a.rows[0]["editor"] == "llm"
    assert response_text(b.rows[0]["rejected"]) == "The ball on the table is pink."
    assert b.stats["llm/retry"] == 1
    retry_prompt = editor.prompts["b/retry"]
    assert f'"{B}"' in retry_prompt and "unchanged:" in retry_prompt
    assert c.rows[0]["editor"] == "rule" and c.stats["llm/fallback"] == 1
    assert response_text(c.rows[0]["rejected"]) != C
    assert d.reject.stage == "validate" and d.stats == {"llm/rejected": 1, "describe/none": 1}
    assert "llm edit failed (no_critical_span" in d.reject.reason
    assert "retry failed (too_different" in d.reject.reason and "rule editor: no_span" in d.reject.reason


def test_llm_rows_record_editor_and_templates(run):
    recipe, _, (a, b, c, _) = run
    tpl = recipe.templates()
    assert set(tpl) == {f"vapr/{t}.txt" for t in recipe.rules.tasks} | {"vapr/retry.txt", "vapr/describe.txt"}
    assert a.rows[0]["models"] == [{"role": "editor", "name": "fake-editor", "revision": "r1"}]
    assert a.rows[0]["prompt_templates"] == [
        {"name": "vapr/color.txt", "sha256": template_hash(tpl["vapr/color.txt"])}]
    assert [t["name"] for t in b.rows[0]["prompt_templates"]] == ["vapr/color.txt", "vapr/retry.txt"]
    assert c.rows[0]["models"][0]["name"] == "vapr-rules" and c.rows[0]["prompt_templates"] == []
    assert (a.rows[0]["edit_original"], a.rows[0]["edit_replacement"]) == ("red", "blue")


def test_penalty_list_goes_into_the_prompt():
    recipe = VaPR.from_params({"editor": "llm", "penalty_top_k": 2})
    recipe.load_state_dict({"penalty": {"n_seen": 0, "counts": {"color": {"blue": 5, "red": 2, "pink": 1}}}})
    editor = FakeEditor({})
    recipe.process([example(A, "a")], BuildContext(models={"editor": editor}))
    assert "Do not use these overused colours: blue, red." in editor.prompts["a"]
    fresh = VaPR.from_params({"editor": "llm"})
    editor = FakeEditor({})
    fresh.process([example(A, "a")], BuildContext(models={"editor": editor}))
    assert "overused colours: none." in editor.prompts["a"]


def test_requests_are_bucketed_by_their_own_budget():
    short = "The cube is red in colour."
    long_ = "The cube that stands on the big wooden table near the open window of the small kitchen is red."
    editor = FakeEditor({})
    VaPR.from_params({"editor": "llm"}).process([example(short, "s"), example(long_, "l")],
                                                 BuildContext(models={"editor": editor}))
    assert token_budget(short, 96) != token_budget(long_, 96)
    assert sorted(map(sorted, editor.calls[:2])) == [["l"], ["s"]]


def test_llm_edits_do_not_depend_on_batching():
    exs = [example(a, f"e{i}") for i, a in enumerate([A, B, C, D] * 5)]

    def run(chunks):
        recipe = VaPR.from_params({"editor": "llm", "penalty_every": 3})
        ctx = BuildContext(seed=1, models={"editor": FakeEditor(SCRIPT)})
        out, i = [], 0
        for n in chunks:
            out += recipe.process(exs[i:i + n], ctx)
            i += n
        return [o.rows[0]["rejected"] if o.rows else o.reject for o in out]

    assert run([20]) == run([1, 4, 2, 13])


def test_check_names_the_missing_editor():
    recipe = VaPR.from_params({"editor": "llm"})
    with pytest.raises(PairforgeError, match="role editor"):
        recipe.check(BuildContext())

    class NoGenerate(FakeEditor):
        capabilities = frozenset({Capability.SCORE})

    with pytest.raises(PairforgeError, match="'generate'"):
        recipe.check(BuildContext(models={"editor": NoGenerate({})}))
    VaPR().check(BuildContext())  # the rule editor needs no model


def test_prompt_and_parse_helpers():
    tpl = {"vapr/color.txt": "Q={question} A={answer} avoid {avoid}.{feedback}{other}",
           "vapr/retry.txt": 'was "{previous}" because {reason}'}
    assert editor_prompt(tpl, "color", "q?", "a.", []) == "Q=q? A=a. avoid none.{other}"
    assert editor_prompt(tpl, "color", "q?", "a.", ["red"], previous="x\ny", reason="r") == \
        'Q=q? A=a. avoid red.\nwas "x y" because r\n{other}'
    assert parse_edit("\n  Wrong answer: 'It is blue.'\nBecause ...") == "It is blue."
    assert parse_edit("Edited: The cube is red.") == "The cube is red."
    assert parse_edit("") == ""


@pytest.mark.smollm2
def test_smollm2_edits_a_few_answers():
    from pairforge.models.hf import HFModel

    editor = HFModel("smollm2", batch_size=4, progress=False)
    exs = [example("The colour of the square is brown.", "s1", "Tell me the colour of the square."),
           example("The colour of the diamond is purple.", "s2", "What color is the diamond?"),
           example("The red circle is to the left of the blue square.", "s3",
                   "Where is the red circle relative to the blue square?")]
    recipe = VaPR.from_params({"editor": "llm"})
    ctx = BuildContext(models={"editor": editor})
    recipe.check(ctx)
    outs = recipe.process(exs, ctx)
    llm_rows = [o.rows[0] for o in outs if o.rows and o.rows[0]["editor"] == "llm"]
    assert llm_rows, [o.reject or response_text(o.rows[0]["rejected"]) for o in outs]
    for row, ex in ((o.rows[0], ex) for o, ex in zip(outs, exs) if o.rows):
        edited = response_text(row["rejected"])
        assert recipe.validator.check([(ex.question, ex.answer, row["task"], edited)]) == [None]
    assert llm_rows[0]["models"] == [{"role": "editor", "name": "smollm2", "revision": editor.revision}]
