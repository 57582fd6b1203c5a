"""A model's tokenizer and preprocessor in a checkpoint folder, as keras-hub presets keep them.

`save` writes keras-hub's own files (`preprocessor.json`, `tokenizer.json`, the tokenizer's
assets: vocabulary, merges) into `FOLDER`, plus `tfshard_tokenizer.json`: the special
tokens a tokenizer built from a GGUF file carries outside its config (start, end and pad
tokens) and the model's chat template. `load` rebuilds the same preprocessor, so a
checkpoint of `tfshard.load("smollm2")` generates from strings and serves chat as the
GGUF did.
"""

import json
import os

#: The checkpoint's sub-folder holding the preprocessor.
FOLDER = "preprocessor"
_EXTRA = "tfshard_tokenizer.json"
_SPECIAL = ("start_token", "end_token", "pad_token")


def save(preprocessor, folder, chat_template=None):
    """Writes `preprocessor` (a keras-hub preprocessor with a `tokenizer`) into `folder`.

    Args:
        preprocessor: the preprocessor.
        folder: where (created).
        chat_template: the model's chat template (Jinja), or None.
    """
    os.makedirs(folder, exist_ok=True)
    preprocessor.save_to_preset(folder)
    tok = preprocessor.tokenizer
    extra = {"special": {k: getattr(tok, k, None) for k in _SPECIAL
                         if getattr(tok, k, None) is not None},
             "chat_template": chat_template}
    with open(os.path.join(folder, _EXTRA), "w") as f:
        json.dump(extra, f, indent=1)


def load(folder):
    """The preprocessor `save` wrote, and the chat template: `(preprocessor, template)`,
    or `(None, None)` when `folder` does not exist.

    Raises:
        ValueError: the folder is there but cannot be read (the file is named).
    """
    if not os.path.isdir(folder):
        return None, None
    import keras
    import keras_hub

    try:
        with open(os.path.join(folder, "tokenizer.json")) as f:
            tok = keras.saving.deserialize_keras_object(json.load(f))
        tok.load_assets(os.path.join(folder, "assets", "tokenizer"))
        with open(os.path.join(folder, "preprocessor.json")) as f:
            config = json.load(f)["config"]
        extra = {}
        if os.path.exists(os.path.join(folder, _EXTRA)):
            with open(os.path.join(folder, _EXTRA)) as f:
                extra = json.load(f)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{folder}: cannot read the saved tokenizer: {e}") from e
    for kind in _SPECIAL:
        token = extra.get("special", {}).get(kind)
        if token is None:
            setattr(tok, kind, None)
            setattr(tok, f"{kind}_id", None)
        else:
            tok._add_special_token(token, kind)  # as tfshard.io.gguf_llama builds it
    preprocessor = keras_hub.models.CausalLMPreprocessor(
        tokenizer=tok, sequence_length=config.get("sequence_length", 1024),
        add_start_token=config.get("add_start_token", True),
        add_end_token=config.get("add_end_token", True))
    return preprocessor, extra.get("chat_template")
