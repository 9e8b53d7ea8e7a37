"""VaPR: minimal-edit hard negatives (Wadhawan et al., 2025, "VaPR - Vision-language Preference
alignment for Reasoning", arXiv:2510.01700; DESIGN.md, "The four recipes").

chosen = the SFT ground-truth answer; rejected = a minimal edit of it that makes it wrong, in
the same style and length, so that a preference model cannot tell them apart by length or
style, only by content. Per example:

1. **Filters** (stage ``filter``): no answer; no image (``text_only``); multiple-choice,
   bounding-box and OCR questions (patterns in ``pairforge/recipes/data/vapr_tasks.yaml``).
   A bare "Yes."/"No." answer becomes a full sentence built from the question by undoing the
   auxiliary inversion (:mod:`~pairforge.recipes.vapr.polarity`: "Is there a red circle in
   the image?" -> "Yes, there is a red circle in the image."; "Does the image not contain a
   triangle?" + "No" -> "No, the image contains a triangle."; negated questions are read
   literally), or is filtered (``yesno``) when neither that nor a YAML rule covers it. Short
   answers ("triangle", "2") are kept (``short_answers="keep"``) or expanded into a sentence.
2. **Task**: a keyword categorizer over the question (rules in the YAML) picks one of the ten
   categories: object, color, size, counting, spatial, existence, referential, background,
   reasoning (general reasoning), captioning. ``Example.task`` is only compared with it
   (stats ``categorizer/agree|disagree``), unless ``trust_source_task`` is set.
3. **Edit**: the rule editor replaces one task-critical value (colour, kind, object noun,
   size, number, relation, background) with another of its class, in the same form and case;
   an answer opening with yes/no gets the opposite proposition (leading word flipped and the
   statement negated or affirmed, never the leading word alone); a short answer naming no
   class value gets another answer value its question type has earlier in the source
   (:class:`~pairforge.recipes.vapr.penalty.AnswerValues`), or the other option of an
   alternative question;
   or the LLM editor (role ``editor``) rewrites the answer with the task's prompt
   (``prompts/vapr/<task>.txt``); a failed LLM edit is retried once, told why, then the rule
   editor takes over. Values repeated from the question (referring expressions) are never
   edited, nor replaced by a value the answer already states.
4. **Validate** every edit (:class:`~pairforge.recipes.vapr.editing.Validator`): minimality
   (a short answer by its decisive span), type, repeated values, and for yes/no answers
   coherence (no lead-only flip, no attribute swap, no double negation, no self-contradiction).
5. **Penalty lists** (:mod:`~pairforge.recipes.vapr.penalty`): each task's most used
   replacement values are avoided by both editors, so edits stay diverse.

Rows: ``recipe="vapr"``, the task, the ``vapr`` column group (``edit_original``,
``edit_replacement``, ``editor``), the editor in ``models`` and, for LLM edits, the templates
used in ``prompt_templates``. ``Outcome.stats`` counts filters, editors, LLM retries and
fallbacks, and replacement values (``value/<task>/<value>``; see
:func:`~pairforge.recipes.vapr.penalty.distribution_from_stats`).
"""

from pairforge.recipes.vapr.editing import Edit, Validator, rule_candidates, word_diff
from pairforge.recipes.vapr.penalty import (
    PenaltyLists,
    distribution_from_stats,
    replacement_distribution,
)
from pairforge.recipes.vapr.recipe import VaPR, VaPRParams
from pairforge.recipes.vapr.rules import DEFAULT_RULES, Span, VaprRules

__all__ = [
    "DEFAULT_RULES", "Edit", "PenaltyLists", "Span", "VaPR", "VaPRParams", "VaprRules", "Validator",
    "distribution_from_stats", "replacement_distribution", "rule_candidates", "word_diff",
]
