"""The request bodies as pydantic models: OpenAI's completions and chat, TF Serving's predict."""

from typing import Any, Dict, List, Literal, Optional, Union

import pydantic
from pydantic import Field, StrictBool, StrictInt, StrictStr

# Integers are strict (10.0 and "10" are not a max_tokens; JSON's true is not 1); numbers
# accept integers and floats, never booleans or strings.
Number = pydantic.StrictFloat


class Body(pydantic.BaseModel):
    """A request body: unknown fields are ignored (clients send fields this server does
    not use, like `user`), known ones are checked."""
    model_config = pydantic.ConfigDict(extra="ignore")


class StreamOptions(Body):
    """`stream_options`: `include_usage` adds a last chunk with the usage counts."""
    include_usage: Optional[StrictBool] = None


class Sampling(Body):
    """The fields OpenAI's completions and chat completions share.

    Attributes:
        model: the served model's name (None: the served model).
        max_tokens: the most tokens to generate (default: 16 for completions, what the
            context leaves for chat).
        temperature: 0 (greedy) to 2; default 1.
        top_p: nucleus mass in (0, 1]; default 1.
        top_k: keep the k likeliest tokens (0 or -1: off); an extension.
        seed: the request's random seed.
        stop: a string or a list of strings that end the text.
        n: choices per request: only 1.
        stream: answer as server-sent events.
        stream_options: `{"include_usage": true}` for a usage chunk at the end.
        presence_penalty, frequency_penalty, logit_bias: only their neutral values (0,
            0, {}), which OpenAI's clients may send.
    """
    model: Optional[StrictStr] = None
    max_tokens: Optional[StrictInt] = Field(None, ge=1)
    temperature: Optional[Number] = Field(None, ge=0, le=2)
    top_p: Optional[Number] = Field(None, gt=0, le=1)
    top_k: Optional[StrictInt] = Field(None, ge=-1)
    seed: Optional[StrictInt] = None
    stop: Optional[Union[StrictStr, List[StrictStr]]] = None
    n: Optional[StrictInt] = None
    stream: Optional[StrictBool] = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: Optional[Number] = None
    frequency_penalty: Optional[Number] = None
    logit_bias: Optional[Dict[str, Any]] = None
    user: Optional[StrictStr] = None


class CompletionRequest(Sampling):
    """`POST /v1/completions`.

    Attributes:
        prompt: a string, a list of token ids, or a list of one string (checked by the
            route, to name the element at fault).
        echo, logprobs, best_of, suffix: not supported beyond their neutral values.
    """
    prompt: Any = None
    echo: Optional[StrictBool] = None
    logprobs: Optional[StrictInt] = None
    best_of: Optional[StrictInt] = None
    suffix: Optional[StrictStr] = None


class ContentPart(Body):
    """One part of a message's content: only text parts."""
    type: Literal["text"]
    text: StrictStr


class ChatMessage(Body):
    """One chat message: `role` ("system", "developer", "user" or "assistant") and its
    `content` (a string, or a list of text parts)."""
    role: StrictStr
    content: Optional[Union[StrictStr, List[ContentPart]]] = None
    name: Optional[StrictStr] = None

    def text(self):
        """The message's content as one string."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(Sampling):
    """`POST /v1/chat/completions`.

    Attributes:
        messages: the conversation, at least one message.
        max_completion_tokens: OpenAI's newer name of `max_tokens` (wins over it).
        logprobs, top_logprobs, tools: not supported beyond their neutral values.
    """
    messages: List[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: Optional[StrictInt] = Field(None, ge=1)
    logprobs: Optional[StrictBool] = None
    top_logprobs: Optional[StrictInt] = None
    tools: Optional[List[Any]] = None


class PredictRequest(Body):
    """`POST /v1/models/NAME:predict` (TF Serving's REST API).

    Attributes:
        signature_name: "" or "serving_default" (the model's one signature).
        instances: row format: a list of rows (values, or objects of named inputs).
        inputs: columnar format: a value (batch first), or an object of named values.
    """
    signature_name: Optional[StrictStr] = None
    instances: Any = None
    inputs: Any = None
