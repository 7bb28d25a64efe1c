"""Imports go one way: a module imports only modules of its own layer or below, and only
amem_sgl/sglang_compat.py imports SGLang.

Every ``import`` / ``from ... import`` in amem_sgl/ and kernels/ is read with ``ast``, at any depth
(function-level and lazy imports count: they run too). ``from pkg import name`` counts as importing
``pkg.name`` when that is a module. Importing ``a.b.c`` also runs ``a.b``'s ``__init__``, so that
package is checked too (a module's own enclosing packages excepted).

Layers (rank: the lower, the deeper). A module's rank is that of its longest prefix in LAYERS, so
new modules inside a listed package (cache/, blend/, residency/, ...) are ranked without editing
this file; a module no prefix covers fails ``test_every_module_has_a_layer`` until it is given one.

| rank | layer        | what lives there                                                | prefixes |
|------|--------------|-----------------------------------------------------------------|----------|
| 0    | kernels      | Triton kernels + torch references; no amem_sgl imports          | kernels |
| 1    | base         | import-light leaves: the SGLang seam, chunk identity, metric names | amem_sgl (root), amem_sgl.sglang_compat, amem_sgl.chunks.identity, amem_sgl.metrics |
| 2    | core         | the scheduler process's KV logic: tree, splice, blend, hints, config | amem_sgl.cache, amem_sgl.blend, amem_sgl.chunks (package), amem_sgl.chunks.hints, amem_sgl.config |
| 3    | services     | what the memory layer calls: residency tiers, HTTP chunk client, model files | amem_sgl.residency, amem_sgl.chunks.client, amem_sgl.models |
| 4    | application  | the HTTP process: memory layer + API, request guards, proxy    | amem_sgl.memory, amem_sgl.server, amem_sgl.proxy |
| 5    | entry points | processes and wiring: launcher, SGLang plugin, CLI, SDK, MCP   | amem_sgl.plugin, amem_sgl.launch_server, amem_sgl.cli, amem_sgl.sdk, amem_sgl.mcp_server, amem_sgl.local_server, amem_sgl.proxy.__main__ |

Known violations are listed in ALLOWED, each with its reason; any other upward import fails, and
an allowed one that no longer occurs fails too (so the list only shrinks).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("amem_sgl", "kernels")
SGLANG_SEAM = "amem_sgl.sglang_compat"

LAYERS: dict[str, int] = {
    "kernels": 0,
    "amem_sgl": 1, "amem_sgl.sglang_compat": 1, "amem_sgl.chunks.identity": 1, "amem_sgl.metrics": 1,
    "amem_sgl.cache": 2, "amem_sgl.blend": 2, "amem_sgl.chunks": 2, "amem_sgl.chunks.hints": 2,
    "amem_sgl.config": 2,
    "amem_sgl.residency": 3, "amem_sgl.chunks.client": 3, "amem_sgl.models": 3,
    "amem_sgl.memory": 4, "amem_sgl.server": 4, "amem_sgl.proxy": 4,
    "amem_sgl.plugin": 5, "amem_sgl.launch_server": 5, "amem_sgl.cli": 5, "amem_sgl.sdk": 5,
    "amem_sgl.mcp_server": 5, "amem_sgl.local_server": 5, "amem_sgl.proxy.__main__": 5,
}
LAYER_NAMES = {0: "kernels", 1: "base", 2: "core", 3: "services", 4: "application", 5: "entry points"}

# (importer, imported) -> why it is tolerated. Keep each one named; fix rather than add.
ALLOWED: dict[tuple[str, str], str] = {
    ("amem_sgl", "amem_sgl.sdk"): "the package root's lazy __getattr__ re-exports the SDK (`from amem_sgl "
                                  "import Amem`); it runs only when that name is asked for, never on import",
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path = ROOT, packages=PACKAGES) -> dict[str, Path]:
    return {module_name(p, root): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}


def imports_of(path: Path, name: str, known: set[str]) -> list[tuple[str, int]]:
    """(imported module, line) for every import statement in the file, at any depth."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub if sub in known else target, node.lineno))
    return found


def rank(module: str) -> int | None:
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in LAYERS:
            return LAYERS[prefix]
    return None


