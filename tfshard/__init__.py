"""tfshard: Megatron-style tensor parallelism for Keras 3 models on TensorFlow.

    import tfshard
    world = tfshard.init()
    sharded = tfshard.shard(model)
    out = sharded.predict(x)

The public names are loaded on first use, so `import tfshard` (and the `tfshard`
command's `--help`) imports no TensorFlow until one is needed.
"""

import importlib

__version__ = "0.1.0"

# Public name -> the module that defines it (imported on first access).
_PUBLIC = {
    "init": "tfshard.world", "World": "tfshard.world",
    "shard": "tfshard.sharding", "ShardedModel": "tfshard.sharded_model",
    "load": "tfshard.loading", "cpu_devices": "tfshard.devices",
    "CheckpointError": "tfshard.io",
    "Plan": "tfshard.plan", "PlanEntry": "tfshard.plan", "ResolvedPlan": "tfshard.plan",
    "Column": "tfshard.rules", "Row": "tfshard.rules", "Vocab": "tfshard.rules",
    "Replicate": "tfshard.rules",
    "TensorBoard": "tfshard.tensorboard",
}

__all__ = ["init", "shard", "cpu_devices", "load", "CheckpointError", "Plan", "PlanEntry",
           "ResolvedPlan", "Column", "Row", "Vocab", "Replicate", "TensorBoard", "ShardedModel",
           "World", "serve", "__version__"]


def __getattr__(name):
    """`tfshard.NAME`: a public name, imported from its module on first use (then cached),
    or a submodule (`tfshard.comm`, `tfshard.io`, ...), as an eager package would have it."""
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    if name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
