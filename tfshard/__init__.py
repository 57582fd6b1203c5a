"""tfshard: Megatron-style tensor parallelism for Keras 3 models on TensorFlow.

    import tfshard
    world = tfshard.init()
    sharded = tfshard.shard(model)
    out = sharded.predict(x)
"""

__version__ = "0.1.0"

from tfshard.io import CheckpointError
from tfshard.devices import cpu_devices
from tfshard.loading import load
from tfshard.sharding import shard
from tfshard.sharded_model import ShardedModel
from tfshard.plan import Plan, PlanEntry, ResolvedPlan
from tfshard.rules import Column, Replicate, Row, Vocab
from tfshard.tensorboard import TensorBoard
from tfshard.world import World, init

__all__ = ["init", "shard", "cpu_devices", "load", "CheckpointError", "Plan", "PlanEntry", "ResolvedPlan", "Column", "Row", "Vocab", "Replicate", "TensorBoard", "ShardedModel", "World", "__version__"]
