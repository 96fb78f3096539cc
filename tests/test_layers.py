"""The layers stay layers: who may import whom, what each package says it owns,
and how long a module may grow.

Every module under ``upvoot/`` is read with ``ast`` (nothing is imported):
``import`` and ``from ... import`` statements at any depth (inside functions
and ``if TYPE_CHECKING:`` blocks too, relative ones resolved), and
``importlib.import_module("...")`` / ``__import__("...")`` with a literal
name. ``RULES`` is the table of what each package must never import; it
mirrors the package docstrings, and a test checks that each docstring names
every entry of its row.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "upvoot"

#: package -> what no module in it may import (a module, or any module below it)
RULES: dict[str, tuple[str, ...]] = {
    "upvoot.call": (
        "upvoot.daemon", "upvoot.framing", "upvoot.ledger", "upvoot.dial",
        "autobahn", "sqlite3",
        "twisted.internet.reactor",  # the global reactor: time comes from an injected IReactorTime
    ),
    "upvoot.framing": (
        "upvoot.call", "upvoot.daemon", "upvoot.ledger", "upvoot.engines", "upvoot.dial",
        "autobahn", "twisted",
    ),
    "upvoot.engines": (
        "upvoot.daemon", "upvoot.call", "upvoot.framing", "upvoot.ledger", "upvoot.dial", "autobahn",
    ),
    "upvoot.ledger": ("upvoot.daemon", "upvoot.framing", "upvoot.dial", "autobahn"),
    "upvoot.dial": ("upvoot.daemon", "upvoot.call"),
    "upvoot.console": (
        "upvoot.daemon", "upvoot.framing", "upvoot.dial", "autobahn",
        "upvoot.call.core", "upvoot.call.machine", "upvoot.call.handle", "upvoot.call.speaking",
    ),
}

#: The daemon is the top of the tree: nothing outside it imports it, but for these.
DAEMON_IMPORTERS = {
    # test tooling, above the layers: make_agent builds the daemon's Agent (upvoot.daemon.agents)
    "upvoot.testing": ("upvoot.daemon.agents",),
}

#: How a docstring may name a forbidden import (case-insensitive).
DOC_NAMES = {
    "sqlite3": ("sqlite3", "database"),
    "twisted.internet.reactor": ("reactor",),
}

#: The phrases by which a package docstring states its import rule.
IMPORT_RULE = re.compile(r"\b(never|must not|may not)\b[^.]*\bimports?\b|nothing else may import", re.IGNORECASE | re.DOTALL)

PACKAGES = ("upvoot.call", "upvoot.framing", "upvoot.engines", "upvoot.daemon", "upvoot.ledger", "upvoot.dial",
            "upvoot.console")

MAX_LINES = 400

#: Modules allowed over MAX_LINES: "upvoot.x.y": "why it must be longer". None is, today;
#: an entry that is no longer needed fails test_the_long_module_allowances_are_still_needed.
LONG_MODULES: dict[str, str] = {}


# ---- reading the tree ---------------------------------------------------------------------------


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute name of ``from <level dots><name> import ...`` in ``module``."""
    if not level:
        return name or ""
    base = module.split(".")
    if not is_package:
        base.pop()
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def imports_of(module: str) -> list[tuple[int, str]]:
    path = MODULES[module]
    return imports_in(module, path.read_text(encoding="utf-8"), is_package=path.name == "__init__.py")


def imports_in(module: str, source: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, imported module) for every import in ``source`` (the text of
    ``module``), at any depth. ``from a import b`` counts as importing ``a``
    and ``a.b`` (``b`` may be a module)."""
    tree = ast.parse(source, filename=module)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source_module = _resolve(module, is_package, node.level, node.module)
            found.append((node.lineno, source_module))
            found += [(node.lineno, f"{source_module}.{alias.name}") for alias in node.names if alias.name != "*"]
        elif isinstance(node, ast.Call) and _is_dynamic_import(node.func):
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def _is_dynamic_import(func: ast.expr) -> bool:
    if isinstance(func, ast.Name):
        return func.id in ("__import__", "import_module")
    return isinstance(func, ast.Attribute) and func.attr == "import_module"


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _where(module: str, line: int) -> str:
    return f"{MODULES[module].relative_to(ROOT)}:{line}"


def _docstring(package: str) -> str:
    tree = ast.parse(MODULES[package].read_text(encoding="utf-8"))
    return ast.get_docstring(tree) or ""


# ---- the import rules -----------------------------------------------------------------------------


READER_SAMPLE = """
import sqlite3, autobahn.twisted.websocket as ws
from twisted.internet import reactor
from . import playout
from ..ledger.store import connect
if TYPE_CHECKING:
    from upvoot.daemon.seams import IVoiceService
