"""The VaPR recipe class: filters -> yes/no sentences -> categorizer -> editor -> validator -> rows.
See the package docstring (:mod:`pairforge.recipes.vapr`) for the method."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pairforge.diagnostics.lengths import length_unit
from pairforge.errors import PairforgeError
from pairforge.models.base import Capability, Request, SamplingParams, require
from pairforge.recipes.base import BuildContext, Example, Outcome, Reject, pair_row, recipe_params
from pairforge.recipes.vapr import llm, polarity
from pairforge.recipes.vapr.editing import Edit, Validator, rule_candidates
from pairforge.recipes.vapr.penalty import AnswerValues, PenaltyLists, replacement_distribution
from pairforge.recipes.vapr.rules import VaprRules
from pairforge.schema import template_hash, user_message

EDITORS = ("rule", "llm")

#: Length units are built once per process (the GPT-2 BPE takes about a second to build).
_length_unit = functools.lru_cache(maxsize=4)(length_unit)


@dataclass(frozen=True)
class VaPRParams:
    """``editor``: "rule" (fast, CPU) or "llm" (role ``editor``, default SmolLM2).
    ``trust_source_task``: use ``Example.task`` when the source has one, instead of the
    categorizer. Validator: ``max_lev_norm``, ``lev_floor_words``, ``max_token_gap`` in
    ``length_unit`` tokens. Penalty lists: ``penalty_top_k`` values, refreshed every
    ``penalty_every`` examples. ``llm_max_new_tokens``: cap of the editor's reply.
    ``rules``: a rules YAML (empty: the packaged ``vapr_tasks.yaml``); ``rules_sha256``, when
    given, must match it (a resumed build fails loudly if the rules changed).
    ``short_answers``: "keep" (default) keeps a short answer ("triangle", "2") as the chosen
    answer, so the pair stays in the source's own answer style (VaPR's chosen is the SFT
    ground truth) and its edit is judged by its decisive span; "sentence" expands it into a
    sentence from the question where a pattern fits ("What colour is the car?" + "red" ->
    "The car is red."), for sources whose model should answer in sentences."""

    editor: str = "rule"
    trust_source_task: bool = False
    max_lev_norm: float = 0.2
    lev_floor_words: int = 0
    max_token_gap: int = 3
    length_unit: str = "gpt2"
    penalty_top_k: int = 3
    penalty_every: int = 32
    llm_max_new_tokens: int = 96
    rules: str = ""
    rules_sha256: str = ""
    short_answers: str = "keep"

    def __post_init__(self):
        if self.editor not in EDITORS:
            raise PairforgeError(f"vapr: editor={self.editor!r}; choose one of {', '.join(EDITORS)}")
        if not 0 <= self.max_lev_norm <= 1:
            raise PairforgeError(f"vapr: max_lev_norm={self.max_lev_norm}; must be in [0, 1] (default 0.2)")
        if self.lev_floor_words < 0 or self.max_token_gap < 0:
            raise PairforgeError(f"vapr: lev_floor_words={self.lev_floor_words}, max_token_gap="
                                 f"{self.max_token_gap}; both must be >= 0")
        if self.penalty_top_k < 0 or self.penalty_every < 1:
            raise PairforgeError(f"vapr: penalty_top_k={self.penalty_top_k} must be >= 0 and "
                                 f"penalty_every={self.penalty_every} >= 1")
        if self.short_answers not in ("keep", "sentence"):
            raise PairforgeError(f"vapr: short_answers={self.short_answers!r}; choose keep (default) "
                                 f"or sentence")
        if self.llm_max_new_tokens < 8:
            raise PairforgeError(f"vapr: llm_max_new_tokens={self.llm_max_new_tokens}; must be >= 8")


@dataclass
class _Work:
    """An example that passed the filters: its task, question and chosen answer (the SFT
    answer, or its yes/no sentence)."""

    ex: Example
    task: str
    question: str
    answer: str
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class _Result:
    edit: Edit | None = None
    reject: Reject | None = None
    templates: list[str] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)


class VaPR:
    """VaPR minimal-edit hard negatives (:mod:`pairforge.recipes.vapr`). Role ``editor``
    (OpenAI-compatible or HF; default SmolLM2) is needed only with ``editor="llm"``."""

    name = "vapr"
    groups = ("vapr",)
    roles = (("editor", False, "smollm2"),)

    def __init__(self, params: VaPRParams | None = None):
        self.p = params or VaPRParams()
        self.rules = VaprRules.load(self.p.rules or None)
        if self.p.rules_sha256 and self.p.rules_sha256 != self.rules.sha256:
            raise PairforgeError(f"vapr: rules file {self.rules.where} has sha256 "
                                 f"{self.rules.sha256[:12]}..., not the {self.p.rules_sha256[:12]}... "
                                 f"this build was started with; restore that file or start a new build")
        self.validator = Validator(self.rules, _length_unit(self.p.length_unit),
                                   max_lev_norm=self.p.max_lev_norm,
                                   lev_floor_words=self.p.lev_floor_words,
                                   max_token_gap=self.p.max_token_gap)
        self.penalties = PenaltyLists(self.p.penalty_top_k, self.p.penalty_every)
        self.answer_values = AnswerValues()
        self._templates = llm.load_templates(self.rules.tasks) if self.p.editor == "llm" else {}

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> VaPR:
        return cls(recipe_params(VaPRParams, params, cls.name))

    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self.p) | {"rules_sha256": self.rules.sha256}

    def templates(self) -> dict[str, str]:
        return dict(self._templates)

    def check(self, ctx: BuildContext) -> None:
        if self.p.editor != "llm":
            return
        editor = ctx.models.get("editor")
        if editor is None:
            raise PairforgeError("vapr: editor=llm needs a model for role editor (e.g. smollm2, "
                                 "or openai:MODEL@URL); or use editor=rule")
        require(editor, Capability.GENERATE, purpose="vapr's LLM editor")

    def state_dict(self) -> dict[str, Any]:
        return {"penalty": self.penalties.state_dict(), "answer_values": self.answer_values.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.penalties.load_state_dict(state.get("penalty") or {})
        self.answer_values.load_state_dict(state.get("answer_values") or {})

    def replacement_stats(self) -> dict[str, dict[str, Any]]:
        """Distribution of replacement values per task so far (counts, entropy, top share)."""
        return replacement_distribution(self.penalties.totals())

    # ------------------------------------------------------------------------- process

    def process(self, examples: Sequence[Example], ctx: BuildContext) -> list[Outcome]:
        """One :class:`Outcome` per example, in order. Examples are edited block by block (a
        block = ``penalty_every`` consecutive examples by source position); within a block
        every example sees the same penalty lists and the LLM calls are batched."""
        prepared = [self.prepare(ex) for ex in examples]
        out: list[Outcome] = []
        i = 0
        while i < len(examples):
            j = min(len(examples), i + self.p.penalty_every - self.penalties.n_seen % self.p.penalty_every)
            works = [w for w in prepared[i:j] if isinstance(w, _Work)]
            self.validator.data_values = self.answer_values.as_sets()
            results = iter(self._edit(works, ctx))
            for w in works:
                value = self.rules.short_value(w.answer)
                if value is not None:
                    self.answer_values.record(self.rules.question_type(w.question, w.task), value)
            for w in prepared[i:j]:
                if isinstance(w, Outcome):
                    out.append(w)
                    continue
                r = next(results)
                if r.edit is None:
                    out.append(Outcome(reject=r.reject, stats=w.stats | r.stats))
                    continue
                self.penalties.record(w.task, r.edit.value)
                out.append(Outcome(rows=[self._row(w, r, ctx)],
                                   stats=w.stats | r.stats | {f"value/{w.task}/{r.edit.value}": 1}))
            self.penalties.advance(j - i)
            if self.penalties.n_seen % self.p.penalty_every == 0:
                self.answer_values.commit()
            i = j
        return out

    def prepare(self, ex: Example) -> _Work | Outcome:
        """Filters, yes/no sentence and task of one example: a :class:`_Work`, or a rejecting
        :class:`Outcome` (stage ``filter`` or ``categorize``)."""
        question, answer = ex.question, ex.answer

        def reject(stage: str, reason: str, key: str) -> Outcome:
            return Outcome(reject=Reject(stage, reason), stats={key: 1})

        if not answer.strip():
            return reject("filter", "no_answer: the example has no reference answer (its last "
                          "message must be the assistant's)", "filter/no_answer")
        if not ex.images:
            return reject("filter", "text_only: the instruction has no image", "filter/text_only")
        why = self.rules.filter_reason(question, answer)
        if why:
            return reject("filter", why, "filter/" + why.split(":")[0])
        stats: dict[str, float] = {}
        if self.rules.is_yesno(answer):
            sentence = self.rules.yesno_sentence(question, answer)
            if sentence is None:
                return reject("filter", f"yesno: the answer is a bare yes/no and no rule of "
                              f"{self.rules.where} turns question {question.strip()!r} into a "
                              f"sentence; add a yesno rule", "filter/yesno")
            answer, stats["yesno_sentence"] = sentence, 1
        elif self.p.short_answers == "sentence":
            sentence = self.rules.short_sentence(question, answer)
            if sentence is not None:
                answer, stats["short_sentence"] = sentence, 1
        if self.p.trust_source_task and ex.task in self.rules.tasks:
            task = ex.task
        else:
            task = self.rules.categorize(question)
            if task is None:
                return reject("categorize", f"no categorizer rule of {self.rules.where} matches "
                              f"question {question.strip()[:80]!r}; add one, or set "
                              f"trust_source_task", "categorize/none")
            if ex.task:
                stats["categorizer/agree" if task == ex.task else "categorizer/disagree"] = 1
        return _Work(ex, task, question, answer, stats)

    # ------------------------------------------------------------------------- editors

    def _edit(self, works: Sequence[_Work], ctx: BuildContext) -> list[_Result]:
        """Edits of one block (same penalty lists for all)."""
        if self.p.editor == "llm" and works:
            return self._llm_edit(works, ctx)
        return [r if r.edit is None else dataclasses.replace(r, stats={"editor/rule": 1})
                for r in self._rule_edit(works, ctx)]

    def _rule_edit(self, works: Sequence[_Work], ctx: BuildContext) -> list[_Result]:
        cands = [rule_candidates(w.answer, w.question, w.task, self.rules,
                                 penalty=self.penalties.penalty(w.task),
                                 counts=self.penalties.committed(w.task),
                                 rng=ctx.rng(w.ex, "vapr-rule-editor"),
                                 data_values=self.answer_values.get(self.rules.question_type(w.question, w.task)))
                 for w in works]
        # validate in rounds: each example's next candidate until one passes (same result as
        # taking the first valid candidate in order, with far fewer checks)
        first_fail: dict[int, str] = {}
        chosen: dict[int, str] = {}
        todo = [k for k in range(len(works)) if cands[k]]
        depth = 0
        while todo:
            verdicts = self.validator.check([(works[k].question, works[k].answer, works[k].task,
                                              cands[k][depth]) for k in todo])
            for k, v in zip(todo, verdicts):
                if v is None:
                    chosen[k] = cands[k][depth]
                else:
                    first_fail.setdefault(k, v)
            depth += 1
            todo = [k for k in todo if k not in chosen and depth < len(cands[k])]
        out = []
        for k, w in enumerate(works):
            if k in chosen:
                out.append(_Result(self.validator.describe(w.question, w.answer, w.task, chosen[k], "rule")))
            elif not cands[k]:
                names = "/".join(self.rules.tasks[w.task])
                if polarity.split_lead(w.answer)[0] is not None:
                    out.append(_Result(reject=Reject("edit", "no_flip: the yes/no answer's statement is "
                                                     "not the question's proposition (nor a short "
                                                     "echo of it); negating it would not answer the "
                                                     "question"), stats={"edit/no_flip": 1}))
                    continue
                out.append(_Result(reject=Reject("edit", f"no_span: the answer has no {names} value "
                                                 f"to replace for a {w.task} question (values "
                                                 f"copied from the question are not edited)"),
                                   stats={"edit/no_span": 1}))
            else:
                out.append(_Result(reject=Reject("validate", f"rule editor: none of {len(cands[k])} "
                                                 f"edits passed; first: {first_fail[k]}"),
                                   stats={"validate/" + first_fail[k].split(":")[0]: 1}))
        return out

    def _llm_edit(self, works: Sequence[_Work], ctx: BuildContext) -> list[_Result]:
        """LLM edits, batched: a first try for all; one retry, told the reason, for those that
        failed validation; the rule editor for those that failed again; else a reject."""
        editor = ctx.models["editor"]
        penalty = {w.task: self.penalties.penalty(w.task) for w in works}
        first = self._generate(editor, ctx, works, [
            llm.editor_prompt(self._templates, w.task, w.question, w.answer, penalty[w.task])
            for w in works], suffix="")
        v1 = self._validate(works, first)
        retry = [k for k, v in enumerate(v1) if v is not None]
        second = self._generate(editor, ctx, [works[k] for k in retry], [
            llm.editor_prompt(self._templates, works[k].task, works[k].question, works[k].answer,
                              penalty[works[k].task], previous=first[k], reason=v1[k])
            for k in retry], suffix="/retry")
        v2 = dict(zip(retry, self._validate([works[k] for k in retry], second)))
        texts2 = dict(zip(retry, second))
        fallback = [k for k in retry if v2[k] is not None]
        rule = dict(zip(fallback, self._rule_edit([works[k] for k in fallback], ctx)))
        out = []
        for k, w in enumerate(works):
            task_tpl = llm.template_name(w.task)
            if v1[k] is None:
                out.append(_Result(self.validator.describe(w.question, w.answer, w.task, first[k], "llm"),
                                   templates=[task_tpl], stats={"editor/llm": 1, "llm/first_try": 1}))
            elif v2[k] is None:
                out.append(_Result(self.validator.describe(w.question, w.answer, w.task, texts2[k], "llm"),
                                   templates=[task_tpl, llm.RETRY], stats={"editor/llm": 1, "llm/retry": 1}))
            elif rule[k].edit is not None:
                out.append(dataclasses.replace(rule[k], stats={"editor/rule": 1, "llm/fallback": 1}))
            else:
                reason = (f"llm edit failed ({v1[k]}); retry failed ({v2[k]}); "
                          f"rule editor: {rule[k].reject.reason}")
                out.append(_Result(reject=Reject("validate", reason), stats={"llm/rejected": 1}))
        return out

    def _validate(self, works: Sequence[_Work], texts: Sequence[str]) -> list[str | None]:
        return self.validator.check([(w.question, w.answer, w.task, t) for w, t in zip(works, texts)])

    def _generate(self, editor: Any, ctx: BuildContext, works: Sequence[_Work], prompts: Sequence[str],
                  suffix: str) -> list[str]:
        """The editor's parsed replies, one greedy completion per prompt; one ``generate`` call
        per token budget (:func:`llm.token_budget`), so a reply never depends on the batch."""
        out = [""] * len(prompts)
        buckets: dict[int, list[int]] = {}
        for k, w in enumerate(works):
            buckets.setdefault(llm.token_budget(w.answer, self.p.llm_max_new_tokens), []).append(k)
        for budget, idx in sorted(buckets.items()):
            requests = [Request([user_message(prompts[k], n_images=0)], (), id=works[k].ex.id + suffix)
                        for k in idx]
            replies = editor.generate(requests, 1, SamplingParams(temperature=0, max_new_tokens=budget,
                                                                  seed=ctx.seed))
            for k, reply in zip(idx, replies):
                out[k] = llm.parse_edit(reply[0].text)
        return out

    # ------------------------------------------------------------------------- rows

    def _row(self, w: _Work, r: _Result, ctx: BuildContext) -> dict:
        edit = r.edit
        row = pair_row(self, dataclasses.replace(w.ex, task=w.task), ctx, chosen=w.answer,
                       rejected=edit.text, edit_original=edit.original,
                       edit_replacement=edit.replacement, editor=edit.editor)
        if edit.editor == "llm":
            m = ctx.models["editor"]
            row["models"] = [{"role": "editor", "name": str(m.name),
                              "revision": str(getattr(m, "revision", "") or "")}]
        else:
            row["models"] = [{"role": "editor", "name": "vapr-rules", "revision": self.rules.sha256[:16]}]
        row["prompt_templates"] = [{"name": n, "sha256": template_hash(self._templates[n])}
                                   for n in r.templates]
        return row
