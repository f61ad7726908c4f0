"""Pause a generation on a real engine part-way, let it continue, and report what its stream delivered."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from tokenwire.engine.interface import GenerationRequest, OutputKind, SamplingParams


async def paused_run(
    engine: Any,
    rid: str,
    prompt: str,
    max_tokens: int,
    pause_after: int,
    pause_s: float,
    params: SamplingParams | None = None,
    during: Callable[[], Awaitable[None]] | None = None,
) -> dict[str, Any]:
    """Greedy and ``ignore_eos`` unless ``params`` say otherwise: paused once ``pause_after`` tokens arrived, for
    ``pause_s`` seconds and then for as long as ``during()`` takes."""
    params = params or SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    out: dict[str, Any] = {"text": "", "tokens": 0, "while_paused": 0}
    paused = False
    async for item in engine.generate(GenerationRequest(rid, params, prompt=prompt)):
        if item.kind is OutputKind.STARTED:
            out["prompt_tokens"] = item.prompt_tokens
        out["text"] += item.text
        out["tokens"] += item.num_tokens
        if not paused and out["tokens"] >= pause_after:
            paused = True
            engine.pause(rid)
            await asyncio.sleep(0.2)  # tokens made before the pause reached the model loop may still arrive
            before = _queued_tokens(engine, rid)
            await asyncio.sleep(pause_s)
            out["paused_stats"] = engine.stats().paused
            out["paused_at"] = out["tokens"]
            out["kept_kv"] = engine.stats().kv_cache_tokens_paused
            if during is not None:
                await during()
            out["while_paused"] = _queued_tokens(engine, rid) - before  # made while paused: should be none
            engine.unpause(rid)
        if item.kind is OutputKind.FINISHED:
            out["completion"] = item.completion_tokens
            out["reason"] = item.finish_reason
    return out


def _queued_tokens(engine: Any, rid: str) -> int:
    """The tokens already delivered to the request's stream queue but not yet read by us."""
    stream = engine._streams.get(rid)
    if stream is None:
        return 0
    return sum(getattr(item, "num_tokens", 0) for item in list(stream._queue))


async def check_pause_resumes_whole(engine: Any) -> None:
    """Paused mid-answer, a request makes no tokens; continued, its prompt plus its tokens so far rebuild its KV, and
    its text and token count equal those of a run that never paused (greedy). Every engine must pass this."""
    prompt = "Tell me a story about a dragon."
    plain = await paused_run(engine, "plain", prompt, 48, pause_after=10_000, pause_s=0)
    paused = await paused_run(engine, "paused", prompt, 48, pause_after=12, pause_s=0.3)
    assert paused["paused_stats"] == 1 and paused["while_paused"] == 0
    assert paused["completion"] == paused["tokens"] == plain["completion"] == 48
    assert paused["text"] == plain["text"]
    assert engine.stats().paused == 0
