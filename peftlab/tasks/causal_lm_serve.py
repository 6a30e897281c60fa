"""`peftlab serve` for causal LMs: OpenAI-compatible POST /v1/chat/completions (rendered
with the run's chat template) and /v1/completions, both with SSE streaming.

Generation runs one request at a time on the model's worker thread (it is not
micro-batched: requests with different lengths and sampling settings would wait for the
longest); the event loop keeps accepting requests meanwhile.
"""

import asyncio
import json
import time
import uuid
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from peftlab.hardware import precision_context
from peftlab.serve import Served, check_texts
from peftlab.tasks.causal_lm import generate_ids, prompt_ids
from peftlab.tasks.sft_data import DEFAULT_CHAT_TEMPLATE


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")  # name, tool fields: not used here
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else \
            "".join(part.text for part in self.content)


class Sampling(BaseModel):
    """The OpenAI fields peftlab honours; other optional fields clients send are ignored."""
    model_config = ConfigDict(extra="ignore")
    model: StrictStr | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=1)  # one choice per request
    stream: bool = False
    stop: StrictStr | list[StrictStr] | None = None
    seed: int | None = None


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(Sampling):
    prompt: StrictStr


def _stops(request: Sampling) -> list[str]:
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    return [s for s in stops if s]


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    cuts = [text.index(s) for s in stops if s in text]
    return (text[:min(cuts)], True) if cuts else (text, False)


def add_routes(app, served: Served, auth) -> None:
    from fastapi import HTTPException
    from fastapi.responses import StreamingResponse
    from transformers import TextIteratorStreamer
    tokenizer = served.tokenizer
    if tokenizer.chat_template is None:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    default_tokens = min(served.recipe.eval.max_new_tokens, served.limits.max_new_tokens)

    def settings(request: Sampling) -> dict:
        if request.model not in (None, served.model_id):
            raise HTTPException(404, f"model '{request.model}' is not served here; this "
                                     f"server has '{served.model_id}'")
        wanted = request.max_completion_tokens or request.max_tokens or default_tokens
        if wanted > served.limits.max_new_tokens:
            raise HTTPException(422, f"max_tokens: {wanted}, at most "
                                     f"{served.limits.max_new_tokens}")
        return {"max_new_tokens": wanted,
                "temperature": 1.0 if request.temperature is None else request.temperature,
                "top_p": request.top_p, "seed": request.seed, "stops": _stops(request)}

    def run(ids: torch.Tensor, options: dict, streamer=None) -> list[int]:
        extra = {"streamer": streamer} if streamer is not None else {}
        if options["top_p"] is not None and options["temperature"] > 0:
            extra["top_p"] = options["top_p"]
        if options["stops"]:
            extra |= {"stop_strings": options["stops"], "tokenizer": tokenizer}
        if options["seed"] is not None:
            torch.manual_seed(options["seed"])
        with precision_context(served.info["precision"], served.device):
            return generate_ids(served.model, tokenizer, ids, options["max_new_tokens"],
                                options["temperature"], **extra)

    def finish(new: list[int], options: dict, stopped: bool) -> str:
        ended = stopped or (new and new[-1] == tokenizer.eos_token_id)
        return "stop" if ended or len(new) < options["max_new_tokens"] else "length"

    async def complete(prompt: str, options: dict) -> tuple[str, str, int, int]:
        ids = prompt_ids(tokenizer, prompt)
        new = await served.call(run, ids, options)
        text, stopped = _cut_at_stop(tokenizer.decode(new, skip_special_tokens=True),
                                     options["stops"])
        return text, finish(new, options, stopped), ids.shape[1], len(new)

    async def stream(prompt: str, options: dict, chunk):
        """SSE events: `chunk(text, finish_reason)` dicts, then [DONE]."""
        ids = prompt_ids(tokenizer, prompt)
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True,
                                        timeout=600)
        job = asyncio.ensure_future(served.call(run, ids, options, streamer))
        loop, sent, stopped = asyncio.get_running_loop(), "", False
        yield f"data: {json.dumps(chunk(None, None))}\n\n"
        while True:
            piece = await loop.run_in_executor(None, next, streamer, None)
            if piece is None:
                break
            if stopped or not piece:
                continue
            text, stopped = _cut_at_stop(sent + piece, options["stops"])
            if len(text) > len(sent):
                yield f"data: {json.dumps(chunk(text[len(sent):], None))}\n\n"
                sent = text
        new = await job
        yield f"data: {json.dumps(chunk('', finish(new, options, stopped)))}\n\n"
        yield "data: [DONE]\n\n"

    def envelope(kind: str) -> dict:
        return {"id": f"{'chatcmpl' if 'chat' in kind else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                "object": kind, "created": int(time.time()), "model": served.model_id}

    @app.post("/v1/chat/completions", dependencies=[auth])
    async def chat(request: ChatRequest):
        options = settings(request)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in request.messages]
        check_texts([m["content"] or " " for m in messages], served.limits, "messages")
        prompt = tokenizer.apply_chat_template(messages, tokenize=False,
                                               add_generation_prompt=True)
        if request.stream:
            head = envelope("chat.completion.chunk")

            def chunk(text, reason):
                delta = {"role": "assistant", "content": ""} if text is None else \
                    ({"content": text} if text else {})
                return head | {"choices": [{"index": 0, "delta": delta,
                                            "finish_reason": reason}]}
            return StreamingResponse(stream(prompt, options, chunk),
                                     media_type="text/event-stream")
        text, reason, prompt_tokens, new_tokens = await complete(prompt, options)
        return envelope("chat.completion") | {
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": reason}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": new_tokens,
                      "total_tokens": prompt_tokens + new_tokens}}

    @app.post("/v1/completions", dependencies=[auth])
    async def completions(request: CompletionRequest):
        options = settings(request)
        check_texts([request.prompt], served.limits, "prompt")
        if request.stream:
            head = envelope("text_completion")

            def chunk(text, reason):
                return head | {"choices": [{"index": 0, "text": text or "", "logprobs": None,
                                            "finish_reason": reason}]}
            return StreamingResponse(stream(request.prompt, options, chunk),
                                     media_type="text/event-stream")
        text, reason, prompt_tokens, new_tokens = await complete(request.prompt, options)
        return envelope("text_completion") | {
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": new_tokens,
                      "total_tokens": prompt_tokens + new_tokens}}
