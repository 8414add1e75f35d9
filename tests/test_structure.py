"""The codebase's shape, held by tests: small classes and functions, no import
cycles, no lazy imports inside the package, and no module reading another
module's private names (the tests and benchmarks included: they use the public
engine API)."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gpubackprop"
MAX_CLASS, MAX_FUNCTION = 300, 60
NAMEDTUPLE_API = {"_replace", "_asdict", "_fields", "_make"}  # public despite the underscore


def sources(*folders):
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def module_name(path):
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def tree(path):
    return ast.parse(path.read_text(), str(path))


def test_no_class_over_300_lines_and_no_function_over_60():
    too_long = []
    for path in sources("gpubackprop"):
        for node in ast.walk(tree(path)):
            limit = MAX_CLASS if isinstance(node, ast.ClassDef) else MAX_FUNCTION
            if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.end_lineno - node.lineno + 1 > limit:
                too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: "
                                f"{node.end_lineno - node.lineno + 1} lines > {limit}")
    assert not too_long, "\n".join(too_long)


def imported_modules(path, node):
    """The gpubackprop modules an import statement names."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "gpubackprop"]
    if node.level:  # relative: from the importing module's package
        package = module_name(path).split(".")
        package = package[:len(package) - node.level + (path.name == "__init__.py")]
        base = ".".join(package + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    if base.split(".")[0] != "gpubackprop":
        return []
    return [f"{base}.{a.name}" if (ROOT / f"{base}.{a.name}".replace(".", "/")).exists()
            or (ROOT / (f"{base}.{a.name}".replace(".", "/") + ".py")).exists() else base for a in node.names]


def module_level(statements):
    """The statements run on import: the module's own, and those of its top-level
    try blocks (an optional dependency's import)."""
    for node in statements:
        yield node
        if isinstance(node, ast.Try):
            yield from module_level(node.body + [s for h in node.handlers for s in h.body] + node.orelse)


def import_graph():
    graph, lazy = {}, []
    for path in sources("gpubackprop"):
        name = module_name(path)
        body = tree(path)
        top = [n for n in module_level(body.body) if isinstance(n, (ast.Import, ast.ImportFrom))]
        graph[name] = {m for n in top for m in imported_modules(path, n)} - {name}
        for node in ast.walk(body):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and node not in top and imported_modules(path, node):
                lazy.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return graph, lazy


def test_no_import_cycle_and_no_lazy_import_inside_the_package():
    graph, lazy = import_graph()
    assert not lazy, f"imports of the package inside functions: {lazy}"

    def parents(module):  # importing a.b.c runs a/__init__ and a/b/__init__ first
        parts = module.split(".")
        return {".".join(parts[:i]) for i in range(1, len(parts))}

    # ... except those the importer is inside: they are being imported already.
    edges = {m: {d for dep in deps for d in (parents(dep) - parents(m)) | {dep} if d in graph and d != m}
             for m, deps in graph.items()}
    state = {}

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(edges[m]):
            if state.get(d) == "open":
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(d):] + [m, d]))
            if d not in state:
                visit(d, stack + [m] if m not in stack else stack)
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [])


def assigned(node):
    """The names and attributes an assignment target binds."""
    if isinstance(node, (ast.Tuple, ast.List)):
        return {n for e in node.elts for n in assigned(e)}
    return {node.attr} if isinstance(node, ast.Attribute) else {node.id} if isinstance(node, ast.Name) else set()


def private_reads(path):
    """``x._name`` (x not self, cls or super()) and ``from m import _name``, where _name
    is not defined in this file."""
    body = tree(path)
    own = {n.name for n in ast.walk(body) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    own |= {name for n in ast.walk(body) if isinstance(n, ast.Assign) for t in n.targets for name in assigned(t)}
    found = []
    for node in ast.walk(body):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            mine = (isinstance(base, ast.Name) and base.id in ("self", "cls")) or (
                isinstance(base, ast.Call) and isinstance(base.func, ast.Name) and base.func.id == "super")
            if not mine and node.attr not in own and node.attr not in NAMEDTUPLE_API:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)}")
        elif isinstance(node, ast.Call) and ast.unparse(node.func).split(".")[-1] in ("setattr", "getattr") \
                and len(node.args) > 1 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
            name = node.args[1].value  # monkeypatch.setattr(module, "_name", ...) reads a private name too
            if name.startswith("_") and not name.startswith("__") and name not in own:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)[:60]}")
        elif isinstance(node, ast.ImportFrom):
            found += [f"{path.relative_to(ROOT)}:{node.lineno} from {node.module} import {a.name}"
                      for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    return found


def test_no_module_reads_another_modules_private_names():
    found = [f for path in sources("gpubackprop", "tests", "bench") for f in private_reads(path)]
    assert not found, "\n".join(found)


def test_every_subpackage_is_in_the_wheel():
    """pyproject lists the packages setuptools ships: a folder missing there is
    missing from an installed (not editable) gpubackprop."""
    tomllib = pytest.importorskip("tomllib")
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {module_name(p.parent / "__init__.py") for p in PACKAGE.rglob("__init__.py")}
    assert folders <= listed, f"not in pyproject's packages: {sorted(folders - listed)}"
