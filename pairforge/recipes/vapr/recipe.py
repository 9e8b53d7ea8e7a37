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
from pairforge.recipes.vapr import describe, llm, polarity
from pairforge.recipes.vapr.editing import Edit, Validator, rule_candidates
from pairforge.recipes.vapr.penalty import AnswerValues, PenaltyLists, replacement_distribution
from pairforge.recipes.vapr.rules import VaprRules
from pairforge.resources import read_prompt
from pairforge.schema import template_hash, user_message

EDITORS = ("rule", "llm")
TASK_SHARES = ("source", "paper")
#: Table 1 of the VaPR paper (vapr-summary §3.3): approximate share (%) of each task category in
#: the 30k-pair dataset; ``task_shares=paper`` samples the source towards these (normalised).
TABLE1_SHARES = {"object": 13.3, "color": 13.3, "size": 3.3, "background": 3.3, "spatial": 13.3,
                 "counting": 16.7, "existence": 13.3, "referential": 13.3, "reasoning": 3.3,
                 "captioning": 6.7}

#: Length units are built once per process (the GPT-2 BPE takes about a second to build).
_length_unit = functools.lru_cache(maxsize=4)(length_unit)


def share_keep_probability(seen: Mapping[str, int], task: str,
                           target: Mapping[str, float] = TABLE1_SHARES) -> float:
    """Probability of keeping an example of ``task`` when the categorised source so far holds
    ``seen`` examples per task: min(1, r_task / max_k r_k) with r_k = target_k / (seen_k / Σ seen)
    (so kept shares ∝ target over the tasks seen; the most under-represented one is kept whole)."""
    total = sum(seen.values())
    ratio = {t: target.get(t, 0.0) * total / n for t, n in seen.items() if n > 0}
    top = max(ratio.values(), default=0.0)
    return 1.0 if top <= 0 else min(1.0, ratio.get(task, 0.0) / top)


