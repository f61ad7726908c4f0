"""Settings: one typed object, every field defaulted and documented.

Each field can be set by a command-line flag (``--max-batch-size``) or an environment variable
(``TOKENWIRE_MAX_BATCH_SIZE``); a flag wins over the environment, which wins over the default.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

ENV_PREFIX = "TOKENWIRE_"


@dataclass(slots=True, frozen=True)
class Settings:
    # where to listen
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind"})
    port: int = field(default=8765, metadata={"help": "port to bind"})
    api_key: str | None = field(
        default=None, metadata={"help": "API key(s), comma-separated; when set, every API call must carry one"}
    )
    admin_key: str | None = field(
        default=None,
        metadata={
            "help": "the operator's key for /v1/admin/* (broadcast a notice to every WebSocket); separate from the "
            "API keys, which do not open it (unset: admin routes are off)"
        },
    )
    allowed_origins: str = field(
        default="",
        metadata={
            "help": "extra browser origins allowed to open WebSockets, call the HTTP API from their scripts (CORS) "
            "and post non-JSON bodies, comma-separated (* = any); the server's own origin and pages on localhost "
            "are always allowed"
        },
    )
    null_origin: str = field(
        default="allow",
        metadata={
            "help": "allow or refuse WebSocket upgrades from Origin null (pages opened from a file, like the "
            "tutorial's client); HTTP requests from null are always treated as foreign"
        },
    )
    # the model
    model: str | None = field(
        default=None,
        metadata={
            "help": "local Hugging Face folder, .gguf file, OpenVINO IR folder or hub id (default: "
            "SmolLM2-135M-Instruct); docs/models.md says which engine serves which family"
        },
    )
    served_model_name: str = field(
        default="",
        metadata={
            "help": "the model's name(s) to clients, comma-separated: the first is the one /v1/models, answers and "
            "the WebSocket hello show; every one is accepted where a request names a model (unset: the model's own "
            "name)"
        },
    )
    json_whitespace: str = field(
        default="compact",
        metadata={
            "help": "structured output (JSON schema, JSON object mode, tool-call arguments), every engine: compact "
            "(no whitespace outside strings: a small model given room for it can fill it until max_tokens) or "
            "flexible (whitespace allowed between tokens, as JSON allows)"
        },
    )
    engine: str = field(
        default="auto",
        metadata={
            "help": "auto, openvino, transformers or llamacpp (llama.cpp's kernels, for GGUF files: pip install "
            "'tokenwire[llamacpp]'). auto: openvino on CPU for GGUF files, OpenVINO IR folders and "
            "Llama, Qwen2/3, Mistral, Phi-3 and Gemma 3 folders and hub ids; transformers on CUDA and for other "
            "models (docs/models.md)"
        },
    )
    device: str = field(
        default="auto",
        metadata={"help": "auto, cpu, cuda or cuda:N (transformers); auto, cpu or gpu, an Intel GPU (openvino)"},
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "auto, float32, bfloat16 or float16: the weights' type (transformers; auto: bfloat16 on CUDA and "
            "bf16-capable CPUs, else float32) or the inference precision (openvino; auto: OpenVINO's pick for the CPU)"
        },
    )
    quantize: str = field(
        default="auto",
        metadata={
            "help": "auto, none, int8 or int4. openvino: the weights of the IR made from a GGUF file or folder, auto "
            "is int8 (none: float16; int4: 4-bit, embeddings int8; an IR folder: auto only). transformers: auto is "
            "none; int8 (CPU) decodes steps of <= 8 streams with int8 weights: 1.6x the tokens/s for one stream, for "
            "one more byte per weight and ~0.7%% error per product (docs/benchmarks.md). llamacpp: a GGUF file's own "
            "weights (auto or none); a folder's matrices written as auto or int8 (Q8_0) or none (float16)"
        },
    )
    max_model_len: int = field(default=8192, metadata={"help": "context window cap in tokens"})
    threads: int = field(default=0, metadata={"help": "CPU threads for the model, either engine (0: all cores)"})
    # scheduling
    max_batch_size: int = field(default=64, metadata={"help": "sequences decoded together at most"})
    max_waiting: int = field(default=1024, metadata={"help": "queued requests beyond the batch; more is overloaded"})
    queue_timeout: float = field(
        default=60.0,
        metadata={
            "help": "seconds a request may wait for a free row; then it fails overloaded with a retry hint (0: no "
            "limit). Waiting requests are admitted fairly: round robin over API keys, then connections"
        },
    )
    kv_cache_tokens: int = field(
        default=1 << 17,
        metadata={
            "help": "KV-cache pool in tokens, in blocks of 32 tokens; the KV bytes per token depend on the model "
            "(transformers: at least one whole context; a request is admitted while its prompt + max_tokens fits "
            "beside what the running ones reserved; blocks are allocated as sequences grow, memory on demand; "
            "openvino: allocated whole at start, at most what 2 GiB hold, at least one context)"
        },
    )
    engine_hang_timeout: float = field(
        default=120.0,
        metadata={
            "help": "seconds one engine step may take before the engine counts as hung: its requests fail with "
            "generation_failed and (transformers) the server exits non-zero for its supervisor to restart it, or "
            "(openvino) the worker process is restarted (0: never)"
        },
    )
    prefix_caching: str = field(
        default="on",
        metadata={
            "help": "on or off: reuse the KV of a prompt's leading whole blocks (32 tokens) computed before (a "
            "chat's history, a shared system prompt), kept until their room is needed, least recently used first; "
            "both engines; the reused tokens are reported as cached_tokens"
        },
    )
    flash_attention: str = field(
        default="auto",
        metadata={
            "help": "llamacpp: auto (llama.cpp's choice: on, on a CPU), on or off. Its flash attention sums in "
            "float16, so a greedy text may turn on where in the KV cache a sequence lies (a resumed or "
            "prefix-sharing request against one run alone); off computes what the sequence computes alone, at "
            "1.5-1.9x the step time at 8 streams (docs/llamacpp.md)"
        },
    )
    max_prefill_tokens: int = field(default=512, metadata={"help": "prompt tokens per step (long prompts chunk)"})
    # protocol limits
    max_message_bytes: int = field(default=1 << 20, metadata={"help": "largest client frame (bigger: close 1009)"})
    max_body_bytes: int | None = field(
        default=None,
        metadata={
            "help": "largest HTTP request body; larger gets 413 and is never held (its rest, up to 64 MiB or 5 s, is "
            "read and dropped so that the client reads the 413) (default: --max-message-bytes)"
        },
    )
    max_connections: int = field(
        default=0,
        metadata={
            "help": "WebSockets and API requests held at once; more get 1013 or 503 (0: the open-file limit less "
            "a 5%% reserve, which keeps /health answering)"
        },
    )
    max_connections_per_ip: int = field(
        default=0,
        metadata={
            "help": "WebSockets and API requests one client address may hold (0: no cap); more get 1013 or 503. "
            "Behind a proxy, set --trusted-proxies so that the address is the client's, not the proxy's"
        },
    )
    trusted_proxies: str = field(
        default="127.0.0.1",
        metadata={
            "help": "addresses (comma-separated, or *) whose X-Forwarded-For header names the client: the nginx in "
            "front of tokenwire. Others' headers are ignored"
        },
    )
    max_generations_per_key: int = field(
        default=0,
        metadata={"help": "generations one API key may run at once over all its connections (0: no cap)"},
    )
    rate_limit: int = field(
        default=0,
        metadata={
            "help": "tokens (prompt and generated) one API key may use per minute; past it rate_limited / HTTP 429 "
            "with the seconds until the budget refills (0: no limit)"
        },
    )
    max_tokens_limit: int = field(default=4096, metadata={"help": "largest max_tokens a request may ask for"})
    default_max_tokens: int = field(default=256, metadata={"help": "max_tokens when a request gives none"})
    max_generations_per_connection: int = field(default=32, metadata={"help": "concurrent generations a socket"})
    heartbeat_interval: float = field(default=30.0, metadata={"help": "seconds between server pings (0: off)"})
    max_unsent_tokens: int = field(
        default=64,
        metadata={
            "help": "how far a WebSocket generation may run ahead of its reader, in tokens not yet written to the "
            "socket: past it the generation is paused (no compute) until the reader is halfway back (0: no limit)"
        },
    )
    slow_consumer_timeout: float = field(
        default=30.0,
        metadata={
            "help": "close a WebSocket whose send has been blocked this long (the client reads nothing) with 1008; "
            "its generations, paused by then, stay resumable for --resume-window"
        },
    )
    resume_window: float = field(
        default=60.0,
        metadata={
            "help": "seconds a WebSocket generation stays resumable after its connection drops or it ends; an "
            "orphaned one is kept paused (no compute) and goes on when resumed, and ends after this (0: no resume, "
            "a drop aborts)"
        },
    )
    responses_store: int = field(
        default=1000,
        metadata={
            "help": "how many Responses API responses are kept for previous_response_id, GET and background "
            "reads (past it the oldest finished go first; 0: none are kept)"
        },
    )
    responses_ttl: float = field(
        default=3600.0,
        metadata={"help": "seconds a finished Responses API response stays retrievable and continuable"},
    )
    journal: str = field(
        default="memory",
        metadata={
            "help": "where resumable generations are kept: memory (this process; resume only here), or "
            "redis://HOST:PORT/DB, shared by every replica: a resume on any replica replays and follows a "
            "generation, and one whose replica died goes on (docs/scaling.md)"
        },
    )
    journal_lease: float = field(
        default=3.0,
        metadata={
            "help": "with a shared journal: seconds a replica's claim on the generations it runs lasts unless renewed "
            "(every third of it); a replica silent this long is taken for dead, and its generations go on "
            "elsewhere when a client resumes them"
        },
    )
    replicas: int = field(
        default=0,
        metadata={
            "help": "0: one process. N: serve as a Ray Serve deployment of N replicas, each with its own engine, "
            "behind Ray's HTTP proxy at --host/--port (needs the ray extra; use a shared --journal so that any "
            "replica resumes any stream; docs/scaling.md)"
        },
    )
    max_replicas: int = field(
        default=0,
        metadata={
            "help": "with --replicas: autoscale between --replicas and this many replicas on requests waiting for a "
            "batch slot (--ray-target-waiting per replica); 0: a fixed number"
        },
    )
    ray_target_waiting: float = field(
        default=4.0,
        metadata={"help": "with --max-replicas: more replicas while more requests than this wait per replica"},
    )
    replica_cpus: float = field(
        default=1.0, metadata={"help": "with --replicas: CPUs Ray reserves for each replica (fractions allowed)"}
    )
    resume_buffer_mb: float = field(
        default=64.0, metadata={"help": "memory for messages kept for resume; past it, the longest idle go first"}
    )
    ws_compression: str = field(
        default="none",
        metadata={
            "help": "none, or deflate: permessage-deflate when the client offers it (as browsers do); ~10x fewer "
            "payload bytes, but ~40 KB more memory per socket and up to ~15%% more server CPU per token"
        },
    )
    drain_timeout: float = field(
        default=25.0,
        metadata={
            "help": "on SIGTERM or Ctrl-C: seconds running generations may take to finish while new work is refused "
            "and /ready answers 503; then they end with shutting_down (below Kubernetes' default 30 s grace "
            "period; a second signal stops at once)"
        },
    )
    sse_keepalive_interval: float = field(
        default=15.0, metadata={"help": "seconds between SSE keep-alive comments while a stream is silent (0: off)"}
    )
    log_level: str = field(default="info", metadata={"help": "debug, info, warning or error"})
    log_format: str = field(default="text", metadata={"help": "text, or json (one object a line) for log shippers"})

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def check(self) -> None:
        """ValueError naming the flag of the first number out of its range: a typo fails at start, in words."""
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int | float) or isinstance(value, bool):
                continue
            flag = "--" + f.name.replace("_", "-")
            lo = _AT_LEAST.get(f.name, 0)
            if not math.isfinite(value) or value < lo or (f.name in _ABOVE_ZERO and value <= 0):
                floor = "above 0" if f.name in _ABOVE_ZERO else f"at least {lo}"
                raise ValueError(f"{flag} must be a number {floor}, not {value!r}")
        if self.port > 65535:
            raise ValueError(f"--port must be a port number, 0 to 65535, not {self.port}")


# The numbers that must be more than 0 (every other one: 0 or more; 0 often means "off" or "no limit").
_AT_LEAST = {
    "max_model_len": 1,
    "max_batch_size": 1,
    "kv_cache_tokens": 32,  # one block
    "max_prefill_tokens": 1,
    "max_message_bytes": 1,
    "max_body_bytes": 1,
    "max_tokens_limit": 1,
    "default_max_tokens": 1,
    "max_generations_per_connection": 1,
}
_ABOVE_ZERO = frozenset({"journal_lease", "replica_cpus", "ray_target_waiting"})


def _convert(name: str, raw: str, kind: Any) -> Any:
    kind_s = str(kind)
    try:
        if "int" in kind_s:
            return int(raw)
        if "float" in kind_s:
            return float(raw)
    except ValueError:
        raise ValueError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a number") from None
    return raw or None if "None" in kind_s else raw


def from_env(env: Mapping[str, str] | None = None, base: Settings | None = None) -> Settings:
    """Settings from ``TOKENWIRE_*`` variables over ``base`` (default: the defaults)."""
    env = os.environ if env is None else env
    base = base or Settings()
    changes = {}
    for f in fields(Settings):
        key = ENV_PREFIX + f.name.upper()
        if key in env:
            changes[f.name] = _convert(f.name, env[key], f.type)
    return base.replace(**changes)
