"""Python 3.9 (Slicer 5.8's, the minimum Slicer) runs the Slicer module and all of the library.

Three checks, from the one that always runs to the one that needs a Python 3.9 interpreter:

1. ``vermin`` (dev extra) over ``LumbarBMD/`` and ``LumbarBMDLib/``: no syntax, module, function or keyword argument
   newer than 3.9 (``zip(strict=)``, ``itertools.pairwise``, ``dataclass(slots=)``, ``match``, ``tomllib``, …).
2. An AST scan for what vermin reports only once per file or not at all: every ``zip(..., strict=...)`` and
   ``pairwise`` line, ``X | Y`` types evaluated at run time (``isinstance``, aliases, defaults, casts), ``|`` in
   annotations of a file without ``from __future__ import annotations``, or of a class whose hints are evaluated
   (``typing.get_type_hints``: the Slicer module's parameter node).
3. With a real Python 3.9 (``$LUMBARBMD_PYTHON39``, ``python3.9`` on the PATH, or pyenv's 3.9): every file compiled by
   the 3.9 compiler and every module imported (``Testing/python39_check.py``; third-party packages stood in for).
   CI machines may have no Python 3.9: then this test is skipped and says so (``-ra`` lists the reason): 1 and 2 ran.
"""

from __future__ import annotations

import ast
import glob
import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from LumbarBMDLib import _compat

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("LumbarBMD", "LumbarBMDLib")
CHECKER = "Testing/python39_check.py"  # runs under 3.9 itself, so it is checked too


def _files() -> list[str]:
    files = [p.relative_to(ROOT).as_posix() for folder in FOLDERS for p in sorted((ROOT / folder).rglob("*.py"))]
    return [*files, CHECKER]


def test_vermin_finds_nothing_newer_than_python39():
    cmd = [sys.executable, "-c", "import sys, vermin; sys.exit(vermin.main())",
           "--target=3.9-", "--violations", "--eval-annotations", "--no-tips", "--no-config-file",
           "--no-make-paths-absolute", "--format", "parsable", "--processes=1", *_files()]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if "No module named 'vermin'" in run.stderr:
        pytest.fail("vermin is not installed: it is in the dev extra (pip install -e '.[dev]')")
    offending = [line for line in run.stdout.splitlines() if line and not line.startswith(":")]
    assert run.returncode == 0 and not offending, (
        "needs Python > 3.9 (Slicer 5.8 ships 3.9; use LumbarBMDLib/_compat.py's zip_strict / pairwise, "
        "isinstance(x, (A, B)), …):\n" + "\n".join(offending or [run.stdout, run.stderr])
    )


_TYPE_NAMES = {"int", "float", "complex", "str", "bytes", "bool", "list", "dict", "tuple", "set", "frozenset", "type",
               "object", "Path"}


def _looks_like_a_type(node: ast.AST) -> bool:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _looks_like_a_type(node.left) or _looks_like_a_type(node.right)
    if isinstance(node, ast.Constant):
        return node.value is None
    if isinstance(node, ast.Subscript):  # list[int], Optional[...]
        return True
    name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else ""
    return name in _TYPE_NAMES or (name[:1].isupper() and not name.isupper() and "_" not in name)  # CamelCase class


def _annotations(tree: ast.AST) -> list[tuple[ast.AST, ast.AST]]:
    """(annotation, owner) pairs: owner is the function, or the class / module of an annotated assignment."""
    pairs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            args = [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg]
            pairs += [(arg.annotation, node) for arg in args if arg is not None and arg.annotation is not None]
            pairs += [(node.returns, node)] if node.returns is not None else []
        elif isinstance(node, (ast.ClassDef, ast.Module)):
            pairs += [(s.annotation, node) for s in node.body if isinstance(s, ast.AnnAssign)]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):  # a local variable's is never evaluated
            pairs += [(s.annotation, None) for s in ast.walk(node) if isinstance(s, ast.AnnAssign)]
    return pairs


def _is_itertools_pairwise(node: ast.AST) -> bool:
    if isinstance(node, ast.Attribute):
        return node.attr == "pairwise" and isinstance(node.value, ast.Name) and node.value.id == "itertools"
    return (isinstance(node, ast.ImportFrom) and node.module == "itertools"
            and any(a.name == "pairwise" for a in node.names))


def _py310_lines(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text, filename=str(path))
    rel = path.relative_to(ROOT).as_posix()
    lazy = any(isinstance(n, ast.ImportFrom) and n.module == "__future__"
               and any(a.name == "annotations" for a in n.names) for n in tree.body)
    exempt = {i for i, line in enumerate(text.splitlines(), start=1) if "# novm" in line}  # as vermin: on 3.10+ only
    hints_evaluated = "get_type_hints" in text
    found = []
    in_annotation: set[int] = set()
    for annotation, owner in _annotations(tree):
        unions = [n for n in ast.walk(annotation) if isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr)]
        in_annotation.update(id(n) for n in ast.walk(annotation))
        if owner is None:
            continue
        if unions and (not lazy or (hints_evaluated and isinstance(owner, ast.ClassDef))):
            why = "evaluated by typing.get_type_hints" if lazy else "no `from __future__ import annotations`"
            found.append(f"{rel}:{annotation.lineno}: `X | Y` in an annotation ({why}): use Optional / Union")
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id == "zip" and any(k.arg == "strict" for k in node.keywords):
                found.append(f"{rel}:{node.lineno}: zip(strict=) is Python 3.10: use _compat.zip_strict")
            if isinstance(func, ast.Name) and func.id in ("isinstance", "issubclass") and len(node.args) == 2:
                if isinstance(node.args[1], ast.BinOp) and isinstance(node.args[1].op, ast.BitOr):
                    found.append(f"{rel}:{node.lineno}: {func.id}(x, A | B) is Python 3.10: use (A, B)")
        elif _is_itertools_pairwise(node):
            found.append(f"{rel}:{node.lineno}: itertools.pairwise is Python 3.10: use _compat.pairwise")
        elif (isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr) and id(node) not in in_annotation
              and _looks_like_a_type(node.left) and _looks_like_a_type(node.right)):
            found.append(f"{rel}:{node.lineno}: `{ast.get_source_segment(text, node)}` evaluated at run time "
                         "(a type union is Python 3.10): use Optional / Union / a tuple")
    found = [line for line in found if int(line.split(":")[1]) not in exempt]
    return sorted(set(found), key=lambda line: (line.split(":")[0], int(line.split(":")[1])))


