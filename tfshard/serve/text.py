"""A request's text as its tokens come: deltas that never split a character, stop strings.

Detokenizing token by token can cut a multi-byte character in two (byte-level BPE); a stop
string can arrive across tokens. `TextStream` decodes every generated token each time and
hands out only what is settled: text that ends in a whole character and that no stop
string could still begin in. A stop string ends the text before it.
"""


class TextStream:
    """The settled text of one request's generated tokens.

    Args:
        decode: token ids -> text.
        stop: stop strings (the text ends before the first one found).
    """

    def __init__(self, decode, stop=()):
        self.decode = decode
        self.stop = tuple(s for s in stop if s)
        self.sent = ""
        self.stopped = False

    def push(self, token_ids):
        """New text for the generated ids so far (all of them, each call).

        Returns:
            `(delta, stopped)`: the text not sent yet that is settled, and whether a stop
            string was found (the text then ends before it; nothing more is sent).
        """
        if self.stopped:
            return "", True
        text = self.decode(token_ids)
        for s in self.stop:
            at = text.find(s)
            if at != -1:
                text = text[:at]
                self.stopped = True
        if not self.stopped:
            if text.endswith("\ufffd"):  # a character still being spelled out in bytes
                text = text.rstrip("\ufffd")
            hold = max((len(s) - 1 for s in self.stop), default=0)
            for n in range(min(hold, len(text)), 0, -1):  # a stop string may be starting
                if any(s.startswith(text[-n:]) for s in self.stop):
                    text = text[:-n]
                    break
        delta = text[len(self.sent):] if text.startswith(self.sent) else ""
        self.sent += delta
        return delta, self.stopped

    def finish(self, token_ids):
        """The rest of the text when the request ends (held-back text included)."""
        if self.stopped:
            return ""
        text = self.decode(token_ids)
        delta = text[len(self.sent):] if text.startswith(self.sent) else ""
        self.sent += delta
        return delta
