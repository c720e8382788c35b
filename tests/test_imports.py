"""The library's import graph, read statically (``ast``), imports at module level and
inside functions alike: no module of ``polyjax`` imports another that imports it
back, and the pure activations load no kernel."""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def modules(root: pathlib.Path, package: str) -> dict[str, pathlib.Path]:
    """Dotted module name -> file, for every ``.py`` under ``root / package``."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph(root: pathlib.Path, package: str) -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports, anywhere in its body. A
    submodule's import also runs its packages' ``__init__``, but for the packages
    the importing module is itself in (those are running already)."""
    mods = modules(root, package)
    graph = {}
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package of this module
                    here = name.split(".") if is_pkg else name.split(".")[:-1]
                    anchor = here[: len(here) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.add(sub if sub in mods else base)
        own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        edges = {t for t in targets if t in mods}
        for target in targets:
            parts = target.split(".")
            edges.update(".".join(parts[:i]) for i in range(1, len(parts)))
        graph[name] = {e for e in edges if e in mods and (e in targets or e not in own)} - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as a path [a, b, ..., a], or None."""
    done, path = set(), []

    def visit(node):
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if cycle := visit(nxt):
                return cycle
        path.pop()
        done.add(node)
        return None

    return next((c for node in sorted(graph) if (c := visit(node))), None)


def test_the_walker_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text("def f():\n    from pkg.sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from .. import c\n")
    (pkg / "c.py").write_text("import pkg.a as a\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.a"] == {"pkg.sub", "pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.c"}
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]
    (pkg / "c.py").write_text("")
    assert find_cycle(import_graph(tmp_path, "pkg")) is None


def test_polyjax_has_no_import_cycle():
    graph = import_graph(ROOT, "polyjax")
    assert {"polyjax.config", "polyjax.checkpoint"} <= graph["polyjax.train"]  # it reads
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_activations_load_no_kernel():
    """``import polyjax.activations`` loads no kernel module, and nothing in it
    (no function either) imports one."""
    code = "import sys, polyjax.activations; print([m for m in sys.modules if 'kernels' in m])"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "[]", run.stderr
    edges = import_graph(ROOT, "polyjax")["polyjax.activations"]
    assert not [m for m in edges if m.startswith("polyjax.kernels")], edges
