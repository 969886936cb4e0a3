"""The subpackages of flaxtune form a layered graph with no cycles.

Every module under ``flaxtune/`` is parsed (not imported) with ``ast``; each
``import flaxtune...`` / ``from flaxtune... import ...`` statement, at module
level or inside a function, is an edge from the importing module's node to
the imported one's. A node is a subpackage (``quant``, ``peft``, ...), a
module at the top of the package (``module_param``, ``matmul``,
``version``), or ``flaxtune`` itself: the package's ``__init__``, which
re-exports the names most scripts start from and so sits above what it
re-exports.

The intended graph, bottom to top (an arrow is "may import")::

    errors                              the exception classes, imported by any node
    module_param, matmul, version       primitives, import nothing from flaxtune but errors
    quant        -> module_param, matmul
    peft         -> module_param, matmul, quant
    transformer  -> module_param, matmul, quant, peft
    data                                independent of the model code
    eval         -> version             independent of the model code
    train        -> quant, peft, transformer, data, eval, interop
                                        (interop: init_from reads imported and
                                        Hugging Face checkpoints)
    interop      -> transformer, peft
    generate     -> transformer, peft, quant, data, eval, train, interop
    flaxtune     -> peft, transformer, version, generate   (the package's own __init__)

A package's ``__main__`` module (its command line) is a node of its own,
``<package>.__main__``, above everything: nothing imports it, so it may
import any node without making a cycle. ``python -m flaxtune.interop export
--run-dir`` reads a training run with ``flaxtune.generate``'s loader, which
itself reads Hugging Face directories through interop.

Three properties are checked: every edge is one of the intended ones; the
intended graph has no cycle (so neither does the real one); no module imports
a flaxtune module inside a function. Function-local imports hide a
dependency from the reader and from this test's "module level" reading, and
they are how a wrong-way import usually creeps in (a lower package reaching
up "just for this one function"). Optional third-party dependencies (torch,
transformers, tensorflow_datasets) may still be imported inside functions;
only flaxtune's own modules are held to this.
"""

from __future__ import annotations

import ast
import pathlib
from collections.abc import Iterator

import pytest

PACKAGE_DIR = pathlib.Path(__file__).resolve().parents[1] / "flaxtune"

# node -> the nodes it may import directly.
INTENDED: dict[str, set[str]] = {
    "errors": set(),
    "module_param": set(),
    "matmul": set(),
    "version": set(),
    "quant": {"module_param", "matmul"},
    "peft": {"module_param", "matmul", "quant"},
    "transformer": {"module_param", "matmul", "quant", "peft"},
    "data": set(),
    "eval": {"version"},
    # interop: init_from and load_pretrained read imported and Hugging Face checkpoints.
    "train": {"quant", "peft", "transformer", "data", "eval", "interop"},
    # peft: a merged export folds LoRA/DoRA with peft.merge and prefixes with fold_prefix.
    "interop": {"transformer", "peft"},
    # generate: loads run dirs (train), import and HF dirs (interop), scores with eval.
    "generate": {"transformer", "peft", "quant", "data", "eval", "train", "interop"},
    # flaxtune.load and generate_texts are the top-level entry points.
    "flaxtune": {"peft", "transformer", "version", "generate"},
    # Command lines (see the module docstring): nothing imports them.
    "eval.__main__": {"eval"},
    "interop.__main__": {"interop", "generate", "transformer"},
    "generate.__main__": {"generate", "eval"},
}

# Every node may raise flaxtune's exceptions: ``errors`` is the bottom layer.
for _node, _allowed in INTENDED.items():
    if _node != "errors":
        _allowed.add("errors")

# (module, imported module) pairs allowed inside a function, with the reason.
# Empty: there is no justified case today.
FUNCTION_LOCAL_EXCEPTIONS: dict[tuple[str, str], str] = {}


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def node_of(module: str) -> str:
    """``flaxtune.quant.qdot`` -> ``quant``, ``flaxtune.matmul`` -> ``matmul``, ``flaxtune``;
    a command line ``flaxtune.interop.__main__`` -> ``interop.__main__``."""
    parts = module.split(".")
    if len(parts) == 3 and parts[2] == "__main__":
        return f"{parts[1]}.__main__"
    return parts[1] if len(parts) > 1 else parts[0]


def is_package(module: str) -> bool:
    return (PACKAGE_DIR.parent / module.replace(".", "/") / "__init__.py").exists()


def imported_modules(node: ast.Import | ast.ImportFrom, importer: str) -> Iterator[str]:
    """The flaxtune modules an import statement loads (absolute names)."""
    if isinstance(node, ast.Import):
        yield from (a.name for a in node.names if a.name.split(".")[0] == "flaxtune")
        return
    base = node.module or ""
    if node.level:  # relative: resolve against the importing module's package
        package = importer if is_package(importer) else importer.rsplit(".", 1)[0]
        anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join([*anchor, base] if base else anchor)
    if base.split(".")[0] != "flaxtune":
        return
    for alias in node.names:
        # ``from flaxtune import peft`` loads the subpackage; ``from flaxtune
        # import __version__`` loads the package's __init__ only.
        candidate = f"{base}.{alias.name}"
        yield candidate if is_package(candidate) or _is_module(candidate) else base


