"""Suite `precision`: SmolLM2 in float32, bfloat16, int8 and int4: bytes, memory, speed, tokens.

Weight bytes held per rank, the load's peak RSS rise, decode latency per token
and prefill time (as `generate`), and the greedy agreement of fixed prompts
against float32; bfloat16 and int8 again with tfshard's decode matmuls off.
"""

import json
from pathlib import Path

from tfshard.cli.bench import common


#: Fixed prompts for the precision suite's greedy agreement (>= 20, varied).
PROMPTS = [
    "The capital of France is", "Water boils at", "The largest planet in the solar system is",
    "def fibonacci(n):", "Once upon a time", "The chemical symbol for gold is",
    "In 1969, the first man to walk on the moon was", "The square root of 144 is",
    "My favourite recipe for pancakes", "The theory of relativity was proposed by",
    "import numpy as np\n", "The quick brown fox", "To be or not to be,",
    "The main ingredient of guacamole is", "The speed of light is about",
    "Photosynthesis is the process", "The Great Wall of China", "A haiku about autumn:",
    "The best way to learn a language is", "Mount Everest is located in",
    "The tallest animal on Earth is the", "SELECT name FROM users WHERE",
]


#: The precisions the precision suite compares: name -> tfshard.load arguments (int4: see
#: `common.open_source`).
VARIANTS = {"float32": {"dtype": "float32"}, "bfloat16": {"dtype": "bfloat16"},
            "int8": {"quantize": "int8"}, "int4": {"quantize": "int4"}}


#: Timed beside them: bfloat16 and int8 with tfshard's decode matmuls off (TensorFlow's own).
TF_MATMUL = [("bf16 tf-mm", {"dtype": "bfloat16"}, {"TFSHARD_DECODE_OPS": "0"}),
             ("int8 tf-mm", {"quantize": "int8"}, {"TFSHARD_DECODE_OPS": "0"})]


def agree_child(args):
    """Greedy continuations of PROMPTS in every VARIANT, against float32, on these ranks."""
    import tfshard
    from tfshard.generation import decode_text

    world = tfshard.init()
    texts, ids = {}, {}
    for name, kwargs in VARIANTS.items():
        model = common.open_source(args.source, world, **kwargs)
        tok = (model.inner.preprocessor or model.preprocessor).tokenizer
        out = model.generate(PROMPTS, max_length=48, strip_prompt=True, sampler="greedy")
        texts[name] = [decode_text(t) for t in out]
        ids[name] = [[int(i) for i in list(tok(t))[:args.new_tokens]] for t in texts[name]]
        del model
    result = {}
    a = ids["float32"]
    for name in VARIANTS:
        b = ids[name]
        prefix = [next((k for k, (x, y) in enumerate(zip(ra, rb)) if x != y),
                       min(len(ra), len(rb))) for ra, rb in zip(a, b)]
        result[name] = {
            "prompts": len(PROMPTS),
            "tokens_compared": sum(min(len(ra), len(rb)) for ra, rb in zip(a, b)),
            "tokens_same": sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb)),
            "identical_continuations": sum(ra == rb for ra, rb in zip(a, b)),
            "mean_common_prefix": sum(prefix) / len(prefix), "paris": texts[name][0]}
    if world.rank == 0:
        print("RESULT " + json.dumps(result), flush=True)


def suite_precision(args):
    """SmolLM2 at TP=n in float32 and bf16: bytes, load memory, decode, greedy agreement."""
    me = list(common.CHILD)
    n = args.np
    rows = {}
    runs = [(name, kwargs, None) for name, kwargs in VARIANTS.items()] + TF_MATMUL
    for name, kwargs, env in runs:
        flags = [f"--{k}={v}" for k, v in kwargs.items()]
        rows[f"load {name}"] = common.run(common.launch("mpi", n, me + [
            "_load", "--source", args.source, "--mode", "sharded"] + flags), args.timeout, env)
        rows[f"generate {name}"] = common.run(common.launch("mpi", n, me + [
            "_generate", "--source", args.source, "--mode", "sharded",
            "--repeats", str(args.repeats)] + flags), args.timeout, env)
    rows["agreement"] = common.run(common.launch("mpi", n, me + [
        "_agree", "--source", args.source, "--new-tokens", str(args.new_tokens)]), args.timeout)
    names = [name for name, _, _ in runs]
    print(f"\nprecision: {args.source} at TP={n} (MPI), {common.cpu_model()}; "
          "ratios against float32")
    print(f"{'':<38} " + " ".join(f"{v:>10}" for v in names) + "  "
          + " ".join(f"{v + '/fp32':>13}" for v in names[1:]))
    for label, key, field in (
            ("weights held per rank (MiB)", "load", "weights_mib"),
            ("load: peak RSS rise, worst rank (MiB)", "load", "rise_mib"),
            ("decode per token (ms)", "generate", "decode_ms"),
            ("prefill of 64 tokens (s)", "generate", "prefill_s")):
        vals = [rows[f"{key} {v}"][field] for v in names]
        print(f"{label:<38} " + " ".join(f"{x:>10.2f}" for x in vals) + "  "
              + " ".join(f"{x / vals[0]:>12.2f}x" for x in vals[1:]))
    for name in list(VARIANTS)[1:]:
        g = rows["agreement"][name]
        print(f"greedy, {g['prompts']} prompts x {args.new_tokens} new tokens, {name} vs float32: "
              f"{g['tokens_same']}/{g['tokens_compared']} tokens the same "
              f"({g['tokens_same'] / g['tokens_compared']:.1%}), {g['identical_continuations']} "
              f"continuations identical, mean common prefix {g['mean_common_prefix']:.1f} tokens; "
              f"'The capital of France is' -> {g['paris']!r}")
    print(f"float32: 'The capital of France is' -> {rows['agreement']['float32']['paris']!r}")
    common.write_report(f"precision-{Path(args.source).name}", args, rows)


def add_parsers(sub):
    """Adds the suite `precision` and its job `_agree` to the benchmarks' subcommands."""
    commands = {"precision": suite_precision, "_agree": agree_child}
    for name, p in common.add_commands(sub, commands).items():
        p.add_argument("--source", default="smollm2")
        p.add_argument("--new-tokens", type=int, default=16)
        if name == "precision":
            p.add_argument("--np", type=int, default=2)
            p.add_argument("--repeats", type=int, default=3)
            p.add_argument("--timeout", type=int, default=1800)
