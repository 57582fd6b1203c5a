"""The model's tokenizer for the server: prompts as `generate` tokenizes them, chat templates.

A prompt string becomes the ids keras-hub's `generate` would give the model for it (its
preprocessor's tokenizer and start token, no padding), so a request equals `tfshard
generate` of the same prompt. Chat messages go through the model's chat template (Jinja,
as Hugging Face and llama.cpp render it; the GGUF's `tokenizer.chat_template`).
"""

import numpy as np

from tfshard.serve import api


class PreprocessorTokenizer(api.Tokenizer):
    """An `api.Tokenizer` over a keras-hub CausalLM preprocessor.

    Args:
        preprocessor: the keras-hub `CausalLMPreprocessor` (its `tokenizer`).
        chat_template: the Jinja chat template, or None.
    """

    def __init__(self, preprocessor, chat_template=None):
        self.preprocessor = preprocessor
        self.tokenizer = preprocessor.tokenizer
        self.chat_template = chat_template
        self._template = None
        end = getattr(self.tokenizer, "end_token_id", None)
        #: Token ids that end a generation (the end token).
        self.stop_ids = () if end is None else (int(end),)

    def encode(self, text):
        ids = np.asarray(self.tokenizer(text)).reshape(-1).tolist()
        start = getattr(self.tokenizer, "start_token_id", None)
        if getattr(self.preprocessor, "add_start_token", False) and start is not None:
            ids = [int(start)] + ids
        return [int(i) for i in ids]

    def decode(self, ids):
        if not len(ids):
            return ""
        text = self.tokenizer.detokenize(np.asarray(ids, np.int32))
        text = np.asarray(text).item() if hasattr(text, "numpy") or isinstance(text, np.ndarray) else text
        return text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)

    def apply_chat_template(self, messages):
        if not self.chat_template:
            raise api.BadRequest(
                "this model has no chat template; use /v1/completions with a prompt",
                field="messages")
        if self._template is None:
            import jinja2

            env = jinja2.Environment(undefined=jinja2.StrictUndefined, trim_blocks=False)
            self._template = env.from_string(self.chat_template)
        try:
            return self._template.render(messages=messages, add_generation_prompt=True,
                                         bos_token="", eos_token="")
        except Exception as e:  # noqa: BLE001 - a template error names the message fields
            raise api.BadRequest(f"the chat template could not render these messages: {e}",
                                 field="messages") from None
