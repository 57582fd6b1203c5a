"""What to cut, and where: the planner.

resolve.py    Plan (the request: rules or auto) and Plan.resolve, in four steps
structure.py  what the planner reads from a model (attention blocks, pairs, shapes, bytes)
entries.py    PlanEntry (one layer's cut) and HeadCounts (one attention block's)
resolved.py   ResolvedPlan (the result) and its summaries
stages.py     Block, StagePlan, balance: pipeline stage boundaries by cost
layout.py     Layout: each rank's host, which collectives cross hosts and their bytes
Rules themselves are `tfshard.rules` (Column, Row, Vocab, Replicate).
"""

from tfshard.plan.entries import HeadCounts, PlanEntry
from tfshard.plan.resolved import ResolvedPlan
from tfshard.plan.resolve import Plan
from tfshard.plan.structure import attention_ranges

__all__ = ["HeadCounts", "Plan", "PlanEntry", "ResolvedPlan", "attention_ranges"]
