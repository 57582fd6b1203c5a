"""Reading and writing model files, each rank touching only its slices.

deferred.py   variables with shapes and no memory (build now, fill later)
dtypes.py     building a model in another float precision than it was saved in
stores.py     Keras weight stores over HDF5, CheckpointError
sharded.py    tfshard's sharded checkpoint format (index, rank files), read
formats.py    one reader per file kind; resolve_source, build_deferred, load_into
save.py       atomic sharded and gathered saves
views.py      lazy slice views (HDF5, safetensors, GGUF, traced reshapes)
gguf_llama.py GGUF files of the Llama architecture as keras-hub models
named.py      the named real models ("smollm2", "minilm") from their PyPI wheels

`tfshard.load` (tfshard/loading.py) sits above: it builds, shards, then fills.
"""

from tfshard.io.deferred import deferred_variables, materialize, unfilled
from tfshard.io.dtypes import FLOAT_POLICIES, check_dtype
from tfshard.io.formats import (NAMED, agree_on_failure, build_deferred, build_model,
                                fill_from_views, load_into, resolve_source)
from tfshard.io.save import remove_stale_partials, save
from tfshard.io.sharded import FORMAT, INDEX, VERSION, index_checksum
from tfshard.io.stores import CheckpointError

__all__ = ["CheckpointError", "FLOAT_POLICIES", "FORMAT", "check_dtype", "INDEX", "NAMED", "VERSION", "agree_on_failure",
           "build_deferred", "build_model", "deferred_variables", "fill_from_views",
           "index_checksum", "load_into", "materialize", "remove_stale_partials",
           "resolve_source", "save", "unfilled"]
