"""The `tfshard` command's commands: predict, generate and inspect (the parser is tfshard.cli).

Each command imports TensorFlow and the library when it runs, so `tfshard --help`
and argument errors never load them.
"""

import os
import time

from tfshard.cli import files


def _replicas_strategy(args, where):
    """`--replicas N`: a MirroredStrategy of N logical CPUs in this process (made before
    anything else touches TensorFlow, which fixes its devices once), else None.

    Raises:
        ValueError: --replicas under horovodrun or tfshard launch, or below 1.
    """
    n = getattr(args, "replicas", None)
    if n is None:
        return None
    from tfshard import comm as comm_lib

    backend = comm_lib.detect_backend()
    if n < 1 or backend != "local":
        raise ValueError(
            f"{where} --replicas {n}: " + (f"the ranks are already the {backend} job's processes; "
                                           "drop --replicas (or run in one process without the "
                                           "launcher)." if backend != "local" else
                                           "needs at least 1 replica."))
    import tensorflow as tf

    import tfshard

    return tf.distribute.MirroredStrategy(tfshard.cpu_devices(n))


def cmd_predict(args):
    import numpy as np

    import tfshard
    from tfshard import models
    from tfshard.cli import precision

    strategy = _replicas_strategy(args, "tfshard predict")
    _timeline_before_init(args.logdir)
    world = tfshard.init()
    say = print if world.rank == 0 else (lambda *a, **k: None)
    if args.output:  # before any work: a bad path must not cost a whole run
        files.agree_output(world, files.output_problem(args.output) if world.rank == 0 else None)
    sharded = None
    if args.source in models.NAMES:
        say(f"[tfshard] {world.backend} world of {world.size} rank(s); building {args.source}")
        model, vocab, input_names = models.build(args.source, seed=args.seed, dtype=args.dtype,
                                                 quantize=args.quantize)
    else:
        # Real weights: each rank loads only its slices; the reference is the
        # same file loaded whole in this process.
        sharded, reference = _load_both(args, world, say, strategy)
        model = None if reference is None else reference.inner
        vocab, input_names = _vocab_and_inputs(sharded.inner)
    tokenizer = None if sharded is None else sharded.tokenizer
    if args.prompt is not None:
        x = files.prompt_inputs(tokenizer, [args.prompt], f"--prompt on {args.source!r}")
        say(f"[tfshard] prompt {args.prompt!r} -> {x['token_ids'].shape[1]} tokens")
    else:
        x = files.inputs(input_names, vocab, args.rows, args.seq_len, args.seed + 1, args.input,
                    tokenizer=tokenizer)

    ref = ref_secs = None
    if not args.no_compare:
        # Every rank runs the reference at the same time on its own share of the
        # CPU, so no rank spins in a collective while rank 0's reference is timed.
        model.predict(x, batch_size=args.batch_size, verbose=0)  # trace + warm up
        t0 = time.perf_counter()
        ref = model.predict(x, batch_size=args.batch_size, verbose=0)
        ref_secs = time.perf_counter() - t0

    if sharded is None:
        sharded = tfshard.shard(model, tensor_parallel=args.tensor_parallel,
                                comm_dtype=args.comm_dtype, strategy=strategy,
                                **_stages(args))
        say("\n".join(sharded.plan.totals()))
    sharded.predict(x, batch_size=args.batch_size, verbose=0)  # trace + warm up
    callbacks = []
    if args.logdir:
        callbacks.append(tfshard.TensorBoard(args.logdir, profile_batches=args.profile))
    t0 = time.perf_counter()
    out = sharded.predict(x, batch_size=args.batch_size, verbose=args.verbose,
                          callbacks=callbacks)
    secs = time.perf_counter() - t0
    if callbacks:
        _report_logdir(callbacks[0], sharded, say)

    logits = np.asarray(files.first(out))
    rows = logits.shape[0]
    tokens = rows * (logits.shape[1] if logits.ndim > 2 else 1)
    say(f"[tfshard] global output {tuple(logits.shape)} {logits.dtype} on every rank")
    if tokenizer is not None and logits.ndim == 3 and "padding_mask" in x:
        # Text prompts: the next token after each prompt's last real position.
        for row in range(min(rows, 4)):
            last = logits[row, int(np.sum(x["padding_mask"][row])) - 1]
            top = np.argsort(-last)[:5]
            words = [repr(tokenizer.detokenize([int(t)])) for t in top]
            say(f"[tfshard] next token after prompt {row}: {words[0]} "
                f"(top 5: {', '.join(words)})")
    elif logits.ndim >= 2:
        say(f"[tfshard] argmax of the last position, first rows: "
            f"{np.argmax(logits.reshape(rows, -1, logits.shape[-1])[:4, -1], -1).tolist()}")
    say(f"[tfshard] sharded predict: {secs:.3f} s for {tokens} tokens "
        f"({tokens / secs:.0f} tokens/s, TP={sharded.tensor_parallel}, "
        f"PP={getattr(sharded, 'pipeline', 1)}, {_backend(sharded)})")
    if ref is not None:
        dtype = precision.compute_dtype(sharded.inner)
        if dtype == "float32" and sharded.plan.comm_dtype:  # gathers rounded to 16 bits
            dtype = sharded.plan.comm_dtype
        c = precision.compare(files.first(ref), logits, dtype)
        argmax = (f"argmax identical: {c['decided_equal']}" if dtype in ("float32", "float64")
                  else f"argmax agrees at {c['argmax_agree']:.1%} of positions, identical "
                       f"where the margin exceeds 2x tolerance: {c['decided_equal']}")
        say(f"[tfshard] vs unsharded model.predict on one rank's CPU share ({ref_secs:.3f} s, "
            f"sharded/unsharded throughput {ref_secs / secs:.2f}x): max|diff| "
            f"{c['max_diff']:.3g} (tolerance {c['tol']:.3g}, {dtype}), {argmax} -> "
            f"{'MATCH' if c['ok'] else 'MISMATCH'}")
        if not c["ok"]:
            return 1
    if args.output:
        files.agree_output(world, files.save_atomic(args.output, logits) if world.rank == 0 else None)
        say(f"[tfshard] wrote {args.output}")
    return 0