def _is_module(module: str) -> bool:
    return (PACKAGE_DIR.parent / (module.replace(".", "/") + ".py")).exists()


def scan(path: pathlib.Path) -> Iterator[tuple[str, int, bool]]:
    """``(imported module, line, inside a function)`` for each flaxtune import of a file."""
    importer = module_name(path)
    tree = ast.parse(path.read_text(), filename=str(path))

    def visit(node: ast.AST, in_function: bool) -> Iterator[tuple[str, int, bool]]:
        if isinstance(node, ast.Import | ast.ImportFrom):
            for target in dict.fromkeys(imported_modules(node, importer)):
                yield target, node.lineno, in_function
        inner = in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        for child in ast.iter_child_nodes(node):
            yield from visit(child, inner)

    yield from visit(tree, False)


def all_imports() -> list[tuple[str, str, int, bool]]:
    """``(importer, imported, line, inside a function)`` over every module of flaxtune."""
    out = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        importer = module_name(path)
        out.extend((importer, target, line, local) for target, line, local in scan(path))
    return out


def edges() -> dict[tuple[str, str], list[str]]:
    """Node-level edges, each with the ``module:line`` statements that make it."""
    out: dict[tuple[str, str], list[str]] = {}
    for importer, target, line, _ in all_imports():
        source, dest = node_of(importer), node_of(target)
        if source != dest:
            out.setdefault((source, dest), []).append(f"{importer}:{line} imports {target}")
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes, or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for dest in sorted(graph.get(node, ())):
            if state.get(dest) == "open":
                return [*stack[stack.index(dest) :], dest]
            if dest not in state and (cycle := visit(dest)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_every_node_is_in_the_intended_graph():
    nodes = {node_of(module_name(p)) for p in PACKAGE_DIR.rglob("*.py")}
    assert nodes == set(INTENDED), (
        f"nodes without an entry in INTENDED: {sorted(nodes - set(INTENDED))}; "
        f"entries without a module: {sorted(set(INTENDED) - nodes)}"
    )


def test_the_intended_graph_is_acyclic():
    assert find_cycle(INTENDED) is None, f"INTENDED has a cycle: {find_cycle(INTENDED)}"


def test_every_import_follows_the_intended_graph():
    wrong = {
        edge: sites for edge, sites in edges().items() if edge[1] not in INTENDED.get(edge[0], ())
    }
    report = "\n".join(
        f"{src} -> {dst}:\n    " + "\n    ".join(sites)
        for (src, dst), sites in sorted(wrong.items())
    )
    assert not wrong, f"imports against the intended layering:\n{report}"


def test_the_real_graph_is_acyclic():
    graph: dict[str, set[str]] = {}
    for source, dest in edges():
        graph.setdefault(source, set()).add(dest)
    assert find_cycle(graph) is None, f"import cycle between subpackages: {find_cycle(graph)}"


def test_no_flaxtune_import_inside_a_function():
    local = [
        f"{importer}:{line} imports {target}"
        for importer, target, line, inside in all_imports()
        if inside and (importer, target) not in FUNCTION_LOCAL_EXCEPTIONS
    ]
    assert not local, "flaxtune modules imported inside functions:\n" + "\n".join(local)


def test_command_lines_are_nodes_that_nothing_imports():
    assert node_of("flaxtune.interop.__main__") == "interop.__main__"
    assert node_of("flaxtune.interop.peft_export") == "interop"
    assert not [n for deps in INTENDED.values() for n in deps if n.endswith(".__main__")]


@pytest.mark.parametrize(
    ("statement", "expected"),
    [
        ("from flaxtune.quant.qdot import qdot", ["flaxtune.quant.qdot"]),
        ("from flaxtune import peft as peft_lib", ["flaxtune.peft"]),
        ("from flaxtune import __version__", ["flaxtune"]),
        ("import flaxtune.train.loop", ["flaxtune.train.loop"]),
        (
            "from flaxtune.data import bundled, make_loader",
            ["flaxtune.data.bundled", "flaxtune.data"],
        ),
        ("from . import rouge", ["flaxtune.eval.rouge"]),
        ("from .rouge import rouge", ["flaxtune.eval.rouge"]),
        ("from ..transformer import get_config", ["flaxtune.transformer"]),
        ("import numpy as np", []),
    ],
)
def test_import_statements_resolve_to_modules(statement, expected):
    node = ast.parse(statement).body[0]
    assert list(imported_modules(node, "flaxtune.eval.bleu")) == expected
