"""The CLI's files: input arrays and prompts read and checked, outputs written atomically."""

import os


_TOKEN_INPUTS = ("token_ids", "padding_mask", "segment_ids")


def inputs(input_names, vocab, rows, seq_len, seed, path=None, tokenizer=None):
    """The model's inputs: from a .npy / .npz / .txt file, or random token ids."""
    import numpy as np

    if path and path.endswith(".txt"):
        with open(path, encoding="utf-8") as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
        if not prompts:
            raise ValueError(f"{path}: no prompts (one per line expected).")
        return prompt_inputs(tokenizer, prompts, path)
    token_model = set(input_names) <= set(_TOKEN_INPUTS)
    if path:
        data = load_array_file(path)
        if hasattr(data, "files"):
            return {k: data[k] for k in data.files}
        if not token_model:  # a model of the user's own: the array is its input, checked by predict
            return data
        ids = checked_token_ids(data, path, vocab)
    elif not token_model:
        raise ValueError(f"the model's inputs {input_names} are not token ids; pass them with "
                         "--input FILE.npy (one input) or FILE.npz (one array per input name).")
    else:
        ids = np.random.default_rng(seed).integers(0, vocab, (rows, seq_len)).astype("int32")
    x = {}
    for name in input_names:
        if name == "token_ids":
            x[name] = ids.astype("int32")
        elif name == "padding_mask":
            x[name] = np.ones_like(ids, dtype="int32")
        elif name == "segment_ids":
            x[name] = np.zeros_like(ids, dtype="int32")
        else:
            raise ValueError(f"Do not know how to make input {name!r}; pass --input FILE.npz.")
    return x


def load_array_file(path):
    """`np.load(path)` (.npy or .npz), with the file named in every failure.

    Raises:
        ValueError: the file is missing, unreadable, or holds Python objects.
    """
    import numpy as np

    if not os.path.isfile(path):
        raise ValueError(f"--input {path}: no such file; give a .npy of token ids, a .npz of "
                         "named inputs or a .txt of prompts.")
    try:
        return np.load(path)  # allow_pickle=False: object arrays are refused, not run
    except (OSError, ValueError) as err:
        raise ValueError(f"--input {path}: not a readable .npy/.npz of numbers ({err}).") from None


def checked_token_ids(ids, path, vocab):
    """Token ids from a .npy file as int32, checked before the cast.

    A cast alone would turn float ids (1.9) into other ids (1) and wrap int64 ids
    of 2**31 and more into small ones: a wrong answer, not an error.

    Raises:
        ValueError: not an integer array, or ids outside [0, vocab) (or int32),
            naming the file, its shape and dtype, and what works.
    """
    import numpy as np

    where = f"--input {path} (shape {ids.shape}, dtype {ids.dtype})"
    if ids.dtype == np.bool_ or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{where}: token ids must be integers. Save whole-number ids with "
                         ".astype('int32'), or pass named inputs of any dtype as a .npz.")
    limit = vocab if vocab else 2**31
    if ids.size:
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= limit:
            raise ValueError(f"{where}: token ids must lie in [0, {limit})"
                             f"{' (the vocabulary size)' if vocab else ''}; found {low}..{high}.")
    return ids.astype("int32")


def prompt_inputs(tokenizer, prompts, where):
    """Token ids of `prompts`, right-padded to the longest, with their padding mask."""
    import numpy as np

    if tokenizer is None:
        raise ValueError(f"{where}: text prompts need a source that carries its tokenizer "
                         "(smollm2, a .gguf file); give token ids as .npy / .npz instead.")
    ids = [np.asarray(tokenizer(p), dtype="int32").reshape(-1) for p in prompts]
    length = max(len(i) for i in ids)
    pad = int(getattr(tokenizer, "pad_token_id", None) or 0)
    token_ids = np.full((len(ids), length), pad, dtype="int32")
    mask = np.zeros((len(ids), length), dtype="int32")
    for row, i in enumerate(ids):
        token_ids[row, :len(i)] = i
        mask[row, :len(i)] = 1
    return {"token_ids": token_ids, "padding_mask": mask}


def first(out):
    return next(iter(out.values())) if isinstance(out, dict) else out


def output_problem(path):
    """Why `--output PATH` cannot be written, or None; tried by creating the
    temporary file the result will go through."""
    if os.path.isdir(path):
        return f"--output {path}: is a folder; give a file name such as {path.rstrip('/')}/out.npy"
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"--output {path}: folder {folder} does not exist"
    tmp = f"{path}.tmp-{os.getpid()}.npy"
    try:
        with open(tmp, "wb"):
            pass
        os.remove(tmp)
    except OSError as e:
        return f"--output {path}: cannot write there ({e.strerror or e})"
    return None


def agree_output(world, problem):
    """Every rank raises rank 0's problem with the output file (rank 0 writes it)."""
    first = world.comm.allgather_object(problem if world.rank == 0 else None)[0]
    if first:
        raise ValueError(f"{first} (seen by rank 0)")


def save_atomic(path, array):
    """Writes `array` to `path` through a temporary file; nothing is left on failure.

    Returns:
        None, or what went wrong (for `_agree_output`).
    """
    import numpy as np

    tmp = f"{path}.tmp-{os.getpid()}.npy"
    try:
        np.save(tmp, array)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        return f"--output {path}: writing failed ({e.strerror or e}); nothing was written"
    return None
