"""The server's engine pieces without a model: the scheduler's steps, sampling, text streaming.

The scheduler (tfshard/serve/scheduler.py) must put every running sequence's next token
in each step, admit waiting requests into free slots at once, cut long prompts into
chunks, and free a finished sequence's slot for the next request; a seeded sampler must
draw the same tokens whatever else runs; the text stream must never split a character
nor let out the start of a stop string.
"""

import types

import numpy as np

from tfshard.serve import api
from tfshard.serve.sampling import Sampler
from tfshard.serve.scheduler import Scheduler
from tfshard.serve.text import TextStream


def _request(i):
    return types.SimpleNamespace(id=f"r{i}")


def test_steps_hold_every_running_row_and_chunked_prompts():
    s = Scheduler(slots=2, max_waiting=5, prefill_tokens=4)
    s.add(_request(0), [10, 11, 12])        # fits one chunk
    s.add(_request(1), [20, 21, 22, 23, 24, 25])  # spans two chunks
    s.add(_request(2), [30])                # waits for a slot
    plan = s.plan()
    # Request 0's whole prompt, then the first row of request 1's (the 4 rows of room).
    assert plan.tokens.tolist() == [10, 11, 12, 20]
    assert plan.slots.tolist() == [0, 0, 0, 1]  # slots are handed out from 0 up
    assert plan.positions.tolist() == [0, 1, 2, 0]
    assert [o.request.id for o in plan.owners] == ["r0"] and plan.rows.tolist() == [2]
    seq0 = plan.owners[0]
    s.stepped(seq0, 13)
    plan = s.plan()
    # Request 0 decodes one row; request 1's prompt continues (the room is for prompt rows).
    assert plan.tokens.tolist() == [13, 21, 22, 23, 24]
    assert plan.positions.tolist() == [3, 1, 2, 3, 4]
    assert plan.rows.tolist() == [0]
    s.stepped(seq0, 14)
    plan = s.plan()
    # Request 1's last prompt row asks for logits: its first token.
    assert plan.tokens.tolist() == [14, 25] and plan.rows.tolist() == [0, 1]
    seq1 = plan.owners[1]
    s.finish(seq0)  # the slot goes to the waiting request at the next step
    s.stepped(seq1, 26)
    plan = s.plan()
    assert plan.tokens.tolist() == [26, 30]
    assert plan.slots.tolist() == [1, seq0.slot] and plan.positions.tolist() == [6, 0]
    assert plan.rows.tolist() == [0, 1]
    assert not s.waiting and s.in_use() == 2


def test_waiting_requests_can_be_dropped_and_the_queue_is_bounded():
    s = Scheduler(slots=1, max_waiting=2)
    s.add(_request(0), [1])
    assert s.can_queue()
    s.add(_request(1), [2])
    assert not s.can_queue()
    assert s.drop_waiting("r1").id == "r1" and s.drop_waiting("r9") is None


def test_a_seeded_sampler_draws_the_same_tokens_alone_or_beside_others():
    logits = np.random.default_rng(0).normal(size=(20, 50)).astype(np.float32)
    params = api.SamplingParams(temperature=0.7, top_p=0.9, top_k=20, seed=5)
    a = Sampler(params, seed=1)
    other = Sampler(api.SamplingParams(temperature=1.0, seed=9), seed=2)
    first = []
    for row in logits:
        first.append(a(row))
        other(row)  # another request drawing in between changes nothing
    b = Sampler(params, seed=123)  # params.seed wins over the engine's seed
    assert [b(row) for row in logits] == first
    greedy = Sampler(api.SamplingParams(temperature=0), seed=0)
    assert [greedy(row) for row in logits] == [int(np.argmax(r)) for r in logits]


def test_text_stream_holds_back_split_characters_and_stop_strings():
    pieces = {1: "Hel", 2: "lo", 3: " wor", 4: "ld", 5: "\ufffd", 6: "é", 7: "END", 8: "x"}
    decode = lambda ids: "".join(pieces[i] for i in ids)  # noqa: E731
    t = TextStream(decode, stop=("world",))
    out = [t.push([1]), t.push([1, 2]), t.push([1, 2, 3])]
    assert out == [("Hel", False), ("lo", False), (" ", False)]  # " wor" may start "world"
    assert t.push([1, 2, 3, 4]) == ("", True)  # the stop string ends the text before it
    assert t.sent == "Hello "
    t = TextStream(decode)
    assert t.push([5]) == ("", False)  # half a character: nothing yet
    assert t.push([6]) == ("é", False)
    t = TextStream(decode, stop=("END",))
    assert t.push([8]) == ("x", False) and t.finish([8]) == ""