def _timeline_before_init(logdir):
    """Under horovodrun with --logdir, lets the TensorBoard callback record Horovod's
    timeline (Horovod reads HOROVOD_TIMELINE once, in init)."""
    from tfshard import comm

    if logdir and comm.detect_backend() == "horovod":
        os.environ.setdefault("HOROVOD_TIMELINE", "DYNAMIC")


def _report_logdir(callback, sharded, say):
    """Prints where the TensorBoard logs went and what the collectives cost."""
    counters = sharded.collective_counters()
    mine = counters.get(sharded.rank) or next(iter(counters.values()), None)
    say(f"[tfshard] TensorBoard logs in {callback.logdir} (one run per rank"
        f"{'; Horovod timeline ' + callback.timeline_path if callback.timeline_path else ''}"
        f"{'; profile of ' + str(callback.profile_batches) + ' batch(es)' if callback.profile_batches else ''}"
        f"): tensorboard --logdir {callback.logdir}")
    if mine:
        say(f"[tfshard] rank {sharded.rank}'s forwards so far: {mine['collectives']} collectives, "
            f"{mine['bytes'] / 2**20:.1f} MiB, {mine['seconds']:.3f} s in collectives")


def _backend(sharded):
    """How the ranks run, for messages: the world's backend, or MirroredStrategy's replicas."""
    if len(sharded.replicas) > 1:
        return f"MirroredStrategy, {len(sharded.replicas)} replicas in one process"
    return sharded.world.backend


def _decode_path(sharded):
    """Which decode step ran: tfshard's (and its kernels) or keras-hub's loop, and why."""
    path = getattr(sharded, "decode_path", None) or "keras-hub"
    if path != "fused":
        return path
    from tfshard.layers import matvec

    return f"tfshard's fused step ({matvec.kernels_isa()} kernels)"


def _load_both(args, world, say, strategy=None):
    """The sharded model (each rank reads its slices) and, unless --no-compare,
    the same source loaded whole in this process as the reference."""
    import tfshard
    from tfshard import comm as comm_lib

    ranks = (f"{strategy.num_replicas_in_sync} MirroredStrategy replica(s) in one process"
             if strategy is not None else f"{world.backend} world of {world.size} rank(s)")
    say(f"[tfshard] {ranks}; loading {args.source} sharded")
    t0 = time.perf_counter()
    quantize = getattr(args, "quantize", None)
    sharded = tfshard.load(args.source, tensor_parallel=args.tensor_parallel, dtype=args.dtype,
                           quantize=quantize, comm_dtype=getattr(args, "comm_dtype", None),
                           strategy=strategy, **_stages(args))
    memory, comm = sharded.plan.totals()
    say(f"[tfshard] loaded in {time.perf_counter() - t0:.1f} s; {memory}\n[tfshard] {comm}")
    reference = None if args.no_compare else tfshard.load(
        args.source, world=tfshard.World(comm_lib.create("local"), "local"), dtype=args.dtype,
        quantize=quantize)
    return sharded, reference


