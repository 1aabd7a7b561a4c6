"""maisi's import graph: modules, edges, cycles, and imports that point up the layers.

    python3 scripts/import_graph.py [SRC]           # print the graph's summary, cycles and upward imports
    python3 scripts/import_graph.py [SRC] --check   # exit 1 if there is a cycle or an upward import

Every `import maisi...` counts, at module level or inside a function. The layers, lowest first, are
LAYERS below; a module may import its own layer or lower ones (cli may import anything).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

LAYERS = (
    ("maisi", "maisi.config", "maisi.labels"),
    ("maisi.io",),
    ("maisi.data", "maisi.diffusion", "maisi.networks", "maisi.maskgen"),
    ("maisi.pipeline", "maisi.training", "maisi.evaluation"),
    ("maisi.service",),
    ("maisi.cli", "maisi.__main__"),
)


def layer(module: str) -> int:
    best = (-1, 0)  # (length of the matching prefix, layer)
    for i, names in enumerate(LAYERS):
        for n in names:
            if (module == n or module.startswith(n + ".")) and len(n) > best[0]:
                best = (len(n), i)
    return best[1]


def graph(src: Path) -> dict[str, set[str]]:
    mods = {".".join(p.relative_to(src).with_suffix("").parts).removesuffix(".__init__"): p
            for p in sorted(src.rglob("*.py"))}
    out = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("maisi"):
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    deps.add(full if full in mods else node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("maisi")}
        out[name] = {d for d in deps if d in mods and d != name}
    return out


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), cli left out."""
    g = {k: {d for d in v if not d.startswith("maisi.cli")} for k, v in g.items() if not k.startswith("maisi.cli")}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def upward(g: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((m, d) for m, deps in g.items() for d in deps if layer(d) > layer(m))


def main() -> int:
    args = [a for a in sys.argv[1:] if a != "--check"]
    src = Path(args[0] if args else Path(__file__).resolve().parents[1] / "src")
    g = graph(src)
    cyc, up = cycles(g), upward(g)
    print(f"{len(g)} modules, {sum(map(len, g.values()))} import edges")
    print("cycles:", *(["none"] if not cyc else [" <-> ".join(c) for c in cyc]), sep="\n  ")
    print("upward imports:", *(["none"] if not up else [f"{a} -> {b}" for a, b in up]), sep="\n  ")
    return 1 if "--check" in sys.argv and (cyc or up) else 0


if __name__ == "__main__":
    sys.exit(main())
