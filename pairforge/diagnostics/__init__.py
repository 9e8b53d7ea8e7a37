"""Bias diagnostics of preference sets: ``pairforge audit``.

Modules, in the order data flows through them: ``text`` (per-pair word Levenshtein, lengths,
identical / near-duplicate pairs; vectorised), ``lengths`` (length units: words, GPT-2 BPE,
any HF fast tokenizer), ``thresholds`` (every number behind a flag), ``stats`` (set
statistics, shortcut accuracies, flags), ``audit`` (streaming driver and output files),
``report`` (plots, report.html, terminal table).
"""