def later():
    from upvoot import framing
    importlib.import_module("upvoot.dial.command")
    return __import__("upvoot.engines.whisper")
"""


def test_the_reader_sees_every_kind_of_import():
    names = [name for _, name in imports_in("upvoot.call.core", READER_SAMPLE)]
    for expected in (
        "sqlite3", "autobahn.twisted.websocket", "twisted.internet.reactor",  # plain, and the global reactor
        "upvoot.call.playout", "upvoot.ledger.store.connect",  # relative, resolved
        "upvoot.daemon.seams.IVoiceService",  # under TYPE_CHECKING
        "upvoot.framing", "upvoot.dial.command", "upvoot.engines.whisper",  # inside a function, and by name
    ):
        assert expected in names
    assert [line for line, name in imports_in("upvoot.call.core", READER_SAMPLE) if name == "upvoot.dial.command"] == [10]
    assert _resolve("upvoot.call", True, 1, "machine") == "upvoot.call.machine"
    assert _within("upvoot.call.core", "upvoot.call") and not _within("upvoot.caller", "upvoot.call")
    assert set(RULES) <= set(MODULES) and set(PACKAGES) <= set(MODULES)
    # and on a real module: the command imports the ledger inside a function
    assert "upvoot.ledger.store" in {name for _, name in imports_of("upvoot.dial.command")}


@pytest.mark.parametrize("package", sorted(RULES))
def test_package_never_imports_what_its_docstring_forbids(package):
    broken = [
        f"{_where(module, line)} imports {name} ({forbidden} is off limits to {package})"
        for module in MODULES if _within(module, package)
        for line, name in imports_of(module)
        for forbidden in RULES[package] if _within(name, forbidden)
    ]
    assert broken == [], "\n".join(broken)


def test_nothing_outside_the_daemon_imports_it():
    broken = [
        f"{_where(module, line)} imports {name}"
        for module in MODULES if not _within(module, "upvoot.daemon")
        for line, name in imports_of(module)
        if _within(name, "upvoot.daemon") and not any(_within(name, ok) for ok in DAEMON_IMPORTERS.get(module, ()))
    ]
    assert broken == [], "\n".join(broken)


def test_the_daemon_exceptions_are_still_needed():
    for module, names in DAEMON_IMPORTERS.items():
        imported = {name for _, name in imports_of(module)}
        for name in names:
            assert name in imported, f"{module} no longer imports {name}: drop it from DAEMON_IMPORTERS"


# ---- what each package says of itself --------------------------------------------------------------


@pytest.mark.parametrize("package", PACKAGES)
def test_package_docstring_says_what_it_owns_and_must_never_import(package):
    doc = _docstring(package)
    assert doc, f"{package} has no docstring"
    assert "Owns" in doc, f"{package}'s docstring does not say what it owns ('Owns: ...')"
    assert IMPORT_RULE.search(doc), f"{package}'s docstring does not say what it must never import"


@pytest.mark.parametrize("package", sorted(RULES))
def test_rules_table_mirrors_the_package_docstring(package):
    doc = _docstring(package).lower()
    unnamed = [
        forbidden for forbidden in RULES[package]
        if not any(word.lower() in doc for word in DOC_NAMES.get(forbidden, (forbidden,)))
    ]
    assert unnamed == [], f"{package}'s docstring does not name {unnamed}, which this test forbids it"


# ---- module size ---------------------------------------------------------------------------------------


def test_no_module_is_over_400_lines():
    lines = {module: len(path.read_text(encoding="utf-8").splitlines()) for module, path in MODULES.items()}
    over = [f"{MODULES[m].relative_to(ROOT)}: {n} lines" for m, n in lines.items() if n > MAX_LINES and m not in LONG_MODULES]
    assert over == [], "\n".join(over)


def test_the_long_module_allowances_are_still_needed():
    for module in LONG_MODULES:
        assert module in MODULES, f"{module} is gone: drop it from LONG_MODULES"
        lines = len(MODULES[module].read_text(encoding="utf-8").splitlines())
        assert lines > MAX_LINES, f"{module} is {lines} lines now: drop it from LONG_MODULES"
