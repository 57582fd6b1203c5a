"""One decode step for rows each at its own cache slot and position: a few fused ops per block.

`DecodeStep(model, comm)` reads a keras-hub decoder (`decoder.read`) and computes, for
M rows (tokens) each with its own slot and position, the logits of the rows asked for:

    embed (this rank's vocabulary rows) -> all-reduce
    per block: TfshardDecodeAttention -> all-reduce -> TfshardDecodeMlp -> all-reduce
    TfshardDecodeHead (final norm, this rank's logits) -> all-gather on the vocabulary

Four ops and two collectives a block, where keras-hub's own step is a hundred small ops.
The same step serves a prompt (M = its tokens, rows at positions 0..n-1, all written to
the cache before any attends), a decode step of a batch (one row per sequence, each at its
own position) and both at once. int8 row-parallel projections add a small all-gather of
each row's maximum, so their input is quantized with the whole row's scale as unsharded.
"""

import uuid

import numpy as np
import tensorflow as tf

from tfshard.decode import decoder as decoder_lib
from tfshard.decode.params import Unsupported, handle
from tfshard.layers import matvec


class Cache:
    """A KV cache of `slots` sequences of up to `length` positions (each rank its own
    K/V heads), and the rotary table for those positions.

    Attributes:
        handle: the cache resource.
        rope: the rotary table, a variable `[length, head_dim]` (cos | sin).
        slots, length: its size.
        bytes: the memory it holds.
    """

    def __init__(self, step, slots, length):
        d = step.decoder
        dtype = tf.bfloat16 if d.rounding == "bfloat16" else tf.float32
        self.slots, self.length = int(slots), int(length)
        self.bytes = (len(d.blocks) * self.slots * 2 * d.kv_heads * self.length * d.head_dim
                      * dtype.size)
        self.handle = step.library.tfshard_kv_cache(
            layers=len(d.blocks), slots=self.slots, heads=d.kv_heads, length=self.length,
            head_dim=d.head_dim, dtype=dtype, shared_name=f"tfshard_kv_{uuid.uuid4().hex}")
        self.rope = tf.Variable(step.rope_table(self.length), trainable=False,
                                name="tfshard_rope")

    def close(self):
        """Frees the cache's memory (a no-op when already freed)."""
        handle, self.handle = getattr(self, "handle", None), None
        if handle is not None:
            # Eagerly, whatever graph is being traced when the collector calls this.
            with tf.init_scope():
                tf.raw_ops.DestroyResourceOp(resource=handle, ignore_lookup_error=True)

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class DecodeStep:
    """The decode step of one rank's (sharded) keras-hub decoder.

    Args:
        model: the keras-hub CausalLM, sharded in place (or not).
        comm: the rank's tensor-parallel communicator (None or size 1: no collectives).
        isa: the kernels' instruction set ("avx512", "avx2", "generic", "generic16");
            None: TFSHARD_KERNELS_ISA's, else the best the CPU runs.

    Raises:
        Unsupported: the model or this machine's op library cannot run the step (the
            message says what); callers fall back to keras-hub's loop.
    """

    def __init__(self, model, comm=None, isa=None):
        self.library = matvec.library()
        if self.library is None:
            raise Unsupported("tfshard's op library is not built or cannot run here "
                              "(./scripts/setup.sh builds it)")
        self.model = model
        self.decoder = decoder_lib.read(model)
        self.comm = comm if comm is not None and comm.size > 1 else None
        self.isa = isa or ""
        blocks = self.decoder.blocks
        configs = {str(sorted((k, v) for k, v in b.rotary.get_config().items() if k != "name"))
                   for b in blocks}
        if len(configs) != 1:
            raise Unsupported("the blocks' rotary embeddings differ")
        #: Collectives a step runs (all-reduces, all-gathers), for the record.
        self.collectives = self._count_collectives()

    def _count_collectives(self):
        if self.comm is None:
            return 0
        d = self.decoder
        n = int(d.embed.column_cut) + int(d.head.column_cut)
        for b in d.blocks:
            n += int(b.o.row_cut) * (1 + int(b.o.int8)) + int(b.down.row_cut) * (1 + int(b.down.int8))
        return n

    def new_cache(self, slots, length):
        """A `Cache` for `slots` sequences of up to `length` positions."""
        return Cache(self, slots, length)

    def rope_table(self, length):
        """`[length, head_dim]`: cos and sin of each position's rotary angles, computed by
        the model's own rotary layer in its compute dtype (so exactly its values)."""
        d = self.decoder
        half = d.head_dim // 2
        unit = np.concatenate([np.ones(half), np.zeros(d.head_dim - half)]).astype("float32")
        x = tf.cast(tf.tile(tf.reshape(unit, [1, 1, 1, d.head_dim]), [1, length, 1, 1]),
                    d.rounding)
        out = d.blocks[0].rotary(x, start_index=0)
        return tf.reshape(tf.cast(out, tf.float32), [length, d.head_dim])

    def _reduce(self, part, cut):
        return self.comm.allreduce_sum(part) if cut and self.comm is not None else part

    def _maxima(self, amax):
        """Every rank's row maxima `[M, ranks]` (an int8 row layer's input scale)."""
        amax = tf.expand_dims(amax, -1)
        if self.comm is None:
            return amax
        return self.comm.allgather(amax, axis=-1, sizes=[1] * self.comm.size)

    def _linear(self, x, param, amax):
        return self.library.tfshard_decode_linear(
            x=x, amax=amax, weights=param.handles, formats=[param.format], names=[param.name],
            rounding=self.decoder.rounding, isa=self.isa)

    def logits(self, cache, rope, tokens, slots, positions, rows):
        """The step, as graph code (call it inside a `tf.function`).

        Args:
            cache: the `Cache`'s handle.
            rope: the `Cache`'s rotary table (its variable's handle).
            tokens: `[M]` int32 token ids.
            slots: `[M]` int32: each row's cache slot.
            positions: `[M]` int32: each row's position (its K/V go there; it attends to
                positions 0..p of its slot).
            rows: `[R]` int32: the rows whose logits to return, or None to only write
                the rows' K/V into the cache (a prompt's tokens before its last).

        Returns:
            `[R, vocabulary]` float32 logits (the whole vocabulary on every rank), or
            None when `rows` is None.
        """
        d, lib = self.decoder, self.library
        common = dict(rounding=d.rounding, isa=self.isa)
        delta = lib.tfshard_decode_embed(ids=tokens, weights=d.embed.handles,
                                         formats=[d.embed.format], names=[d.embed.name],
                                         start=d.vocab_start, **common)
        delta = self._reduce(delta, d.embed.column_cut)
        x = tf.zeros_like(delta)
        bias = []
        for i, b in enumerate(d.blocks):
            fused_o = not b.o.int8
            weights = [b.q, b.k, b.v] + ([b.o] if fused_o else [])
            x, part, amax = lib.tfshard_decode_attention(
                x=x, delta=delta, delta_bias=bias, norm=b.attention_norm,
                weights=[h for p in weights for h in p.handles], rope=[rope], cache=cache,
                slots=slots, positions=positions, formats=[p.format for p in weights],
                names=[p.name for p in weights], layer=i, heads=b.heads, kv_heads=b.kv_heads,
                head_dim=b.head_dim, norm_kind=d.norm_kind, eps=d.eps,
                score_scale=b.score_scale, window=d.window or 0, **common)
            if not fused_o:
                part = self._linear(part, b.o, self._maxima(amax) if b.o.row_cut else amax[:, None])
            if rows is None and i == len(d.blocks) - 1:
                return None  # every block's K/V is in the cache; nothing reads further
            delta = self._reduce(part, b.o.row_cut)
            bias = [] if b.o_bias is None else [handle(b.o_bias)]
            fused_down = not b.down.int8
            weights = [b.gate, b.up] + ([b.down] if fused_down else [])
            x, part, amax = lib.tfshard_decode_mlp(
                x=x, delta=delta, delta_bias=bias, norm=b.mlp_norm,
                weights=[h for p in weights for h in p.handles],
                formats=[p.format for p in weights], names=[p.name for p in weights],
                norm_kind=d.norm_kind, eps=d.eps, activation="silu", gated=True, **common)
            if not fused_down:
                part = self._linear(part, b.down,
                                    self._maxima(amax) if b.down.row_cut else amax[:, None])
            delta = self._reduce(part, b.down.row_cut)
            bias = [] if b.down_bias is None else [handle(b.down_bias)]
        local = lib.tfshard_decode_head(
            x=x, delta=delta, delta_bias=bias, norm=d.final_norm, weights=d.head.handles,
            rows=rows, formats=[d.head.format], names=[d.head.name], norm_kind=d.norm_kind,
            eps=d.eps, **common)
        if d.head.column_cut and self.comm is not None:
            return self.comm.allgather(local, axis=-1, sizes=list(d.vocab_sizes))
        return local
