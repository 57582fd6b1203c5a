"""How one layer is cut: the Megatron-style rules, as small frozen values.

    tfshard.shard(model, plan={
        r".*feedforward_intermediate_dense": tfshard.Column(),
        r".*feedforward_output_dense": tfshard.Row(),
        r".*token_embedding": tfshard.Vocab(),
        r".*lm_head": tfshard.Column(gather=True),
    })

They read like PyTorch's `ColwiseParallel` / `RowwiseParallel` and the values of
Keras's `LayoutMap`. The strings "column", "row", "vocab", "replicate" and
"column:gather" stay accepted as shorthand for them.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Rule:
    """Base of the rules; use one of `Column`, `Row`, `Vocab`, `Replicate`."""

    def shorthand(self):
        """The string form ("column", "column:gather", "row", "vocab", "replicate")."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Column(Rule):
    """Output features cut across ranks: each holds `W[:, s:e]` (and `b[s:e]`).

    Args:
        gather: all-gather the output so the next layer sees all features;
            False (the default) leaves it split for a following `Row` layer.
    """

    gather: bool = False

    def shorthand(self):
        return "column:gather" if self.gather else "column"


@dataclasses.dataclass(frozen=True)
class Row(Rule):
    """Input features cut across ranks: each holds `W[s:e]` and the partial
    products are all-reduced (summed); the bias is added once, after."""

    def shorthand(self):
        return "row"


@dataclasses.dataclass(frozen=True)
class Vocab(Rule):
    """An embedding table cut by rows (token ids): each rank looks up its ids
    and the lookups are summed; a tied reverse projection gives its logits."""

    def shorthand(self):
        return "vocab"


@dataclasses.dataclass(frozen=True)
class Replicate(Rule):
    """The whole layer on every rank (the default for layers no rule matches)."""

    def shorthand(self):
        return "replicate"


_BY_NAME = {"column": Column(), "column:gather": Column(gather=True), "row": Row(),
            "vocab": Vocab(), "replicate": Replicate()}


def parse(rule, pattern=None):
    """A `Rule` from a rule object or its string shorthand.

    Args:
        rule: a `Rule`, or one of "column", "column:gather", "row", "vocab",
            "replicate".
        pattern: the layer pattern it is for (named in the error).

    Returns:
        The `Rule`.

    Raises:
        ValueError: anything else, naming the pattern and what works.
    """
    if isinstance(rule, Rule) and type(rule) is not Rule:
        return rule
    if isinstance(rule, str) and rule in _BY_NAME:
        return _BY_NAME[rule]
    raise ValueError(
        f"Unknown rule {rule!r}" + (f" for pattern {pattern!r}" if pattern is not None else "")
        + f"; expected Column(gather=False|True), Row(), Vocab(), Replicate() or one of "
        f"{tuple(_BY_NAME)}.")
