"""The package's rules, read from its source (and its map) so they cannot silently rot.

Imports point down the data path (docs/architecture.md): tools -> serve -> runtime ->
io / plan -> layers -> comm, with the communication backends as leaves. Function-local
imports count like module-level ones. Checked: no import circle, no import of a higher
level, nothing below the public root package imports it, no `from tfshard.x import
_private` (modules pass state by API), backends imported only by comm's factories;
every source file placed in docs/architecture.md's map, in the tier its level says;
each module opening with a one-line docstring and under 600 lines.
"""

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "tfshard"
MAP = ROOT / "docs" / "architecture.md"

# Level of each module (higher may import lower or equal, never higher), by tier. Unlisted
# modules fail the test: a new module must say where it lives (and the map must place it).
LEVELS = {
    # tools: the public root, the command line's wing, the built-in test models
    "tfshard": 10, "tfshard.__main__": 9, "tfshard.models": 9,
    "tfshard.cli": 9, "tfshard.cli.commands": 9, "tfshard.cli.files": 9, "tfshard.cli.launch": 9,
    "tfshard.cli.drift": 9, "tfshard.cli.precision": 9,
    "tfshard.cli.bench": 9, "tfshard.cli.bench.__main__": 9, "tfshard.cli.bench.common": 9,
    "tfshard.cli.bench.forward": 9, "tfshard.cli.bench.generate": 9, "tfshard.cli.bench.load": 9,
    "tfshard.cli.bench.precision": 9, "tfshard.cli.bench.comm": 9, "tfshard.cli.bench.hosts": 9,
    "tfshard.cli.bench.plot": 9, "tfshard.cli.bench.decode": 9,
    "tfshard.cli.bench.serve": 9,
    # serve: the HTTP front (rank 0) and the engines' contract
    "tfshard.serve": 8, "tfshard.serve.api": 8, "tfshard.serve.metrics": 8,
    "tfshard.serve.errors": 8, "tfshard.serve.front": 8, "tfshard.serve.schemas": 8,
    "tfshard.serve.openai_api": 8, "tfshard.serve.tf_serving": 8, "tfshard.serve.page": 8,
    "tfshard.serve.http": 8,
    # serve: the engines and what they drive (rank 0's scheduler, every rank's loop)
    "tfshard.serve.server": 8, "tfshard.serve.engine": 8, "tfshard.serve.scheduler": 8,
    "tfshard.serve.sampling": 8, "tfshard.serve.text": 8, "tfshard.serve.protocol": 8,
    "tfshard.serve.tokenizer": 8, "tfshard.serve.serial": 8, "tfshard.serve.batches": 8,
    # runtime: load above shard above ShardedModel and its parts
    "tfshard.loading": 7,  # load = resolve + build + shard + fill: above shard and readers
    "tfshard.tensorboard": 7,
    "tfshard.sharding": 6,
    "tfshard.sharded_model": 5, "tfshard.generation": 5, "tfshard.convert": 5,
    "tfshard.copying": 5, "tfshard.pipeline": 5, "tfshard.pipeline.staged": 5,
    "tfshard.pipeline.on_devices": 5,
    "tfshard.predict": 4, "tfshard.inputs": 4, "tfshard.outputs": 4, "tfshard.schedule": 4,
    "tfshard.kv_cache": 4, "tfshard.world": 4, "tfshard.placement": 4, "tfshard.devices": 4,
    "tfshard.pipeline.cut": 4, "tfshard.pipeline.gpipe": 4, "tfshard.pipeline.decode": 4,
    "tfshard.decode": 4, "tfshard.decode.generate": 4, "tfshard.decode.step": 4,
    "tfshard.decode.decoder": 4, "tfshard.decode.params": 4,
    # io / plan: reading and writing slices; what to cut; the agreement both use
    "tfshard.io": 3, "tfshard.io.deferred": 3, "tfshard.io.stores": 3, "tfshard.io.sharded": 3,
    "tfshard.io.formats": 3, "tfshard.io.save": 3, "tfshard.io.views": 3,
    "tfshard.io.gguf_llama": 3, "tfshard.io.named": 3, "tfshard.io.dtypes": 3,
    "tfshard.io.preprocessors": 3,
    "tfshard.plan": 2, "tfshard.plan.structure": 2, "tfshard.plan.entries": 2,
    "tfshard.plan.layout": 2, "tfshard.plan.resolve": 2, "tfshard.plan.resolved": 2,
    "tfshard.plan.stages": 2, "tfshard.rules": 2, "tfshard.consistency": 2,
    # layers
    "tfshard.layers": 1, "tfshard.layers.base": 1, "tfshard.layers.dense": 1,
    "tfshard.layers.einsum_dense": 1, "tfshard.layers.embedding": 1, "tfshard.layers.tree": 1,
    "tfshard.layers.quantized": 1, "tfshard.layers.matvec": 1, "tfshard.layers.int4": 1,
    "tfshard.layers.released": 1, "tfshard.layers.tracking": 1, "tfshard.layers.slices": 1,
    "tfshard.layers.placed": 1,
    # comm
    "tfshard.comm": 0, "tfshard.comm.base": 0, "tfshard.comm.metered": 0,
    "tfshard.comm.compressed": 0, "tfshard.comm.watchdog": 0, "tfshard.comm.strategies": 0,
    "tfshard.comm.local": 0, "tfshard.comm.mpi": 0, "tfshard.comm.horovod": 0,
    "tfshard.comm.distribute": 0,
}
# The tiers of docs/architecture.md's map (its "### tier" headings) and their levels.
TIERS = {"tools": (9, 10), "serve": (8, 8), "runtime": (4, 7), "io / plan": (2, 3),
         "layers": (1, 1), "comm": (0, 0)}
