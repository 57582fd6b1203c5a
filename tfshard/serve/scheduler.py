"""Continuous batching: which rows the next decode step runs, sequence by sequence.

The scheduler (rank 0) keeps the requests waiting for a KV-cache slot, and for every slot
in use its sequence: the prompt, how much of it is in the cache, the tokens made so far.
Each `plan()` is one step of the decode step (`tfshard.decode.DecodeStep`), each row a
token at its own slot and position:

- every sequence whose prompt is in the cache steps by one row: its last token, at its
  position; its logits are asked for;
- while the step has room (`prefill_tokens`), waiting sequences are admitted into free
  slots, first come first served, and their prompts go in: whole, or a chunk of at most
  the room left (a long prompt spans steps: chunked prefill, so the running sequences'
  next token is never held up by more than one chunk's work); a prompt's last row asks
  for logits, which give its first token.

A sequence leaves its slot the step it finishes (`finish`), and the slot is taken by the
next waiting request at the next `plan()`: no step waits for a batch to drain.
"""

import collections
import dataclasses

import numpy as np


@dataclasses.dataclass
class Sequence:
    """One request in a slot.

    Attributes:
        request: the `api.Request`.
        slot: its KV-cache slot.
        tokens: prompt ids, then every generated id.
        prompt_len: the prompt's length.
        cached: how many of `tokens` are in the cache.
        state: what the engine keeps with it (sampler, text stream).
    """
    request: object
    slot: int
    tokens: list
    prompt_len: int
    cached: int = 0
    state: object = None

    @property
    def generated(self):
        return len(self.tokens) - self.prompt_len


@dataclasses.dataclass
class Plan:
    """One step: rows `(token, slot, position)`; `rows` the indices whose logits are
    needed, `owners[i]` the `Sequence` that logit row `i` belongs to."""
    tokens: np.ndarray
    slots: np.ndarray
    positions: np.ndarray
    rows: np.ndarray
    owners: list
    prefill_rows: int = 0

    @property
    def empty(self):
        return len(self.tokens) == 0


class Scheduler:
    """Slots, the waiting queue, and each step's plan.

    Args:
        slots: KV-cache slots (most sequences at once).
        max_waiting: most requests queued for a slot (`submit` refuses past it).
        prefill_tokens: most prompt rows per step (the chunk of chunked prefill).
    """

    def __init__(self, slots, max_waiting=64, prefill_tokens=256):
        self.slots = int(slots)
        self.max_waiting = int(max_waiting)
        self.prefill_tokens = max(1, int(prefill_tokens))
        self.waiting = collections.deque()
        self.running = {}  # slot -> Sequence
        self._free = list(range(self.slots - 1, -1, -1))

    def can_queue(self):
        """Whether one more request may wait."""
        return len(self.waiting) < self.max_waiting

    def add(self, request, prompt_ids):
        """Queues a request (the caller checked `can_queue`)."""
        self.waiting.append((request, list(prompt_ids)))

    def busy(self):
        """Whether any request is waiting or running."""
        return bool(self.waiting or self.running)

    def plan(self):
        """The next step's `Plan` (empty when there is nothing to run)."""
        tokens, slots, positions, rows, owners = [], [], [], [], []
        prefill = 0
        # Sequences whose prompt is cached: one row each.
        for seq in sorted(self.running.values(), key=lambda s: s.slot):
            if seq.cached == len(seq.tokens) - 1 and seq.cached >= seq.prompt_len:
                rows.append(len(tokens))
                owners.append(seq)
                tokens.append(seq.tokens[-1])
                slots.append(seq.slot)
                positions.append(len(seq.tokens) - 1)
        # Prompts still going in (admitted earlier), then new ones while there is room.
        room = self.prefill_tokens
        for seq in sorted(self.running.values(), key=lambda s: s.slot):
            if seq.cached < seq.prompt_len and room > 0:
                room -= self._prompt_rows(seq, room, tokens, slots, positions, rows, owners)
        while room > 0 and self.waiting and self._free:
            request, prompt = self.waiting.popleft()
            seq = Sequence(request, self._free.pop(), prompt, len(prompt))
            self.running[seq.slot] = seq
            room -= self._prompt_rows(seq, room, tokens, slots, positions, rows, owners)
        prefill = self.prefill_tokens - room
        as_array = lambda v: np.asarray(v, np.int32)  # noqa: E731
        return Plan(as_array(tokens), as_array(slots), as_array(positions), as_array(rows), owners,
                    prefill)

    @staticmethod
    def _prompt_rows(seq, room, tokens, slots, positions, rows, owners):
        start = seq.cached
        stop = min(seq.prompt_len, start + room)
        for p in range(start, stop):
            tokens.append(seq.tokens[p])
            slots.append(seq.slot)
            positions.append(p)
        seq.cached = stop
        if stop == seq.prompt_len:  # the prompt's last row: its logits give the first token
            rows.append(len(tokens) - 1)
            owners.append(seq)
        return stop - start

    def stepped(self, seq, token):
        """Records the token a step made for `seq` (its last row is now cached)."""
        seq.cached = len(seq.tokens)
        seq.tokens.append(int(token))

    def finish(self, seq):
        """Frees `seq`'s slot."""
        if self.running.get(seq.slot) is seq:
            del self.running[seq.slot]
            self._free.append(seq.slot)

    def drop_waiting(self, request_id):
        """Removes a waiting request; returns it, or None when it is not waiting."""
        for item in list(self.waiting):
            if item[0].id == request_id:
                self.waiting.remove(item)
                return item[0]
        return None

    def in_use(self):
        """Slots in use."""
        return len(self.running)