def test_no_python310_construct_that_vermin_reports_once_or_misses():
    found = [line for name in _files() for line in _py310_lines(ROOT / name)]
    assert not found, "needs Python > 3.9 (Slicer 5.8 ships 3.9):\n" + "\n".join(found)


def test_the_scan_finds_what_it_looks_for(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from __future__ import annotations\n"
        "import itertools, typing\n"
        "Opt = int | None\n"
        "ok = isinstance(1, int | float)\n"
        "pairs = list(zip([1], [2], strict=True))\n"
        "steps = list(itertools.pairwise([1, 2]))\n"
        "flags = 1 | 2\n"  # an integer or, not a type
        "def f(x: int | None = None) -> str | None: ...\n"  # lazy annotations: fine
        "class P:\n    x: int | None = None\n"  # evaluated: this file calls typing.get_type_hints
        "typing.get_type_hints(P)\n"
        "def g():\n    y: int | None = None\n"  # a local variable's annotation: never evaluated
        "z = itertools.pairwise([1])  # novm\n",  # exempt, as in vermin (a branch for Python >= 3.10)
        encoding="utf-8",
    )
    lines = [line.split(":")[1] for line in _py310_lines(bad)]
    assert lines == ["3", "4", "4", "5", "6", "10"], _py310_lines(bad)
    eager = tmp_path / "eager.py"
    eager.write_text("def f(x: int | None = None): ...\n", encoding="utf-8")
    assert [line.split(":")[1] for line in _py310_lines(eager)] == ["1"]


@pytest.mark.parametrize("args", [(), ([1, 2], "ab"), ([1], [2, 3]), ([1, 2], [3]), ([1, 2], [3, 4], [5]),
                                  ([1], [2], [3, 4]), ([], [], []), (iter(range(3)), range(3))])
def test_zip_strict_on_python39_is_zip_strict(args):
    """The pure-Python stand-in that 3.9 runs gives the built-in's tuples and its ValueError (same message)."""
    def outcome(zipper, a):
        try:
            return list(zipper(*a))
        except ValueError as e:
            return f"ValueError: {e}"

    copies = [tuple(itertools.tee(a)) if not isinstance(a, (list, str)) else (a, a) for a in args]
    ours, builtin = [c[0] for c in copies], [c[1] for c in copies]
    assert outcome(_compat._zip_strict, ours) == outcome(lambda *a: zip(*a, strict=True), builtin)


@pytest.mark.parametrize("items", ["", "a", "ab", "abcd"])
def test_pairwise_on_python39_is_pairwise(items):
    assert list(_compat._pairwise(items)) == list(itertools.pairwise(items))


def _python39() -> str | None:
    """A Python 3.9 interpreter: $LUMBARBMD_PYTHON39, python3.9 on the PATH, or one of pyenv's versions."""
    candidates = [os.environ.get("LUMBARBMD_PYTHON39"), shutil.which("python3.9")]
    roots = [os.environ.get("PYENV_ROOT"), str(Path.home() / ".pyenv")]
    if shutil.which("pyenv"):
        got = subprocess.run(["pyenv", "root"], capture_output=True, text=True, timeout=30)
        roots.insert(0, got.stdout.strip() if got.returncode == 0 else None)
    for root in filter(None, roots):
        candidates += sorted(glob.glob(os.path.join(root, "versions", "3.9*", "bin", "python3.9")), reverse=True)
    for candidate in filter(None, candidates):
        try:
            got = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 9))"],
                                 capture_output=True, text=True, timeout=30)
        except OSError:
            continue
        if got.stdout.strip() == "True":  # a pyenv shim without a 3.9 selected fails here
            return candidate
    return None


def test_compiles_and_imports_under_a_real_python39(tmp_path):
    python = _python39()
    if python is None:
        pytest.skip("no Python 3.9 interpreter ($LUMBARBMD_PYTHON39, python3.9, pyenv): only the vermin and AST "
                    "checks ran, not the compile and import under 3.9")
    stdlib = tmp_path / "stdlib.txt"
    stdlib.write_text("\n".join(sorted(sys.stdlib_module_names)), encoding="utf-8")
    run = subprocess.run([python, "-B", CHECKER, str(ROOT), str(stdlib), *_files()], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, f"under {python}:\n{run.stdout}{run.stderr}"
    assert run.stdout.startswith("ok:"), run.stdout
