"""The package's imports run one way: each layer imports only the layers below it, no module
imports a program (a module with a `__main__` block), and no imports run in a circle.

Every import counts, those deferred inside functions included. A new module must be given a layer
here (`layer_of`), which is the point: its place in the architecture is a decision.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "mixreorg_jax"

# From the bottom. Each layer may import itself and the layers listed for it.
ALLOWED = {
    # Logging of long loops' progress (progress.py): plain Python, beneath everything.
    "progress": set(),
    "ops": {"ops"},
    "losses": {"ops"},
    "models": {"ops", "models"},
    "data": {"progress", "data"},
    "formats": {"progress", "ops", "models", "formats"},
    "training": {"progress", "ops", "losses", "models", "data", "formats", "training"},
    "evaluation": {
        *("progress", "ops", "losses", "models", "data", "formats", "training", "evaluation")
    },
    # The library's front: `load` (api.py), the trainer that runs training with its in-loop
    # evaluators (trainer.py), the programs' shared command-line helpers (cli.py).
    "api": {
        *("progress", "ops", "losses", "models", "data", "formats", "training", "evaluation"),
        "api",
    },
}
ALLOWED["programs"] = set(ALLOWED) - {"programs"}
FOLDER_LAYERS = ("ops", "models", "data", "formats", "training", "evaluation")


def module_name(root: pathlib.Path, path: pathlib.Path) -> str:
    parts = ("mixreorg_jax",) + path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_program(tree: ast.Module) -> bool:
    """True when the module has an `if __name__ == "__main__":` block."""
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare):
            operands = (node.test.left, *node.test.comparators)
            names = {getattr(n, "id", None) for n in operands}
            values = {getattr(n, "value", None) for n in operands}
            if "__name__" in names and "__main__" in values:
                return True
    return False


def layer_of(name: str, program: bool) -> str:
    parts = name.split(".")
    if len(parts) > 1 and parts[1] in FOLDER_LAYERS:
        return parts[1]
    if name in ("mixreorg_jax.losses", "mixreorg_jax.progress"):
        return name.split(".")[1]
    if name in ("mixreorg_jax", "mixreorg_jax.api", "mixreorg_jax.trainer", "mixreorg_jax.cli"):
        return "api"
    if program or (len(parts) > 1 and parts[1] == "experiments"):
        return "programs"
    raise AssertionError(f"{name} has no layer: place it in tests/test_layers.py")


def scan(root: pathlib.Path = PACKAGE) -> dict:
    """{module: (layer, is_program, [(imported package module, line)])} of a package tree."""
    trees = {}
    for path in sorted(root.rglob("*.py")):
        trees[module_name(root, path)] = ast.parse(path.read_text(), str(path))

    def resolve(target: str) -> str:
        """The package module an import names (`from a import b` may name module a.b)."""
        while target not in trees:
            target = target.rpartition(".")[0]
        return target

    graph = {}
    for name, tree in trees.items():
        imports = []
        for node in ast.walk(tree):  # Every import, those inside functions included.
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            imports += [
                (resolve(t), node.lineno) for t in targets if t.split(".")[0] == "mixreorg_jax"
            ]
        program = is_program(tree)
        graph[name] = (layer_of(name, program), program, imports)
    return graph


def upward_imports(graph: dict, name: str) -> list[str]:
    layer, _, imports = graph[name]
    return [
        f"line {line}: {target} ({graph[target][0]})"
        for target, line in imports
        if graph[target][0] not in ALLOWED[layer]
    ]


def program_imports(graph: dict, name: str) -> list[str]:
    return [f"line {line}: {target}" for target, line in graph[name][2] if graph[target][1]]


def import_cycles(graph: dict) -> list[list[str]]:
    edges = {
        name: sorted({t for t, _ in imports} - {name}) for name, (_, _, imports) in graph.items()
    }
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in edges[node]:
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    return cycles


GRAPH = scan()


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_imports_run_downward(name):
    assert not upward_imports(GRAPH, name), (
        f"{name} ({GRAPH[name][0]}) imports upward: " + "; ".join(upward_imports(GRAPH, name))
    )


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_nothing_imports_a_program(name):
    found = program_imports(GRAPH, name)
    assert not found, f"{name} imports a program: " + "; ".join(found)


def test_programs_sit_at_the_top():
    misplaced = [n for n, (layer, program, _) in GRAPH.items() if program and layer != "programs"]
    assert not misplaced, f"library modules with a __main__ block: {misplaced}"


def test_no_import_cycles():
    cycles = import_cycles(GRAPH)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_checks_catch_deferred_upward_imports_program_imports_and_cycles(tmp_path):
    files = {
        "__init__.py": "",
        "train.py": "def main():\n    pass\n\n\nif __name__ == '__main__':\n    main()\n",
        "models/__init__.py": "",
        "models/net.py": "def f():\n    from mixreorg_jax import train  # deferred\n",
        "evaluation/__init__.py": "",
        "evaluation/a.py": "from mixreorg_jax.evaluation import b\n",
        "evaluation/b.py": "def g():\n    import mixreorg_jax.evaluation.a\n",
    }
    for relative, text in files.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(text)
    graph = scan(tmp_path)
    assert upward_imports(graph, "mixreorg_jax.models.net") == [
        "line 2: mixreorg_jax.train (programs)"
    ]
    assert program_imports(graph, "mixreorg_jax.models.net") == ["line 2: mixreorg_jax.train"]
    assert import_cycles(graph) == [
        ["mixreorg_jax.evaluation.a", "mixreorg_jax.evaluation.b", "mixreorg_jax.evaluation.a"]
    ]