MAX_LINES = 600
TOOLS = 9  # tools may use the public API (the root package)
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


def _module_name(path):
    name = ".".join(("tfshard",) + path.relative_to(PACKAGE).with_suffix("").parts)
    return name.removesuffix(".__init__")


def _map():
    """`{file: tier}` from docs/architecture.md's map: every backquoted `tfshard/...` path
    under a "### <tier>" heading, up to the next "##" heading."""
    placed, tier = {}, None
    for line in MAP.read_text().splitlines():
        if line.startswith("### "):
            tier = next((t for t in TIERS if line[4:].lower().startswith(t)), None)
        elif line.startswith("## "):
            tier = None
        elif tier is not None:
            for path in re.findall(r"`(tfshard/[\w/.]+\.(?:py|cc|c))`", line):
                placed[path] = tier
    return placed


def test_every_source_file_is_on_the_map():
    files = {str(p.relative_to(ROOT))
             for ext in ("py", "cc", "c") for p in PACKAGE.rglob(f"*.{ext}")}
    placed = _map()
    missing, stale = sorted(files - set(placed)), sorted(set(placed) - files)
    assert not missing, f"source files docs/architecture.md's map does not place: {missing}"
    assert not stale, f"files on docs/architecture.md's map that do not exist: {stale}"


def test_the_map_places_each_module_in_the_tier_of_its_level():
    wrong = []
    for path, tier in _map().items():
        if path.endswith(".py"):
            name = _module_name(ROOT / path)
            low, high = TIERS[tier]
            if not low <= LEVELS.get(name, -1) <= high:
                wrong.append(f"{path} is under '{tier}' ({low}-{high}) but has level "
                             f"{LEVELS.get(name)}")
    assert not wrong, "\n".join(wrong)
    assert all(any(lo <= v <= hi for lo, hi in TIERS.values()) for v in LEVELS.values())


def test_modules_open_with_a_one_line_docstring_and_stay_short():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        doc = ast.get_docstring(ast.parse(text))
        lines = (doc or "").splitlines()
        if not doc or len(lines[0]) > 100 or (len(lines) > 1 and lines[1].strip()):
            bad.append(f"{path.relative_to(ROOT)}: no one-line opening docstring")
        if text.count("\n") > MAX_LINES:
            bad.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines "
                       f"(at most {MAX_LINES})")
    assert not bad, "\n".join(bad)
