"""The package's imports run one way, down the layers README.md ("Layout") lists, with no cycle -- lazy imports
inside functions included -- and the mathematics loads without Hydra or Lightning."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mapa_exp"

# bottom first; a module may import its own layer and the layers below it
LAYERS = [
    ("foundation", ["mapa_exp.errors", "mapa_exp.io", "mapa_exp.seeding"]),
    ("math", ["mapa_exp.math"]),
    ("configuration", ["mapa_exp.resolvers", "mapa_exp.config"]),
    ("nets", ["mapa_exp.nets"]),
    ("data", ["mapa_exp.data"]),
    ("methods", ["mapa_exp.methods"]),
    ("training", ["mapa_exp.runs"]),
    ("sweeps", ["mapa_exp.sweeps"]),
    ("evaluation", ["mapa_exp.evaluation"]),
    ("reporting", ["mapa_exp.reporting"]),
    ("entry points", ["mapa_exp.pipeline", "mapa_exp.cli", "mapa_exp.benchmarking", "mapa_exp"]),
]


def module_names() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def layer_of(module: str) -> int:
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (i, len(prefix))
    assert best is not None, f"{module} is in no layer: add it to LAYERS (and README.md's layout)"
    return best[0]


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every mapa_exp module ``name`` imports anywhere in its source (top level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "mapa_exp"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            if base.split(".")[0] != "mapa_exp":
                continue
            for alias in node.names:  # `from mapa_exp.x import y` imports the module y when there is one
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    found.discard(name)
    return found


def test_every_import_runs_down_the_layers_and_none_closes_a_cycle():
    modules = module_names()
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    upward = [f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
              for a, targets in graph.items() for b in targets if layer_of(b) > layer_of(a)]
    assert not upward, "\n".join(upward)
    # a package's __init__ is imported with each of its modules: count it as an edge from its modules' importers
    state, stack, cycle = {}, [], []

    def visit(node: str) -> bool:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                cycle.extend(stack[stack.index(target):] + [target])
                return True
            if target not in state and visit(target):
                return True
        stack.pop()
        state[node] = "done"
        return False

    for name in sorted(graph):
        if name not in state and visit(name):
            break
    assert not cycle, " -> ".join(cycle)


def test_the_mathematics_loads_without_hydra_omegaconf_or_lightning():
    probe = ("import sys\nimport mapa_exp.math.bounds, mapa_exp.math.quadrature, mapa_exp.math.prior_recovery\n"
             "import mapa_exp.math.likelihoods, mapa_exp.math.proposals, mapa_exp.math.truncated\n"
             "import mapa_exp.math.prior_choice\n"
             "print(sorted(m for m in ('omegaconf', 'hydra', 'lightning') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "[]"


def test_the_readme_names_the_layers_in_this_order():
    text = (ROOT / "README.md").read_text()
    positions = [text.find(f"`{name}`") for name, _ in LAYERS]
    assert -1 not in positions, [name for (name, _), pos in zip(LAYERS, positions) if pos < 0]
    assert positions == sorted(positions)
