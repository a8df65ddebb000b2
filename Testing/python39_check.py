"""Run by ``Testing/test_python39.py`` under a real Python 3.9 (Slicer 5.8's): compile every file, import every module.

Usage: ``python3.9 -B Testing/python39_check.py ROOT STDLIB_NAMES_FILE FILE...``. Every FILE is compiled by the 3.9
compiler (syntax: ``match``, ``except*``, PEP 701 f-strings, …). Then every module of ``LumbarBMDLib`` and the Slicer
module ``LumbarBMD/LumbarBMD.py`` is imported, which runs their module-level code under 3.9 (class bodies,
decorators, dataclasses, constants, default values). The Python 3.9 interpreter has none of the third-party packages
(numpy, torch, Slicer, …): those are stand-ins that accept anything. A name of the standard library (the list of the
Python running the test, in STDLIB_NAMES_FILE) is never stood in for, so a module that 3.9 lacks (``tomllib``) fails.
Prints one line per problem and exits 1 if there is any. This file itself must run on Python 3.9.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import traceback
import types
from pathlib import Path

_NAMED: dict = {}


def _named(qualname: str) -> type:
    """One stand-in class per qualified name (two stand-ins as base classes of one class must differ)."""
    if qualname not in _NAMED:
        _NAMED[qualname] = _StubMeta(qualname.rpartition(".")[2], (_Stub,), {"_qualname": qualname})
    return _NAMED[qualname]


class _StubMeta(type):
    """Metaclass of the stand-in: the class itself also accepts any attribute, call, operator or subscript."""

    def __getattr__(cls, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _named(f"{cls.__dict__.get('_qualname', cls.__name__)}.{name}")

    def __getitem__(cls, key):
        return _Stub

    def __or__(cls, other):
        return _Stub

    __ror__ = __or__

    def __iter__(cls):
        return iter(())


def _operator(*_args, **_kwargs):
    return _Stub()


class _Stub(metaclass=_StubMeta):
    """Anything from a third-party package: callable, subclassable, usable in arithmetic and as a decorator."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _Stub()

    def __call__(self, *args, **kwargs):
        return _Stub()

    def __getitem__(self, key):
        return _Stub()

    def __iter__(self):
        return iter(())

    def __bool__(self):
        return True

    def __float__(self):
        return 1.0

    def __int__(self):
        return 1

    __index__ = __int__

    def __len__(self):
        return 0

    def __hash__(self):
        return 0

    def __eq__(self, other):
        return False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __rtruediv__ = _operator
    __floordiv__ = __rfloordiv__ = __pow__ = __rpow__ = __mod__ = __rmod__ = __matmul__ = __rmatmul__ = _operator
    __neg__ = __pos__ = __abs__ = __invert__ = __and__ = __rand__ = __or__ = __ror__ = _operator
    __lt__ = __le__ = __gt__ = __ge__ = _operator


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _named(f"{self.__name__}.{name}")


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Last on ``sys.meta_path``: stands in for any module that is not found and is not in the standard library."""

    def __init__(self, stdlib: set[str], own: set[str]):
        self.stdlib, self.own = stdlib, own

    def find_spec(self, fullname, path=None, target=None):
        top = fullname.partition(".")[0]
        if top in self.stdlib or top in self.own:
            return None
        return importlib.util.spec_from_loader(fullname, self, is_package=True)

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def _check_compat(compat: types.ModuleType) -> list[str]:
    """``zip_strict`` and ``pairwise`` as 3.9 runs them: the same tuples as the built-ins, a ValueError on lengths."""
    problems = []
    if list(compat.zip_strict([1, 2], "ab")) != [(1, "a"), (2, "b")] or list(compat.pairwise("abc")) != [
        ("a", "b"),
        ("b", "c"),
    ]:
        problems.append("LumbarBMDLib/_compat.py: zip_strict / pairwise give other tuples than the built-ins")
    for args in (([1, 2], [3]), ([1], [2, 3]), ([1], [2], [])):
        try:
            list(compat.zip_strict(*args))
        except ValueError:
            continue
        problems.append(f"LumbarBMDLib/_compat.py: zip_strict{args} raised no ValueError on Python 3.9")
    return problems


def main(argv: list[str]) -> int:
    root = Path(argv[0])
    stdlib = set(Path(argv[1]).read_text(encoding="utf-8").split())
    problems = []
    for name in argv[2:]:
        path = root / name
        try:
            compile(path.read_bytes(), str(path), "exec", dont_inherit=True)
        except SyntaxError as e:
            problems.append(f"{name}:{e.lineno}: does not compile on Python {sys.version.split()[0]}: {e.msg}")
    if problems:  # importing would only repeat them
        print("\n".join(problems))
        return 1

    sys.path[:0] = [str(root), str(root / "LumbarBMD")]
    sys.meta_path.append(_StubFinder(stdlib, {"LumbarBMDLib", "LumbarBMD"}))
    modules = sorted(
        ".".join(p.relative_to(root).with_suffix("").parts).replace(".__init__", "")
        for p in (root / "LumbarBMDLib").rglob("*.py")
    )
    modules.append("LumbarBMD")  # LumbarBMD/LumbarBMD.py, as Slicer loads it (its folder on sys.path)
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as e:
            frame = traceback.extract_tb(e.__traceback__)[-1]
            where = Path(frame.filename)
            where = where.relative_to(root) if root in where.parents else where
            problems.append(f"{where}:{frame.lineno}: importing {module} on Python {sys.version.split()[0]}: "
                            f"{type(e).__name__}: {e}")
    compat = sys.modules.get("LumbarBMDLib._compat")
    if compat is not None:  # the 3.9 stand-ins themselves, on 3.9
        problems += _check_compat(compat)
    print("\n".join(problems) if problems else f"ok: {len(argv) - 2} files compiled, {len(modules)} modules imported")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
