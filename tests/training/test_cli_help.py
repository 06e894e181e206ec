"""Every command's --help names each default once, and never as ``None``."""

from __future__ import annotations

import argparse
import importlib
import re

import pytest

from training.cli_help import DefaultsHelpFormatter

COMMANDS = (
    "training.train",
    "training.evaluate",
    "training.compare",
    "training.sample",
    "engine_build.__main__",
    "worker.run",
    "worker.produce",
    "worker.trends_cli",
    "worker.stack",
)


def help_of(**arguments: dict) -> str:
    parser = argparse.ArgumentParser(prog="x", formatter_class=DefaultsHelpFormatter)
    for flag, kwargs in arguments.items():
        parser.add_argument(f"--{flag}", **kwargs)
    return " ".join(parser.format_help().split())


def test_a_default_is_appended_once_and_a_missing_one_not_at_all():
    text = help_of(
        top={"type": int, "default": 10, "help": "how many"},
        city={"help": "only this city"},
        at={"help": "end of the window (default: now)"},
        json={"action": "store_true", "help": "print JSON"},
    )
    assert "how many (default: 10)" in text
    assert "only this city" in text and "(default: None)" not in text
    assert text.count("default: now") == 1 and "(default: now) (default" not in text
    assert "print JSON (default: False)" in text


def test_a_list_default_reads_as_typed_words_and_an_empty_one_as_none():
    text = help_of(
        topics={"nargs": "+", "default": ["a", "b.dlq"], "help": "topics"},
        city={"action": "append", "default": [], "help": "cities"},
        precision={"default": ("fp16", "fp32"), "help": "kinds"},
    )
    assert "topics (default: a b.dlq)" in text
    assert "cities (default: none)" in text
    assert "kinds (default: fp16 fp32)" in text


@pytest.mark.parametrize("module", COMMANDS)
def test_no_command_prints_a_default_of_none_or_two_defaults(module):
    text = importlib.import_module(module).get_args_parser().format_help()
    flat = " ".join(text.split())
    assert "(default: None)" not in flat
    assert not re.search(r"\(default: [\[(]", flat), flat  # no Python list or tuple repr
    assert not re.search(r"default[^()]*\)\s*\(default", flat), flat