def cmd_generate(args):
    import tfshard
    from tfshard import models
    from tfshard.cli import precision
    from tfshard.generation import decode_text as _text

    if args.source in models.NAMES:
        raise ValueError(
            f"{args.source!r} is a built-in test model (random weights, no tokenizer), so it "
            "cannot take a text prompt; generate from smollm2, a .gguf file, or a .keras "
            f"CausalLM saved with its preprocessor (built-ins: tfshard predict {args.source}).")
    strategy = _replicas_strategy(args, "tfshard generate")
    world = tfshard.init()
    say = print if world.rank == 0 else (lambda *a, **k: None)
    sharded, reference = _load_both(args, world, say, strategy)
    preprocessor = sharded.inner.preprocessor or sharded.preprocessor
    if preprocessor is None:
        raise ValueError(f"{args.source!r} carries no tokenizer, so it cannot take a text "
                         "prompt; use smollm2, a .gguf file, or a .keras CausalLM saved with "
                         "its preprocessor.")
    prompts = args.prompt
    lengths = [_prompt_length(preprocessor, p) for p in prompts]
    max_length = max(lengths) + args.max_new_tokens
    kwargs = dict(max_length=max_length, strip_prompt=True, sampler=args.sampler)
    t0 = time.perf_counter()
    out = sharded.generate(prompts, **kwargs)
    secs = time.perf_counter() - t0
    for prompt, text in zip(prompts, out):
        say(f"[tfshard] {prompt!r} -> {_text(text)!r}")
    say(f"[tfshard] sharded generate: {secs:.1f} s for up to {args.max_new_tokens} new tokens x "
        f"{len(prompts)} prompt(s), tracing the loop included (TP={sharded.tensor_parallel}, "
        f"PP={getattr(sharded, 'pipeline', 1)}, "
        f"{sharded.groups} group(s), {_backend(sharded)}; decode: {_decode_path(sharded)}; "
        "steady-state latency: scripts/bench.py decode)")
    if reference is None:
        return 0
    # Every rank runs the reference at once, so none waits in a collective meanwhile.
    ref = reference.generate(prompts, **kwargs)
    same = [_text(a) == _text(b) for a, b in zip(ref, out)]
    dtype = precision.compute_dtype(sharded.inner)
    full = dtype in ("float32", "float64")
    say(f"[tfshard] vs the unsharded model generating in one process: "
        f"{'MATCH' if all(same) else 'MISMATCH' if full else 'DIFFERS'}"
        f"{'' if full else f' ({sum(same)} of {len(same)} identical in {dtype}, where a near-tie can break either way)'}")
    if not all(same):
        for a, b in zip(ref, out):
            say(f"[tfshard]   unsharded {_text(a)!r} vs sharded {_text(b)!r}")
        return 1 if full else 0
    return 0


def _prompt_length(preprocessor, prompt):
    """Tokens `generate` sees for a prompt (start token included when added)."""
    import numpy as np

    room = len(preprocessor.tokenizer(prompt)) + 2
    mask = preprocessor.generate_preprocess([prompt], sequence_length=room)["padding_mask"]
    return int(np.asarray(mask).sum())


def cmd_inspect(args):
    if args.check:
        return _inspect_check(args)
    from tfshard import models
    from tfshard.plan import Plan

    if args.source in models.NAMES:
        model, _, _ = models.build(args.source, seed=args.seed, dtype=args.dtype)
    else:
        from tfshard import io as tfio

        if not os.path.exists(args.source) and args.source not in tfio.NAMED:
            raise ValueError(
                f"Unknown model {args.source!r}: no such file or folder, and not a built-in "
                f"model ({', '.join(models.NAMES)}) or a real one ({', '.join(sorted(tfio.NAMED))}).")
        model = tfio.build_deferred(args.source, dtype=args.dtype)  # shapes only: nothing read
    plan = Plan.auto(model, args.tensor_parallel)
    for rank in range(args.tensor_parallel) if args.all_ranks else [0]:
        print(plan.summary(rank=rank))
    if args.pipeline:
        from tfshard.pipeline.staged import plan_pipeline

        stages = _stages(args)
        print("\n" + plan_pipeline(model, args.pipeline, stages["pipeline_split"], Plan.auto(),
                                   args.tensor_parallel,
                                   balance=stages["pipeline_balance"])[1].summary())
    return 0


