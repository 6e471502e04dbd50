"""The method contract holds in the code itself: no method name is written outside its own package,
methods import no private name of another method, and spec validation needs no torch. (Layers
between the packages are import-linter's contracts in pyproject.toml, run by `make test`.)"""

import ast
import subprocess
import sys

from workers.methods import methods

from helpers import ROOT

PACKAGES = ("workers", "pipelines", "serve", "tune")
METHOD_DIR = ROOT / "workers" / "methods"


def _sources(root):
    return sorted(p for pkg in PACKAGES for p in (root / pkg).rglob("*.py"))


def _method_package(path):
    rel = path.relative_to(METHOD_DIR) if METHOD_DIR in path.parents else None
    return rel.parts[0] if rel is not None and len(rel.parts) > 1 else None


def test_no_method_name_outside_its_package():
    names = set(methods())
    hits = []
    for path in _sources(ROOT):
        if METHOD_DIR in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and node.value in names:
                hits.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert not hits, "method names outside their packages (ask the method instead):\n" + "\n".join(hits)


def test_methods_import_no_private_name_of_another_method():
    hits = []
    for path in sorted(METHOD_DIR.rglob("*.py")):
        own = _method_package(path)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith("workers.methods."):
                continue
            other = node.module.split(".")[2]
            private = [a.name for a in node.names if a.name.startswith("_")]
            if other != own and private and (METHOD_DIR / other).is_dir():
                hits.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.module} {private}")
    assert not hits, "\n".join(hits)


def test_no_hook_is_found_by_hasattr_on_a_method_module():
    """Capabilities are declarations: nothing asks a method module whether it has a hook."""
    hits = []
    for path in _sources(ROOT):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "hasattr" and len(node.args) == 2
                    and isinstance(node.args[1], ast.Constant)
                    and node.args[1].value in ("attach", "load", "add", "write_extra", "precheck")):
                hits.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not hits, hits


def test_validating_specs_imports_no_torch():
    specs = sorted(str(p) for p in (ROOT / "pipelines" / "examples").glob("*.yaml"))
    code = (
        "import sys\n"
        "from pipelines.spec import load_spec\n"
        "from workers.methods import methods\n"
        f"for path in {specs!r}:\n"
        "    load_spec(path)\n"
        "assert len(methods()) >= 8\n"
        "heavy = [m for m in ('torch', 'peft', 'transformers', 'deepspeed') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