@dataclass(frozen=True)
class VaPRParams:
    """``editor``: "rule" (fast, CPU) or "llm" (role ``editor``, default SmolLM2).
    ``trust_source_task``: use ``Example.task`` when the source has one, instead of the
    categorizer. Validator: ``max_lev_norm``, ``lev_floor_words``, ``max_token_gap`` in
    ``length_unit`` tokens. Penalty lists: ``penalty_top_k`` values, refreshed every
    ``penalty_every`` examples. ``llm_max_new_tokens``: cap of the editor's reply.
    ``rules``: a rules YAML (empty: the packaged ``vapr_tasks.yaml``); ``rules_sha256``, when
    given, must match it (a resumed build fails loudly if the rules changed).
    ``describe``: the LLM editor's description of the image (§3.4;
    :mod:`~pairforge.recipes.vapr.describe`): ``auto`` (the source's caption, else the
    ``describer`` VLM when one is configured), ``source``, ``model`` or ``off``;
    ``describe_max_new_tokens`` caps a generated description. ``task_shares``: ``source``
    (categories as the source has them) or ``paper`` (sample the source towards Table 1).
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
    describe: str = "auto"
    describe_max_new_tokens: int = 96
    task_shares: str = "source"
    short_answers: str = "keep"

    def __post_init__(self):
        if self.describe not in describe.MODES:
            raise PairforgeError(f"vapr: describe={self.describe!r}; choose one of {', '.join(describe.MODES)}")
        if self.task_shares not in TASK_SHARES:
            raise PairforgeError(f"vapr: task_shares={self.task_shares!r}; choose one of "
                                 f"{', '.join(TASK_SHARES)} (paper: Table 1's shares)")
        if self.describe_max_new_tokens < 8:
            raise PairforgeError(f"vapr: describe_max_new_tokens={self.describe_max_new_tokens}; must be >= 8")
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
    described_by: str = ""  # "describer" when the policy VLM described the image


class VaPR:
    """VaPR minimal-edit hard negatives (:mod:`pairforge.recipes.vapr`). Role ``editor``
    (OpenAI-compatible or HF; default SmolLM2) is needed only with ``editor="llm"``; role
    ``describer`` (the policy VLM, e.g. ``--describer tiny-vlm``; no default, so that a toy
    model never describes real photos) only when the LLM editor needs an image description
    the source does not have (without one the prompt says so and ``describe/none`` counts it)."""

    name = "vapr"
    groups = ("vapr",)
    roles = (("editor", False, "smollm2"), ("describer", False, None))

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
        self.describer = None
        if self.p.editor == "llm" and self.p.describe in ("auto", "model"):
            self._templates[describe.TEMPLATE] = read_prompt(*describe.TEMPLATE.split("/"))
            self.describer = describe.Describer(self._templates[describe.TEMPLATE],
                                                self.p.describe_max_new_tokens)
        self.task_seen: dict[str, int] = {}

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
        if self.p.describe == "model":
            describer = ctx.models.get("describer")
            if describer is None:
                raise PairforgeError("vapr: describe=model needs a model for role describer (the policy "
                                     "VLM, e.g. tiny-vlm); or use describe=auto|source|off")
            require(describer, Capability.GENERATE, Capability.IMAGES, purpose="vapr's image descriptions")

    def state_dict(self) -> dict[str, Any]:
        return {"penalty": self.penalties.state_dict(), "task_seen": dict(self.task_seen),
                "answer_values": self.answer_values.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.penalties.load_state_dict(state.get("penalty") or {})
        self.task_seen = {str(k): int(v) for k, v in (state.get("task_seen") or {}).items()}
        self.answer_values.load_state_dict(state.get("answer_values") or {})

    @classmethod
    def summary_extras(cls, params: Mapping[str, Any], stats: Mapping[str, float]) -> dict[str, Any]:
        """``task_shares`` for the build's summary: pairs and share per task, and Table 1's
        target shares when ``task_shares=paper``."""
        pairs = {k.split("/", 1)[1]: int(v) for k, v in stats.items() if k.startswith("task/")}
        total = sum(pairs.values())
        out: dict[str, Any] = {"mode": params.get("task_shares", "source"), "pairs": pairs,
                               "share": {t: round(n / total, 4) for t, n in pairs.items()} if total else {}}
        if out["mode"] == "paper":
            norm = sum(TABLE1_SHARES.values())
            out["target"] = {t: round(v / norm, 4) for t, v in TABLE1_SHARES.items()}
            out["dropped"] = {k.rsplit("/", 1)[1]: int(v) for k, v in stats.items()
                              if k.startswith("task_shares/dropped/")}
        return {"task_shares": out}

    def keep_for_shares(self, ex: Example, task: str, ctx: BuildContext) -> bool:
        """``task_shares=paper``: keep an example of ``task`` with probability
        min(1, r_task / max_k r_k), r_k = target_k / observed_k, the observed shares being those
        of the categorised source examples so far (this one included): the kept mix then
        follows Table 1 over the categories the source has, and the most under-represented
        category is kept whole. Paper silent on how its source was sampled (our choice)."""
        self.task_seen[task] = self.task_seen.get(task, 0) + 1
        return ctx.rng(ex, "vapr-task-shares").random() < share_keep_probability(self.task_seen, task)

    def replacement_stats(self) -> dict[str, dict[str, Any]]:
        """Distribution of replacement values per task so far (counts, entropy, top share)."""
        return replacement_distribution(self.penalties.totals())

    # ------------------------------------------------------------------------- process

    def process(self, examples: Sequence[Example], ctx: BuildContext) -> list[Outcome]:
        """One :class:`Outcome` per example, in order. Examples are edited block by block (a
        block = ``penalty_every`` consecutive examples by source position); within a block
        every example sees the same penalty lists and the LLM calls are batched."""
        prepared = [self.prepare(ex, ctx) for ex in examples]
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
                                   stats=w.stats | r.stats | {f"value/{w.task}/{r.edit.value}": 1,
                                                              f"task/{w.task}": 1}))
            self.penalties.advance(j - i)
            if self.penalties.n_seen % self.p.penalty_every == 0:
                self.answer_values.commit()
            i = j
        return out

    def prepare(self, ex: Example, ctx: BuildContext | None = None) -> _Work | Outcome:
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
        if self.p.task_shares == "paper" and not self.keep_for_shares(ex, task, ctx):
            return Outcome(reject=Reject("sample", f"task_shares: {task} is above its Table 1 share "
                                                   f"({TABLE1_SHARES.get(task, 0.0):g}%) in the source so far"),
                           stats={**stats, f"task_shares/dropped/{task}": 1})
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
        contexts, context_stats, by_model = self._contexts(works, ctx)
        first = self._generate(editor, ctx, works, [
            llm.editor_prompt(self._templates, w.task, w.question, w.answer, penalty[w.task],
                              context=contexts[k])
            for k, w in enumerate(works)], suffix="")
        v1 = self._validate(works, first)
        retry = [k for k, v in enumerate(v1) if v is not None]
        second = self._generate(editor, ctx, [works[k] for k in retry], [
            llm.editor_prompt(self._templates, works[k].task, works[k].question, works[k].answer,
                              penalty[works[k].task], previous=first[k], reason=v1[k], context=contexts[k])
            for k in retry], suffix="/retry")
        v2 = dict(zip(retry, self._validate([works[k] for k in retry], second)))
        texts2 = dict(zip(retry, second))
        fallback = [k for k in retry if v2[k] is not None]
        rule = dict(zip(fallback, self._rule_edit([works[k] for k in fallback], ctx)))
        out = []
        for k, w in enumerate(works):
            task_tpl = [llm.template_name(w.task)] + ([describe.TEMPLATE] if by_model[k] else [])
            who = "describer" if by_model[k] else ""
            if v1[k] is None:
                out.append(_Result(self.validator.describe(w.question, w.answer, w.task, first[k], "llm"),
                                   templates=task_tpl, described_by=who,
                                   stats={"editor/llm": 1, "llm/first_try": 1} | context_stats[k]))
            elif v2[k] is None:
                out.append(_Result(self.validator.describe(w.question, w.answer, w.task, texts2[k], "llm"),
                                   templates=task_tpl + [llm.RETRY], described_by=who,
                                   stats={"editor/llm": 1, "llm/retry": 1} | context_stats[k]))
            elif rule[k].edit is not None:
                out.append(dataclasses.replace(rule[k], stats={"editor/rule": 1, "llm/fallback": 1}
                                               | context_stats[k]))
            else:
                reason = (f"llm edit failed ({v1[k]}); retry failed ({v2[k]}); "
                          f"rule editor: {rule[k].reject.reason}")
                out.append(_Result(reject=Reject("validate", reason), stats={"llm/rejected": 1} | context_stats[k]))
        return out

    def _contexts(self, works: Sequence[_Work], ctx: BuildContext
                  ) -> tuple[list[str], list[dict[str, float]], list[bool]]:
        """The image description each LLM edit gets (§3.4): the source's own, else the
        describer's (cached per image), else none; with a stat per example
        (``describe/source|model|cached|none``) and whether the describer's text was used."""
        texts = [""] * len(works)
        stats: list[dict[str, float]] = [{"describe/none": 1} for _ in works]
        by_model = [False] * len(works)
        if self.p.describe == "off":
            return texts, stats, by_model
        todo = []
        for k, w in enumerate(works):
            own = describe.source_description(w.ex.meta) if self.p.describe != "model" else None
            if own:
                texts[k], stats[k] = own, {"describe/source": 1}
            elif self.describer is not None:
                todo.append(k)
        model = ctx.models.get("describer") if todo else None
        if model is not None:
            got, cached = self.describer.describe(model, [(works[k].ex.id, works[k].ex.images) for k in todo],
                                                  seed=ctx.seed)
            for k, text, hit in zip(todo, got, cached):
                texts[k], by_model[k] = text, True
                stats[k] = {"describe/model": 1} | ({"describe/cached": 1} if hit else {})
        return texts, stats, by_model

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
            roles = ["editor"] + ([r.described_by] if r.described_by else [])
            row["models"] = [{"role": role, "name": str(ctx.models[role].name),
                              "revision": str(getattr(ctx.models[role], "revision", "") or "")} for role in roles]
        else:
            row["models"] = [{"role": "editor", "name": "vapr-rules", "revision": self.rules.sha256[:16]}]
        row["prompt_templates"] = [{"name": n, "sha256": template_hash(self._templates[n])}
                                   for n in r.templates]
        return row