def _stages(args):
    """`shard`/`load`'s pipeline arguments from --pipeline, --pipeline-split and
    --pipeline-balance."""
    split = getattr(args, "pipeline_split", None)
    return {"pipeline": getattr(args, "pipeline", None),
            "pipeline_split": [int(c) for c in split.split(",")] if split else None,
            "pipeline_balance": getattr(args, "pipeline_balance", "compute")}


def _inspect_check(args):
    """`inspect --check`: sharded vs unsharded, layer by layer.

    Under horovodrun or `tfshard launch` the ranks are the processes; in one
    process, `--tensor-parallel` MirroredStrategy replicas on logical CPUs.
    """
    import tfshard
    from tfshard import comm as comm_lib
    from tfshard import models
    from tfshard.cli import drift

    one_process = comm_lib.detect_backend() == "local"
    if one_process and args.replicas is None:
        args.replicas = args.tensor_parallel  # in one process the ranks are replicas
    strategy = _replicas_strategy(args, "tfshard inspect --check")
    world = tfshard.init()
    say = print if world.rank == 0 else (lambda *a, **k: None)
    if args.source in models.NAMES:
        model, vocab, input_names = models.build(args.source, seed=args.seed, dtype=args.dtype)
        reference, _, _ = models.build(args.source, seed=args.seed, dtype=args.dtype)
        sharded = tfshard.shard(model, strategy=strategy)
        tokenizer = None
    else:
        args.tensor_parallel, args.no_compare = None, False
        sharded, loaded = _load_both(args, world, say, strategy)
        reference = loaded.inner
        vocab, input_names = _vocab_and_inputs(reference)
        tokenizer = sharded.tokenizer
    x = files.inputs(input_names, vocab, args.rows, args.seq_len, args.seed + 1, args.input,
                tokenizer=tokenizer)
    say(f"[tfshard] {args.source} at TP={sharded.tensor_parallel} "
        f"({_backend(sharded)}) vs unsharded, "
        f"inputs {', '.join(f'{k} {tuple(v.shape)}' for k, v in x.items()) if isinstance(x, dict) else tuple(x.shape)}")
    rows = drift.layer_drift(sharded, reference, x)
    say(drift.format_drift(rows))
    return 0 if drift.first_parting(rows) is None else 1


def _vocab_and_inputs(model):
    """A loaded model's vocabulary size (None unless a keras-hub backbone) and input names."""
    import keras

    backbone = getattr(model, "backbone", model)
    return (getattr(backbone, "vocabulary_size", None),
            [t.name for t in keras.tree.flatten(model.inputs)])


def cmd_serve(args):
    """`tfshard serve SOURCE`: the model behind an OpenAI- and TF-Serving-compatible HTTP
    server on rank 0 (every rank serves its shards); see tfshard/serve/."""
    import tfshard
    from tfshard import models
    from tfshard import serve

    strategy = _replicas_strategy(args, "tfshard serve")
    world = tfshard.init()
    say = print if world.rank == 0 else (lambda *a, **k: None)
    if args.source in models.NAMES:
        model, _, _ = models.build(args.source, seed=args.seed, dtype=args.dtype,
                                   quantize=args.quantize)
        sharded = tfshard.shard(model, tensor_parallel=args.tensor_parallel, strategy=strategy,
                                **_stages(args))
        sharded.attach_source(args.source, None)
    else:
        args.no_compare = True
        sharded, _ = _load_both(args, world, say, strategy)
    return serve.serve(sharded, host=args.host, port=args.port, api_key=args.api_key,
                       name=args.name, slots=args.slots, max_len=args.max_len,
                       max_tokens=args.max_tokens, max_waiting=args.max_waiting,
                       prefill_tokens=args.prefill_tokens, batching=args.batching) or 0