def edges(root: Path = ROOT, packages=PACKAGES) -> list[tuple[str, str, str]]:
    """(importer, imported, "file:line") for every import of a project module or of SGLang, with the
    packages whose ``__init__`` the import runs (the importer's own enclosing packages excepted)."""
    mods = modules(root, packages)
    known = set(mods)
    out = []
    for name, path in mods.items():
        own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        if path.name == "__init__.py":
            own.add(name)
        for target, line in imports_of(path, name, known):
            where = f"{path.relative_to(root)}:{line}"
            top = target.split(".")[0]
            if top == "sglang":
                out.append((name, target, where))
            elif top in packages:
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    imported = ".".join(parts[:i])
                    if imported in known and imported not in own and imported != name:
                        out.append((name, imported, where))
    return out


def violations(root: Path = ROOT, packages=PACKAGES) -> list[tuple[str, str, str, str]]:
    """(importer, imported, where, why) for upward imports and SGLang imports outside the seam."""
    bad = []
    for importer, imported, where in edges(root, packages):
        if imported.split(".")[0] == "sglang":
            if importer != SGLANG_SEAM:
                bad.append((importer, imported, where, f"SGLang imported outside {SGLANG_SEAM}"))
            continue
        a, b = rank(importer), rank(imported)
        if a is not None and b is not None and b > a:
            bad.append((importer, imported, where, f"{LAYER_NAMES[a]} ({a}) imports {LAYER_NAMES[b]} ({b})"))
    return bad


def test_every_module_has_a_layer():
    unranked = [m for m in modules() if rank(m) is None]
    assert not unranked, f"give these modules a layer in tests/test_layering.py LAYERS: {unranked}"


def test_imports_go_one_way():
    new = [v for v in violations() if (v[0], v[1]) not in ALLOWED]
    assert not new, "upward imports (kernels <- core <- services <- application <- entry points):\n" + "\n".join(
        f"  {where}: {a} -> {b}: {why}" for a, b, where, why in new)


def test_every_allowed_violation_still_exists():
    present = {(v[0], v[1]) for v in violations()}
    stale = [pair for pair in ALLOWED if pair not in present]
    assert not stale, f"fixed: remove from ALLOWED in tests/test_layering.py: {stale}"


def test_only_the_seam_imports_sglang():
    importers = {a for a, b, _ in edges() if b.split(".")[0] == "sglang"}
    assert importers == {SGLANG_SEAM}


def test_kernels_import_nothing_of_amem_sgl():
    assert not [e for e in edges() if e[0].split(".")[0] == "kernels" and e[1].split(".")[0] == "amem_sgl"]


@pytest.fixture
def toy(tmp_path):
    """A miniature tree with the same package names, to show the checker can fail."""
    def write(rel: str, text: str = "") -> None:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    for rel in ("kernels/__init__.py", "amem_sgl/__init__.py", "amem_sgl/cache/__init__.py",
                "amem_sgl/memory/__init__.py", "amem_sgl/memory/layer.py", "amem_sgl/sglang_compat.py"):
        write(rel)
    return tmp_path, write


def test_the_checker_finds_a_function_level_upward_import(toy):
    root, write = toy
    write("amem_sgl/cache/new_module.py", "def f():\n    from amem_sgl.memory import layer\n    return layer\n")
    found = violations(root)
    assert {(a, b) for a, b, *_ in found} == {("amem_sgl.cache.new_module", "amem_sgl.memory"),  # its __init__ runs
                                              ("amem_sgl.cache.new_module", "amem_sgl.memory.layer")}
    assert {where for _, _, where, _ in found} == {"amem_sgl/cache/new_module.py:2"}


def test_the_checker_finds_relative_and_package_imports_and_sglang_outside_the_seam(toy):
    root, write = toy
    write("amem_sgl/memory/__init__.py", "")
    write("amem_sgl/cache/a.py", "from ..memory import layer\nimport sglang.srt.managers\n")
    write("kernels/k.py", "import amem_sgl.cache\n")
    write("amem_sgl/sglang_compat.py", "import sglang\n")
    found = {(a, b) for a, b, *_ in violations(root)}
    assert found == {("amem_sgl.cache.a", "amem_sgl.memory"), ("amem_sgl.cache.a", "amem_sgl.memory.layer"),
                     ("amem_sgl.cache.a", "sglang.srt.managers"), ("kernels.k", "amem_sgl"),
                     ("kernels.k", "amem_sgl.cache")}
