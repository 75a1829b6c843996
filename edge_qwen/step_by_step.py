"""Step-by-step answers (`reasoning="step_by_step"`): the model reasons first, then answers.

Qwen2.5 has no thinking mode, so the reasoning is asked for: two generations through
EdgeQwen.generate.

1. Reasoning: the conversation, with the instruction to reason in numbered steps and end with
   a "Final answer:" line, generated free (no JSON constraint), stopped at that marker. Its
   text is the reasoning, returned apart from the answer as `reasoning_content`.
2. Answer: the conversation, the reasoning as the assistant's turn, and a request for the
   final answer only, generated with the caller's `response_format` (a JSON schema constrains
   the answer, never the reasoning) and stop strings.

The chunks are ReasoningChunks (the shape Qwen3 thinking uses), so `chat` returns
`message["reasoning_content"]` and streams `delta["reasoning_content"]` before the content.
The final chunk's timings add both generations up.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from .errors import RequestError

REASONING_MODES = ("step_by_step",)
_INSTRUCT = {
    "en": ("\n\nThink step by step: first write your reasoning as numbered steps, then write a last line that starts "
           "with \"Final answer:\"."),
    "zh": "\n\n请一步一步地思考：先分步写出推理过程，最后一行以“最终答案：”开头。",
}
_FINAL = {"en": "Now give only the final answer, with no explanation.", "zh": "现在只给出最终答案，不要解释。"}
_MARKERS = ["Final answer", "final answer", "Final Answer", "FINAL ANSWER", "最终答案"]


def check_reasoning(reasoning: Any) -> str | None:
    """None or a known mode; RequestError otherwise."""
    if reasoning is not None and reasoning not in REASONING_MODES:
        raise RequestError(f"reasoning={reasoning!r}; use \"step_by_step\" or leave it out", param="reasoning")
    return reasoning


def _lang(messages: list[dict]) -> str:
    text = next((m.get("content") for m in reversed(messages) if m.get("role") == "user"), "") or ""
    text = text if isinstance(text, str) else ""
    cjk = sum(1 for ch in text if "\u4e00" <= ch <= "\u9fff")
    return "zh" if cjk >= max(2, len(text) // 5) else "en"


def step_by_step(llm: Any, messages: list[dict], *, max_tokens: int | None = None, stop: Any = None,
                 response_format: dict | None = None, **kw: Any) -> Iterator[Any]:
    """ReasoningChunks of a step-by-step answer to `messages` (see the module docstring).

    `max_tokens` bounds each of the two generations; the other keywords go to both.
    """
    from .engine.reasoning import ReasoningChunk

    if not messages or not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise RequestError("messages must be a non-empty list of {role, content} objects", param="messages")
    last = messages[-1]
    if last.get("role") != "user" or not isinstance(last.get("content"), str):
        raise RequestError('reasoning="step_by_step" needs the last message to be a user message with text content',
                           param="messages")
    lang = _lang(messages)
    asked = [*messages[:-1], {**last, "content": last["content"] + _INSTRUCT[lang]}]
    # Both generations' parameters are checked before anything runs (generate checks eagerly and
    # starts lazily; the second's probe is closed unstarted).
    llm.generate(asked, max_tokens=max_tokens, stop=stop, response_format=response_format, **kw).close()
    first = llm.generate(asked, max_tokens=max_tokens, stop=_MARKERS, **kw)

    def run() -> Iterator[Any]:
        parts: list[str] = []
        t1 = None
        try:
            for c in first:
                if c.text:
                    parts.append(c.text)
                    yield ReasoningChunk("", [], None, None, reasoning=c.text)
                if c.finish_reason is not None:
                    t1 = c.timings
                    if c.finish_reason == "cancelled":
                        yield ReasoningChunk("", [], "cancelled", t1)
                        return
        finally:
            first.close()
        reasoning = "".join(parts).rstrip().rstrip("*#").rstrip()
        follow = [*asked, {"role": "assistant", "content": reasoning}, {"role": "user", "content": _FINAL[lang]}]
        second = llm.generate(follow, max_tokens=max_tokens, stop=stop, response_format=response_format, **kw)
        try:
            for c in second:
                timings = c.timings
                if c.finish_reason is not None and t1 is not None and timings is not None:
                    timings = dataclasses.replace(
                        timings, prompt_tokens=timings.prompt_tokens + t1.prompt_tokens,
                        completion_tokens=timings.completion_tokens + t1.completion_tokens,
                        prompt_ms=timings.prompt_ms + t1.prompt_ms, gen_ms=timings.gen_ms + t1.gen_ms,
                        cached_tokens=timings.cached_tokens + t1.cached_tokens)
                yield ReasoningChunk(c.text, c.token_ids, c.finish_reason, timings)
        finally:
            second.close()

    return run()
