"""Qwen3 thinking: whether a request thinks, and its `<think>...</think>` reasoning split from the answer.

Qwen3 writes its reasoning between `<think>` and `</think>`, then the answer. Thinking is on by
default for a model whose chat template knows it (Qwen3's has `enable_thinking`);
`enable_thinking=False` turns it off the way Qwen3's template does (an empty think block
pre-filled after the generation prompt), and `/think` or `/no_think` in the latest user or
system message switches it turn by turn (Qwen's "soft switch"; the text stays in the prompt).

The split is returned apart, as vLLM and llama-server do: the message's `reasoning_content`
and, streamed, `reasoning_content` deltas before the `content` ones. A response_format
constrains the answer only: `AfterThinking` lets the reasoning run free and hands the tokens
after `</think>` to the JSON constraint.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import RequestError
from .generate import GenerationChunk

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# What Qwen3's template appends after the generation prompt when enable_thinking is false.
EMPTY_THINK = "<think>\n\n</think>\n\n"
_SWITCH = re.compile(r"/(no_think|think)\b")


def model_thinks(chat_template: str | None) -> bool:
    """Whether the model has a thinking mode (its chat template handles enable_thinking or <think>)."""
    return bool(chat_template) and ("enable_thinking" in chat_template or THINK_OPEN in chat_template)


def thinking_enabled(messages: list[dict], enable_thinking: bool | None, chat_template: str | None) -> bool:
    """Resolve the request's thinking mode: enable_thinking=False wins; otherwise the latest
    `/think` or `/no_think` in the last user or system message that has one; otherwise on.

    RequestError for enable_thinking=True on a model without a thinking mode.
    """
    if enable_thinking is not None and not isinstance(enable_thinking, bool):
        raise RequestError(f"enable_thinking must be true or false, got {enable_thinking!r}",
                           param="enable_thinking")
    if not model_thinks(chat_template):
        if enable_thinking:
            raise RequestError("this model has no thinking mode (its chat template knows no <think> block); "
                               "use a Qwen3 model or leave enable_thinking out", param="enable_thinking")
        return False
    if enable_thinking is False:
        return False
    for m in reversed(messages):
        content = m.get("content")
        if m.get("role") in ("user", "system") and isinstance(content, str):
            found = _SWITCH.findall(content)
            if found:
                return found[-1] == "think"
    return True


@dataclass
class ReasoningChunk(GenerationChunk):
    """A GenerationChunk whose `text` is answer only, with the reasoning beside it.

    `token_ids` are the tokens behind `text` (reasoning tokens are not passed on, so nothing
    downstream mistakes a `<tool_call>` written while thinking for a call).
    """

    reasoning: str = ""


class ReasoningSplitter:
    """Splits streamed text into reasoning and answer at `<think>` / `</think>`, even when a tag
    is cut across chunks (a partial tag is held back until the next text decides it).

    `in_reasoning`: the prompt already opened the think block (a template that pre-fills
    `<think>`); otherwise a `<think>` at the very start of the reply (after whitespace) opens it.
    """

    def __init__(self, in_reasoning: bool = False):
        self.state = "reasoning" if in_reasoning else "start"
        self._held = ""

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, answer) text that is certain so far."""
        buf, self._held = self._held + text, ""
        reasoning = answer = ""
        while buf:
            if self.state == "start":
                stripped = buf.lstrip()
                if stripped.startswith(THINK_OPEN):
                    self.state, buf = "reasoning", stripped[len(THINK_OPEN):]
                elif not stripped or THINK_OPEN.startswith(stripped):
                    self._held = buf  # whitespace or a partial "<think": wait
                    break
                else:
                    self.state = "answer"
            elif self.state == "reasoning":
                i = buf.find(THINK_CLOSE)
                if i >= 0:
                    reasoning += buf[:i]
                    self.state, buf = "after", buf[i + len(THINK_CLOSE):]
                    continue
                keep = _partial_suffix(buf, THINK_CLOSE)
                reasoning += buf[:len(buf) - keep]
                self._held = buf[len(buf) - keep:]
                break
            elif self.state == "after":  # the blank line Qwen writes after </think> is not answer
                stripped = buf.lstrip("\n")
                if not stripped:
                    break
                self.state, buf = "answer", stripped
            else:
                answer += buf
                break
        return reasoning, answer

    def flush(self) -> tuple[str, str]:
        """What is still held at the end (an unfinished tag is text after all)."""
        held, self._held = self._held, ""
        if self.state == "reasoning":
            return held, ""
        return "", held if self.state in ("start", "answer") else held.lstrip("\n")


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a beginning of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def split_reasoning(gen: Iterator[GenerationChunk], in_reasoning: bool = False) -> Iterator[ReasoningChunk]:
    """The chunks of `gen` with the reasoning taken out of `text` into `reasoning`."""
    splitter = ReasoningSplitter(in_reasoning)
    try:
        for c in gen:
            reasoning, answer = splitter.feed(c.text)
            if c.finish_reason is not None:
                r2, a2 = splitter.flush()
                reasoning, answer = reasoning + r2, answer + a2
            answer_ids = c.token_ids if answer else []
            if reasoning or answer or c.finish_reason is not None:
                yield ReasoningChunk(answer, answer_ids, c.finish_reason, c.timings, c.logprobs, stop=c.stop,
                                     reasoning=reasoning)
    finally:
        close = getattr(gen, "close", None)
        if close is not None:
            close()


