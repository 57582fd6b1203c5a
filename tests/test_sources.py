"""Lazy slice views (tfshard/io/views.py): a slice equals the same slice of the
whole tensor, and only the needed part of the source is read."""

import numpy as np
import pytest

from tfshard.io import views
from tfshard.io import gguf_llama, named


class Recorded(views.TensorView):
    """An in-memory source that records what is read."""

    def __init__(self, array):
        self.array, self.shape, self.dtype, self.reads = array, array.shape, array.dtype, []

    def read(self, index):
        self.reads.append(index)
        return self.array[index]


def _rows_read(src):
    return [tuple((i.start, i.stop) for i in index) for index in src.reads]


TRANSFORMS = {
    # keras-hub's BERT / Llama converter hooks and the GGUF mappings.
    "q_heads": ((576, 576), lambda w: np.reshape(np.transpose(gguf_llama.unpermute(w, 9)), (576, 9, 64)), 1),
    "out_heads": ((576, 576), lambda w: np.reshape(np.transpose(w), (9, 64, 576)), 0),
    "bias_heads": ((384,), lambda b: np.reshape(b, [12, 32]), 0),
    "dense_T_col": ((96, 48), np.transpose, 1),
    "dense_T_row": ((96, 48), lambda w: np.transpose(w, axes=(1, 0)), 0),
    "identity": ((50, 8), lambda w: w, 0),
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_mapped_view_slices_equal_whole_and_read_only_the_slice(name):
    shape, fn, axis = TRANSFORMS[name]
    w = np.random.default_rng(0).standard_normal(shape).astype("float32")
    src = Recorded(w)
    view = views.MappedView(src, fn)
    full = np.asarray(fn(w))
    assert view.shape == full.shape
    n = full.shape[axis]
    for start, stop in [(0, n // 3), (n // 3, n - 1), (n - 1, n)]:
        index = [slice(None)] * full.ndim
        index[axis] = slice(start, stop)
        src.reads.clear()
        got = view[tuple(index)]
        assert np.array_equal(got, full[tuple(index)]), (name, start, stop)
        # One read, of a part of the source proportional to the slice.
        assert len(src.reads) == 1
        read = int(np.prod([i.stop - i.start for i in src.reads[0]]))
        assert read == w.size * (stop - start) // n, (name, _rows_read(src))


def test_mapped_view_falls_back_to_whole_reads_for_other_ops():
    w = np.arange(12, dtype="float32").reshape(3, 4)
    view = views.MappedView(Recorded(w), lambda x: np.asarray(x) * 2.0)
    assert np.array_equal(view[1:2], w[1:2] * 2.0)


def test_gguf_view_dequantises_only_the_asked_rows_and_blocks():
    import gguf

    path = named.path_of("smollm2")
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    for name in ("blk.0.ffn_down.weight", "token_embd.weight", "blk.0.attn_norm.weight"):
        t = tensors[name]
        view = views.GGUFView(t, path)
        whole = gguf.quants.dequantize(t.data, t.tensor_type).reshape(view.shape)
        assert np.array_equal(view[()], whole), name
        if len(view.shape) == 2:
            assert np.array_equal(view[10:300, 100:777], whole[10:300, 100:777]), name
            assert np.array_equal(view[:, 5:37], whole[:, 5:37]), name
