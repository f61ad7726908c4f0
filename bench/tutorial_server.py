"""The tutorial's ``TransformerWebSocketServer``, reimplemented as tokenwire's baseline.

Faithful to the tutorial (shared/seed/000_*.txt): for every ``generate`` message it sends ``started``, then runs
a full forward pass over the whole sequence for every new token (``model(generated)``, no KV cache reuse),
samples with ``torch.multinomial(softmax(logits))``, decodes each token on its own, sends it as a ``token``
message, stops at EOS or ``max_length`` and sends ``complete``. The model runs on the event loop, so one request
is served at a time. Differences, all of them so that both servers do the same work or so that the baseline is
not handicapped:

- no ``asyncio.sleep(0.05)`` after each token (shared/PEERS.md);
- the same model as tokenwire (SmolLM2-135M-Instruct, float32, CPU), loaded with tokenwire's loader;
- the prompt is formatted with the chat template as one user turn, as tokenwire does for a chat model;
- ``temperature`` is applied when given (0 = greedy); without it sampling is plain softmax, as in the tutorial;
- ``max_tokens`` is accepted as well as the tutorial's ``max_length``;
- server keepalive pings are off unless ``--keepalive``: with the loop blocked by generation, a late pong would
  close a connection and count against the baseline.

    python bench/tutorial_server.py --port 8766 [--threads 2] [--model PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
from typing import Any

import torch
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

log = logging.getLogger("tutorial_server")


class TransformerWebSocketServer:
    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device("cpu")

    def encode(self, prompt: str) -> torch.Tensor:
        ids = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        if isinstance(ids, dict):
            ids = ids["input_ids"]
        return torch.tensor([list(ids)], dtype=torch.long, device=self.device)

    async def generate_streaming_response(
        self, prompt: str, websocket: ServerConnection, max_length: int = 100, temperature: float | None = None
    ) -> None:
        """Generate tokens and stream them via WebSocket (the tutorial's loop)."""
        try:
            generated = self.encode(prompt)
            for _ in range(max_length):
                with torch.no_grad():
                    outputs = self.model(generated)  # the whole sequence, every token
                    predictions = outputs.logits[0, -1, :]
                    if temperature is not None and temperature == 0:
                        next_token_id = torch.argmax(predictions, dim=-1, keepdim=True)
                    else:
                        if temperature is not None:
                            predictions = predictions / temperature
                        next_token_id = torch.multinomial(torch.softmax(predictions, dim=-1), 1)
                token_text = self.tokenizer.decode(next_token_id, skip_special_tokens=True)
                await websocket.send(json.dumps({"type": "token", "content": token_text, "finished": False}))
                generated = torch.cat([generated, next_token_id.unsqueeze(0)], dim=-1)
                if next_token_id.item() == self.tokenizer.eos_token_id:
                    break
                # (the tutorial sleeps 50 ms here; left out on purpose)
            await websocket.send(json.dumps({"type": "complete", "content": "", "finished": True}))
        except ConnectionClosed:
            raise
        except Exception as e:
            log.error("Generation error: %s", e)
            await websocket.send(json.dumps({"type": "error", "content": f"Generation failed: {e}", "finished": True}))

    async def handle_client(self, websocket: ServerConnection) -> None:
        """Handle one connection: its requests run one after another, on the event loop."""
        log.info("New client connected: %s", websocket.remote_address)
        try:
            async for message in websocket:
                data = json.loads(message)
                if data.get("type") == "generate":
                    prompt = data.get("prompt", "")
                    max_length = int(data.get("max_length", data.get("max_tokens", 100)))
                    temperature = data.get("temperature")
                    await websocket.send(
                        json.dumps({"type": "started", "content": "Generation started", "finished": False})
                    )
                    await self.generate_streaming_response(
                        prompt, websocket, max_length, None if temperature is None else float(temperature)
                    )
        except ConnectionClosed:
            log.info("Client disconnected: %s", websocket.remote_address)
        except Exception as e:
            log.error("Connection error: %s", e)


async def serve_forever(server: TransformerWebSocketServer, port: int, keepalive: bool) -> None:
    ping = 20.0 if keepalive else None
    async with serve(server.handle_client, "127.0.0.1", port, ping_interval=ping, max_size=2**20) as ws_server:
        log.info("Starting WebSocket server on 127.0.0.1:%d", port)
        await ws_server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="the tutorial's WebSocket server (baseline)")
    p.add_argument("--port", type=int, default=8766)
    p.add_argument("--model", default=None, help="as tokenwire's --model (default: SmolLM2-135M-Instruct)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    p.add_argument("--keepalive", action="store_true", help="send WebSocket keepalive pings every 20 s")
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads or os.cpu_count() or 1)

    from tokenwire.engine import models
    from tokenwire.engine.hf import loader

    model, tok = loader.load(models.resolve(args.model), "cpu", torch.float32)
    log.info("model loaded (%d torch threads)", torch.get_num_threads())
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_forever(TransformerWebSocketServer(model, tok), args.port, args.keepalive))


if __name__ == "__main__":
    main()
