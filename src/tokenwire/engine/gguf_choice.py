"""Which engine serves a GGUF file faster on this CPU when both the OpenVINO and the llamacpp engines can.

The rule, and the measurements behind it (aggregate tokens/s against llama-server on the same file, side by side,
docs/benchmarks.md "Choosing between OpenVINO and llama.cpp for a GGUF file"):

- **One stream at a time** (``--max-batch-size 1``): llama.cpp's kernels, on every CPU measured. At one stream the
  llamacpp engine does 0.93-1.09x llama-server, the OpenVINO engine 0.46-0.74x (AVX512) and 0.50x (AVX2).
- **A CPU with int8 dot-product units** (AVX512 VNNI, or AMX): OpenVINO. Its int8 kernels batch: 2.2-2.6x
  llama-server at 8 and 32 streams on a 1.1B model, where the llamacpp engine does 1.1-1.2x; its TTFT is as low.
- **AVX2 only**: llama.cpp for a file of ``LARGE_FILE_BYTES`` or more (a 1.1B Q4_K_M: OpenVINO 0.50x llama-server at
  one stream and 1.2-1.3x at 8 and 32, about what the llamacpp engine does there), OpenVINO for a smaller one (the
  default 135M model: OpenVINO 2.5x llama-server at 32 streams).

Pure: the caller reads the CPU's flags (``cpu_flags``) and the file's size.
"""

from __future__ import annotations

from pathlib import Path

# Between the two sizes measured on AVX2: the default model's 0.1 GB (OpenVINO's batching far ahead) and a 1.1B
# model's 0.72 GB Q4_K_M (llama.cpp twice as fast at one stream, even at 8 and 32).
LARGE_FILE_BYTES = 400 * 1024 * 1024
INT8_UNITS = ("avx512_vnni", "amx_int8")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The first CPU's feature flags as Linux lists them (empty where there is no /proc/cpuinfo)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def faster_for_gguf(size_bytes: int, max_batch_size: int, flags: frozenset[str]) -> tuple[str, str]:
    """``("llamacpp" | "openvino", why)`` for a GGUF file of ``size_bytes`` both engines read, on a CPU with
    ``flags``, serving up to ``max_batch_size`` streams at once."""
    size = f"{size_bytes / 1e9:.2f} GB"
    if max_batch_size <= 1:
        return "llamacpp", "one stream at a time (--max-batch-size 1): llama.cpp's kernels are the faster there"
    units = [f for f in INT8_UNITS if f in flags]
    if units:
        return "openvino", (
            f"this CPU has {' and '.join(units)}: OpenVINO's int8 kernels serve about twice llama.cpp's tokens/s "
            "from 8 streams on (llama.cpp is faster at one stream: --engine llamacpp)"
        )
    if "avx2" not in flags:
        return "openvino", "this CPU's features are unknown (no AVX2 listed): OpenVINO, the default"
    if size_bytes >= LARGE_FILE_BYTES:
        return "llamacpp", (
            f"this CPU has AVX2 but no int8 dot-product units and the file is {size}: llama.cpp's kernels serve "
            "one stream twice as fast as OpenVINO's and as many tokens/s at 8 and 32 streams"
        )
    return "openvino", (
        f"this CPU has AVX2 but no int8 dot-product units and the file is {size}: at this size OpenVINO's "
        "batching serves more streams (llama.cpp is faster at one stream: --engine llamacpp)"
    )
