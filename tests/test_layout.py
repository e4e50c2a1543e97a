"""The repository's layout (the README's file tables): the four scripts at the top, their support in the package v2a_utils/,
which imports no script, and no import circle among the project's modules. Read from the import statements alone
(those inside functions too), so that nothing is run."""
import ast
import glob
import os

from conftest import ROOT

SCRIPTS = ("benchmark", "data_gen", "v2a_iql", "v2a_td3bc")
PACKAGE = "v2a_utils"


def project_modules() -> dict:
    """Module name -> file, for the scripts at the top and the package's modules."""
    files = glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, PACKAGE, "**", "*.py"), recursive=True)
    names = {os.path.relpath(f, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__"): f for f in files}
    return dict(sorted(names.items()))


def imports(module: str, path: str, modules: dict) -> set:
    """The project's modules that `module` imports: `import a.b`, `from a import b` (b a module or a name of a), and
    relative imports."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: counted from the package that holds `module`
                package = module.split(".") if path.endswith("__init__.py") else module.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:  # a name inside a module: the module
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def graph() -> dict:
    modules = project_modules()
    return {m: imports(m, f, modules) for m, f in modules.items()}


def test_the_top_level_holds_the_four_scripts():
    assert sorted(os.path.basename(f)[:-3] for f in glob.glob(os.path.join(ROOT, "*.py"))) == sorted(SCRIPTS)


def test_the_package_imports_no_script():
    up = {m: sorted(deps & set(SCRIPTS)) for m, deps in graph().items() if m.split(".")[0] == PACKAGE}
    assert not {m: s for m, s in up.items() if s}, "a module of the package imports a script (pass it in instead)"


def circles(g: dict) -> list[str]:
    """The import circles of a graph (module -> the modules it imports), each as "a -> b -> a"."""
    state, found = {}, []

    def visit(m: str, path: list):  # path: the modules being visited, m last
        state[m] = "open"
        for d in sorted(g[m]):
            if state.get(d) == "open":  # back to a module on the path: a circle
                found.append(" -> ".join(path[path.index(d):] + [d]))
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in g:
        if m not in state:
            visit(m, [m])
    return found


def test_no_import_circle():
    assert not (found := circles(graph())), f"import circles: {'; '.join(found)} (a helper should not import back)"


def test_no_file_over_800_lines():
    long = {os.path.relpath(f, ROOT): n for f in project_modules().values() if (n := len(open(f).readlines())) > 800}
    assert not long, f"over 800 lines: {long} (the design: about 600 readable lines a script)"


def test_the_graph_sees_an_import_circle(tmp_path):
    """The check itself: a circle through a name import and a function-level import is found."""
    (tmp_path / "a.py").write_text("from b import x\n")
    (tmp_path / "b.py").write_text("def x():\n    import a\n")
    modules = {"a": str(tmp_path / "a.py"), "b": str(tmp_path / "b.py")}
    assert imports("a", modules["a"], modules) == {"b"} and imports("b", modules["b"], modules) == {"a"}


def test_the_checks_see_a_circle(tmp_path):
    """The checks themselves: a circle through a name import and a function-level import is found."""
    (tmp_path / "a.py").write_text("from b import x\n")
    (tmp_path / "b.py").write_text("def x():\n    import a\n")
    modules = {"a": str(tmp_path / "a.py"), "b": str(tmp_path / "b.py")}
    assert circles({m: imports(m, f, modules) for m, f in modules.items()}) == ["a -> b -> a"]
