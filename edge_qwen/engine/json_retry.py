"""Validation and retry: how a schema the grammar cannot fully express is still guaranteed.

Keywords such as `not`, `if`/`then`/`else`, `uniqueItems` or an overlapping `oneOf` are left out of
the grammar (edge_qwen.engine.json_normalize), so the grammar accepts a superset of the valid
answers. `generate_checked` wraps one constrained generation (a callable, so it works with any
decode loop) and makes the promise hold anyway:

1. The first attempt runs with the request's own sampling settings.
2. Its chunks are held back, not sent: when the answer is complete (`finish_reason` "stop"),
   the constraint's finalize() validates it with jsonschema. Valid: the held chunks are released
   as they were generated (a stream sees them only now, all at once).
3. Invalid: the answer is discarded and generated again, at most `MAX_RETRIES` more times, each
   with sampling (the request's temperature, or `RETRY_TEMPERATURE` for a greedy request, which
   would repeat itself) and a seed derived from the attempt number, so retries are reproducible.
4. When the budget is spent, RetriesExhausted (HTTP 422, never a 500) names the last failure.

Answers cut by max_tokens or cancelled make no claim and are released as they are. Schemas the
grammar enforces exactly skip all of this: nothing can fail after generation, so they stream
token by token. The final chunk's timings say how many retries ran and how many tokens they
spent (`usage.json_retries`, `usage.json_retry_tokens` in the API).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import EdgeQwenError, SchemaError
from .generate import GenerationChunk, SamplingParams, Timings

MAX_RETRIES = 3  # attempts after the first
RETRY_TEMPERATURE = 0.7  # for retries of a greedy request
RETRY_TOP_P = 0.95


class RetriesExhausted(EdgeQwenError):
    """Every attempt gave an answer that failed validation: a clear 422, not a server error."""

    status = 422
    code = "json_validation_failed"


@dataclasses.dataclass
class CheckedTimings(Timings):
    """Timings of a validated answer, with what its retries cost."""

    json_retries: int = 0  # answers discarded: they failed validation, or were cut and retried
    json_retry_tokens: int = 0  # completion tokens those answers spent
    json_cut_retries: int = 0  # of those attempts, retries of a cut answer under the strict variant (0 or 1)


def retry_params(params: SamplingParams, attempt: int) -> SamplingParams:
    """The sampling settings of attempt `attempt` (0: the request's own)."""
    if attempt == 0:
        return params
    greedy = params.temperature == 0
    base = 0 if params.seed is None else int(params.seed)
    return dataclasses.replace(params, temperature=RETRY_TEMPERATURE if greedy else params.temperature,
                               top_p=RETRY_TOP_P if greedy else params.top_p, seed=base + 1_000_003 * attempt)


def generate_checked(run: Callable[[SamplingParams, Any], Iterator[GenerationChunk]], params: SamplingParams,
                     constraint: Any, *, max_retries: int = MAX_RETRIES,
                     retry_cut: bool = False) -> Iterator[GenerationChunk]:
    """Run `run(params, constraint)` (one constrained generation) until its answer validates.

    `constraint` is a JsonConstraint; when it needs no validation (`needs_validation` False) and
    cut answers are not retried, the generation passes through untouched. `retry_cut` (a caller
    that collects the whole answer anyway, such as a non-streamed chat) lets an answer cut at
    max_tokens be retried once under the constraint's strict() variant. See the module docstring.
    """
    from .json_constraint import JsonConstraint

    # Only a plain JSON constraint (not one wrapped after a reasoning block) has a strict() variant.
    retry_cut = retry_cut and isinstance(constraint, JsonConstraint) and constraint.retries_cuts
    if not getattr(constraint, "needs_validation", False) and not retry_cut:
        return run(params, constraint)
    return _checked(run, params, constraint, max_retries, retry_cut)


def _checked(run: Callable[[SamplingParams, Any], Iterator[GenerationChunk]], params: SamplingParams,
             constraint: Any, max_retries: int, retry_cut: bool = False) -> Iterator[GenerationChunk]:
    from .json_constraint import AnswerInvalid

    spent = cut_retries = cut_tokens = 0
    failure: AnswerInvalid | None = None
    cut: list[GenerationChunk] | None = None  # the cut answer a strict retry may replace
    c, p = constraint, params
    for attempt in range(max_retries + 1):
        if attempt:
            c = c.fresh()
            if cut is None:  # a retry after an invalid answer: sampled (see retry_params)
                p = retry_params(params, attempt)
        held: list[GenerationChunk] = []
        gen = run(p, c)
        try:
            for chunk in gen:
                held.append(chunk)
        except AnswerInvalid as exc:
            failure = exc
            spent += c.sampled_tokens + c.forced_tokens
            if cut is not None:  # the strict retry failed validation: give back the cut answer
                return (yield from _release(cut, attempt, spent - cut_tokens, cut_retries))
            continue
        except SchemaError:
            if cut is None:
                raise
            spent += c.sampled_tokens + c.forced_tokens - cut_tokens  # the engine failed on the variant
            return (yield from _release(cut, attempt, spent, cut_retries))
        finally:
            gen.close()
        last = held[-1]
        if last.finish_reason == "length" and retry_cut and cut is None and attempt < max_retries:
            strict = c.strict()
            if strict is not None:  # retry once, same sampling, under the stricter variant
                cut, cut_tokens, cut_retries = held, c.sampled_tokens + c.forced_tokens, 1
                spent += cut_tokens
                c = strict
                continue
        if cut is not None and last.finish_reason == "length":  # cut again: the first answer stands
            return (yield from _release(cut, attempt, spent + c.sampled_tokens + c.forced_tokens - cut_tokens,
                                        cut_retries))
        return (yield from _release(held, attempt, spent, cut_retries))
    assert failure is not None
    raise RetriesExhausted(
        f"response_format: no answer valid against the schema in {max_retries + 1} attempts "
        f"({spent} tokens); last failure: {failure.message.split('; ')[0]}. The grammar cannot enforce "
        f"{'; '.join(failure.validated)}, so answers are validated after generation: describe that rule "
        "in the prompt, or rewrite it with keywords the grammar enforces (see docs/json.md)",
        param="response_format")


def _release(held: list[GenerationChunk], retries: int, spent: int, cut_retries: int) -> Iterator[GenerationChunk]:
    """Yield the chosen attempt's chunks, the last one's timings saying what the other attempts cost."""
    last = held[-1]
    if last.timings is not None:
        last.timings = CheckedTimings(**{k: v for k, v in dataclasses.asdict(last.timings).items()
                                         if not k.startswith("json_")},
                                      json_retries=retries, json_retry_tokens=spent, json_cut_retries=cut_retries)
    yield from held


__all__ = ["CheckedTimings", "MAX_RETRIES", "RETRY_TEMPERATURE", "RetriesExhausted", "generate_checked",
           "retry_params"]