class AfterThinking:
    """A constraint that applies `inner` (a JSON constraint) only after the `</think>` token.

    While thinking, nothing is masked but the end-of-turn tokens (a reply must not end before
    its answer); `</think>` switches to `inner`, which then sees only the answer's tokens and
    validates only the answer's text.
    """

    def __init__(self, inner: Any, close_id: int, eog_ids: list[int]):
        self.inner, self.close_id, self.eog_ids = inner, int(close_id), [int(t) for t in eog_ids]
        self.answering = False

    def mask_logits(self, logits: Any) -> None:
        if self.answering:
            self.inner.mask_logits(logits)
        else:
            import numpy as np

            for t in self.eog_ids:
                if t < len(logits):
                    logits[t] = -np.inf

    def commit(self, token_id: int) -> list[int]:
        if self.answering:
            return self.inner.commit(token_id)
        if int(token_id) == self.close_id:
            self.answering = True
        return []

    def is_finished(self) -> bool:
        return self.answering and self.inner.is_finished()

    def finalize(self, text: str, finish_reason: str) -> Any:
        answer = text.split(THINK_CLOSE, 1)[1].lstrip("\n") if THINK_CLOSE in text else ""
        if not self.answering and finish_reason == "stop":
            from .json_constraint import ConstraintViolation

            raise ConstraintViolation("the reply ended inside its reasoning, before the JSON answer")
        return self.inner.finalize(answer, finish_reason) if self.answering else None

    def fresh(self) -> AfterThinking:
        return AfterThinking(self.inner.fresh(), self.close_id, self.eog_ids)

    def __getattr__(self, name: str) -> Any:  # needs_validation, sampled_tokens, check_start, ...
        return getattr(self.inner, name)


@dataclass
class ThinkingPlan:
    """What one request does about thinking: split the reply? (a thinking model), think at all?,
    and whether the prompt already opened the think block."""

    split: bool
    thinking: bool
    in_reasoning: bool = False


def plan_thinking(llm: Any, messages: Any, enable_thinking: bool | None) -> ThinkingPlan:
    """The ThinkingPlan of `messages` on the EdgeQwen `llm` (RequestError for a bad enable_thinking)."""
    template = getattr(llm, "chat_template", None)
    msgs = messages if isinstance(messages, list) else []
    thinking = thinking_enabled([m for m in msgs if isinstance(m, dict)], enable_thinking, template)
    if not model_thinks(template):
        return ThinkingPlan(False, False)
    opened = False
    if thinking:
        try:  # a template that pre-fills "<think>\n" (Qwen3 thinking-only models) opens the block itself
            opened = llm.render(msgs).rstrip().endswith(THINK_OPEN)
        except Exception:  # an invalid message list: generate() reports it properly
            opened = False
    return ThinkingPlan(True, thinking, opened)


def think_close_id(llm: Any) -> int:
    """The token id of `</think>` (RequestError when it is not one token: the answer cannot be told apart)."""
    ids = llm.tokenize(THINK_CLOSE)
    if len(ids) != 1:
        raise RequestError("this model's </think> is not a single token, so a response_format cannot be held back "
                           "until the reasoning ends; send enable_thinking: false with response_format",
                           param="response_format")
    return ids[0]
