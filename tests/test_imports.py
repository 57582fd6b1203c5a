"""The package's import rules, read from its source so they cannot silently rot.

Imports point down the data path (docs/architecture.md): tools -> runtime -> plan ->
layers -> comm, with the communication backends as leaves. Function-local imports
count like module-level ones. Checked: no import circle, no import of a higher
level, nothing below the public root package imports it, and no `from tfshard.x
import _private` (modules pass state by API).
"""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "tfshard"

# Level of each module (higher may import lower or equal, never higher). Unlisted
# modules fail the test: a new module must say where it lives.
LEVELS = {
    "tfshard": 9, "tfshard.__main__": 8, "tfshard.cli": 8, "tfshard.cli.commands": 8,
    "tfshard.cli.files": 8, "tfshard.cli.launch": 8, "tfshard.cli.drift": 8,
    "tfshard.cli.precision": 8, "tfshard.cli.bench": 8, "tfshard.cli.bench.__main__": 8,
    "tfshard.cli.bench.common": 8, "tfshard.cli.bench.forward": 8, "tfshard.cli.bench.generate": 8,
    "tfshard.cli.bench.load": 8, "tfshard.cli.bench.precision": 8, "tfshard.cli.bench.comm": 8,
    "tfshard.cli.bench.hosts": 8, "tfshard.cli.bench.plot": 8, "tfshard.tensorboard": 7,
    "tfshard.loading": 6,  # load = resolve + build + shard + fill: above model and readers
    "tfshard.sharding": 5, "tfshard.sharded_model": 4,
    "tfshard.pipeline": 4, "tfshard.pipeline.staged": 4, "tfshard.pipeline.on_devices": 4,
    "tfshard.pipeline.cut": 3,
    "tfshard.pipeline.gpipe": 3, "tfshard.pipeline.decode": 3, "tfshard.plan.stages": 2,
    "tfshard.layers.released": 1, "tfshard.layers.tracking": 1, "tfshard.layers.slices": 1, "tfshard.layers.placed": 1,
    "tfshard.io": 4, "tfshard.io.deferred": 4, "tfshard.io.stores": 4,
    "tfshard.io.sharded": 4, "tfshard.io.formats": 4, "tfshard.io.save": 4,
    "tfshard.generation": 4, "tfshard.copying": 4, "tfshard.convert": 4,
    "tfshard.predict": 3, "tfshard.inputs": 3, "tfshard.kv_cache": 3, "tfshard.outputs": 2, "tfshard.schedule": 3, "tfshard.consistency": 3,
    "tfshard.world": 3, "tfshard.devices": 3, "tfshard.models": 3,
    "tfshard.io.views": 4, "tfshard.io.gguf_llama": 4, "tfshard.io.named": 4, "tfshard.io.dtypes": 4,
    "tfshard.plan": 2, "tfshard.plan.structure": 2, "tfshard.plan.entries": 2, "tfshard.plan.layout": 2,
    "tfshard.plan.resolve": 2, "tfshard.plan.resolved": 2, "tfshard.rules": 2,
    "tfshard.layers": 1, "tfshard.layers.base": 1, "tfshard.layers.dense": 1,
    "tfshard.layers.einsum_dense": 1, "tfshard.layers.embedding": 1, "tfshard.layers.tree": 1,
    "tfshard.layers.quantized": 1, "tfshard.layers.matvec": 1, "tfshard.layers.int4": 1,
    "tfshard.comm": 0, "tfshard.comm.base": 0, "tfshard.comm.metered": 0,
    "tfshard.comm.compressed": 0,
    "tfshard.comm.watchdog": 0, "tfshard.comm.local": 0, "tfshard.comm.mpi": 0,
    "tfshard.comm.horovod": 0, "tfshard.comm.distribute": 0, "tfshard.comm.strategies": 0,
}
TOOLS = 8  # tools may use the public API (the root package)
# The communication backends: leaves that only the factories in tfshard/comm/__init__.py
# (`create`, `for_replicas`) import.
BACKENDS = ("tfshard.comm.mpi", "tfshard.comm.horovod", "tfshard.comm.distribute",
            "tfshard.comm.local")


def _modules():
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(("tfshard",) + path.relative_to(PACKAGE).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


def _imports(mods):
    """`{module: {(imported module, [names])}}` for imports of tfshard modules."""
    graph = {}
    for name, path in mods.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [(a.name, ()) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = []
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    targets.append((sub, ()) if sub in mods else (node.module, (a.name,)))
            else:
                continue
            for target, names in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target.startswith("tfshard") and target != name:
                    edges.add((target, names))
        graph[name] = edges
    return graph


def test_every_module_has_a_level():
    missing = sorted(set(_modules()) - set(LEVELS))
    assert not missing, f"modules without a level in tests/test_imports.py: {missing}"


def test_imports_point_down_and_name_no_private_names():
    graph = _imports(_modules())
    upward, private, root = [], [], []
    for name, edges in graph.items():
        for target, names in edges:
            is_child = target.startswith(name + ".")  # a package re-exporting its modules
            if target == "tfshard" and LEVELS[name] < TOOLS:
                root.append(name)
            elif target != "tfshard" and not is_child and LEVELS[target] > LEVELS[name]:
                upward.append(f"{name} (level {LEVELS[name]}) imports {target} "
                              f"(level {LEVELS[target]})")
            private += [f"{name}: from {target} import {n}" for n in names if n.startswith("_")]
    assert not upward, "upward imports:\n" + "\n".join(sorted(upward))
    assert not root, f"modules importing the root package: {root}"
    assert not private, "private names imported across modules:\n" + "\n".join(sorted(private))


def test_no_import_circle():
    graph = {n: {t for t, _ in e if not t.startswith(n + ".")} for n, e in _imports(_modules()).items()}
    state, circles = {}, []

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                circles.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_backends_are_leaves():
    """Nothing imports a backend module but the factories in tfshard/comm/__init__.py, and a
    backend imports only the shared modules of tfshard.comm (never another backend)."""
    wrong = []
    for name, edges in _imports(_modules()).items():
        for target, _ in edges:
            if target in BACKENDS and name != "tfshard.comm":
                wrong.append(f"{name} imports the backend {target}; use tfshard.comm.create / "
                             "for_replicas, or move the helper it needs to a shared comm module")
            if name in BACKENDS and (target in BACKENDS or not target.startswith("tfshard.comm.")):
                wrong.append(f"the backend {name} imports {target}")
    assert not wrong, "backends are not leaves:\n" + "\n".join(sorted(wrong))
