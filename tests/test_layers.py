"""The layers of the package: the method library, the file formats (exports, checkpoints) and
the export command import neither Lightning nor Hydra, so a user's own training loop (README,
"Your own loop") pulls in neither; Lightning lives in ``onebit.train``."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import REPO

APP_PACKAGES = ("lightning", "lightning_fabric", "pytorch_lightning", "hydra", "omegaconf")


@pytest.mark.parametrize(
    "module",
    [
        "onebit",
        "onebit.quant",
        "onebit.distill",
        "onebit.export",
        "onebit.loading",
        "onebit.generation",
        "onebit.models",
        "onebit.checkpoint",
        "onebit.export_checkpoint",
        "onebit.eval.perplexity",
    ],
)
def test_the_library_imports_neither_lightning_nor_hydra(module: str) -> None:
    code = (
        f"import importlib, sys; importlib.import_module({module!r}); "
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({APP_PACKAGES!r})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", f"{module} imports {done.stdout.strip()}"


def test_the_check_sees_lightning_when_it_is_imported() -> None:
    """The check above can fail: the LightningModule's file does import Lightning."""
    code = (
        "import sys, onebit.train.module; "
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({APP_PACKAGES!r})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert "lightning" in done.stdout, done.stderr[-2000:]


def test_the_sharded_checkpoint_meta_file_is_lightnings() -> None:
    """``onebit.checkpoint.sharded`` names Lightning's ``meta.pt`` without importing Lightning."""
    from lightning.fabric.strategies.model_parallel import _METADATA_FILENAME

    from onebit.checkpoint.sharded import LIGHTNING_META

    assert LIGHTNING_META == _METADATA_FILENAME


def _import_graph() -> dict[str, set[str]]:
    """Module of ``onebit`` -> the ``onebit`` modules it imports anywhere in its code (top level
    or inside functions), read from the source with ``ast``."""
    import ast

    root = REPO / "onebit"
    names = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base]) if base else ".".join(up)
                targets = [base, *(f"{base}.{a.name}" for a in node.names)]
            for t in targets:
                while t and t not in names:
                    t = t.rpartition(".")[0]
                if t and t != name and t.startswith("onebit"):
                    found.add(t)
        graph[name] = found
    return graph


def test_the_import_graph_has_no_circle_and_no_arrow_into_the_app() -> None:
    """No module of onebit imports one that imports it back (through any chain), and nothing
    outside onebit.train imports onebit.train: the layers the README and issue describe."""
    graph = _import_graph()
    assert "onebit.train.module" in graph and "onebit.quant.linear" in graph  # the walk found them
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if nxt.startswith(node + ".") or node.startswith(nxt + "."):
                continue  # a package and its own modules (re-exports) are one unit
            assert state.get(nxt) != 1, " -> ".join([*path, node, nxt])
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    upward = sorted(
        f"{m} -> {t}"
        for m, ts in graph.items()
        for t in ts
        if t.startswith("onebit.train") and not m.startswith("onebit.train")
    )
    assert upward == []
