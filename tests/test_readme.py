"""Every command line the README shows parses with the real CLI (flags and sub-commands exist), so the README
cannot drift from the code; what the commands do is tested elsewhere or run by the demo."""

import re
import shlex
from pathlib import Path

import pytest

from ssamba.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[str]:
    """`ssamba ...` lines (also behind `torchrun ... -m ssamba`) from the README's bash blocks, with
    backslash continuations joined."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if re.match(r"^(ssamba|torchrun .* -m ssamba) ", line):
                commands.append(line)
    return commands


def test_readme_shows_every_command():
    shown = {shlex.split(c.split("-m ssamba", 1)[-1] if "-m ssamba" in c else c[len("ssamba"):])[0]
             for c in readme_commands()}
    assert {"demo", "pretrain", "finetune", "evaluate", "bench", "convert", "conformance", "data", "hubert",
            "analyze", "embed"} <= shown


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_parses(command):
    argv = shlex.split(command.split("-m ssamba", 1)[1] if "-m ssamba" in command else command[len("ssamba"):])
    argv = [a for a in argv if a != "..."]  # "..." stands for the rest of an earlier command's arguments
    try:
        build_parser().parse_args(argv)
    except SystemExit as e:  # argparse exits on an unknown flag or a missing required one
        pytest.fail(f"README command does not parse (exit {e.code}): {command}")
