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
