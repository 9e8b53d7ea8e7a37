"""The command line's help texts: values of --format listed, boolean options as plain
switches, first sentences whole in the command list; datasets' own bars off by default."""

from __future__ import annotations

import os
import sys

import pytest
from typer.testing import CliRunner

from pairforge.cli import app, main
from pairforge.sources import FORMATS


def _help(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())  # unwrap


def test_audit_help_lists_every_format_and_switches_take_no_value():
    text = _help("audit")
    for name in FORMATS:
        assert f" {name}" in text
    assert "--text-only Also score" in text  # a switch: no "<bool>" value after it
    for command in ("audit", "build", "publish", "export", "train", "merge", "serve"):
        assert "<bool>" not in _help(command)


def test_command_list_shows_whole_first_sentences():
    text = _help()
    assert "..." not in text.split("Commands:")[1]
    assert "and with --scorer / --policy for what a model already prefers (Δ_ref, IPS)." in text


def test_main_hides_datasets_progress_bars_unless_asked(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_DISABLE_PROGRESS_BARS", "placeholder")
    monkeypatch.delenv("HF_DATASETS_DISABLE_PROGRESS_BARS")
    monkeypatch.setattr(sys, "argv", ["pairforge", "version"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 0 and os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1"
    monkeypatch.setenv("HF_DATASETS_DISABLE_PROGRESS_BARS", "0")  # the user's choice wins
    with pytest.raises(SystemExit):
        main()
    assert os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "0"
