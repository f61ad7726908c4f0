"""Small, fast stand-ins for real models and tokenizers, built offline in a few seconds.

- a byte-level BPE tokenizer (like GPT-2, Llama 3, SmolLM2) trained on a little multilingual text,
- a SentencePiece tokenizer with byte fallback (like Llama 2, Mistral),
- a tiny random Llama model saved as a Hugging Face folder that ``tokenwire serve --model`` loads.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Streaming tokens over a WebSocket, one at a time, to many users at once.",
    "Emoji: 😀 🎉 🚀 👩‍💻 ❤️ 🇫🇷 and accents: café, naïve, Ångström, jalapeño.",
    "日本語のテキスト。東京は日本の首都です。漢字とひらがなとカタカナ。",
    "中文文本：北京是中国的首都。你好，世界！",
    "Русский текст: Москва — столица России. Ελληνικά: Αθήνα.",
    "Code: def f(x):\n    return x * 2  # comment\n",
] * 20

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_level_tokenizer(vocab_size: int = 600) -> Any:
    """A byte-level BPE tokenizer with a ChatML template; eos is ``<|im_end|>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


class SentencePieceDecoder:
    """The ``decode`` of a SentencePiece model, as the detokenizer calls it."""

    def __init__(self, model_bytes: bytes) -> None:
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_proto=model_bytes)

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def decode(
        self, token_ids: Any, skip_special_tokens: bool = True, clean_up_tokenization_spaces: bool = False
    ) -> str:
        return str(self.sp.decode(list(token_ids)))

    @property
    def vocab_size(self) -> int:
        return int(self.sp.get_piece_size())


def sentencepiece_tokenizer(vocab_size: int = 420) -> SentencePieceDecoder:
    """A SentencePiece BPE model with byte fallback: rare characters become <0xNN> byte pieces."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=0.98,  # characters outside the corpus fall back to byte pieces
        minloglevel=2,
    )
    return SentencePieceDecoder(buf.getvalue())


def tiny_shape(tok: Any, max_positions: int, init_std: float = 0.3) -> dict[str, Any]:
    """The tiny models' configuration (2 layers, hidden 64, 4 heads, 2 KV heads) for the byte-level tokenizer."""
    return {
        "vocab_size": len(tok),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": max_positions,
        "eos_token_id": tok.convert_tokens_to_ids("<|im_end|>"),
        "pad_token_id": tok.convert_tokens_to_ids("<|endoftext|>"),
        "bos_token_id": None,
        "tie_word_embeddings": True,
        "initializer_range": init_std,
    }


def save_tiny_model(
    target: Path, max_positions: int = 256, seed: int = 0, init_std: float = 0.3, rope: dict[str, Any] | None = None
) -> Path:
    """Save a random 2-layer Llama and the byte-level tokenizer as a model folder.

    ``init_std`` is 0.3, not transformers' usual 0.02: at 0.02 attention is nearly uniform and a random model
    answers every prompt with the same greedy text, so a test comparing outputs would prove nothing. At 0.3
    every token depends on its context, and a KV-cache mix-up changes the text. ``rope``: the config's
    ``rope_parameters`` (rope scaling)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = byte_level_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        **tiny_shape(tok, max_positions, init_std), **({"rope_parameters": rope} if rope is not None else {})
    )
    model = LlamaForCausalLM(config)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    tok.save_pretrained(target)
    return target


def save_tiny_gguf(source: Path, target: Path) -> Path:
    """Write the tiny model folder ``source`` (save_tiny_model) as a float16 GGUF file with tokenwire's own converter
    (engine/openvino/convert.py: what llama.cpp's converter writes). Both engines read it (OpenVINO directly,
    transformers by converting it back), so the same file tests both and their outputs can be compared."""
    from tokenwire.engine.openvino.convert import write_gguf

    write_gguf(source, target)
    return target


def save_tiny_family(
    target: Path,
    architecture: str,
    seed: int = 0,
    sliding_window: int = 8,
    rope: dict[str, Any] | None = None,
    tokenizer: str = "byte-level",
    layers: int = 2,
) -> Path:
    """A random 2-layer model of ``architecture`` (``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``, ``MistralForCausalLM``,
    ``Phi3ForCausalLM``, ``Gemma2ForCausalLM``, ``Gemma3ForCausalLM`` (or ``Gemma3ForConditionalGeneration``, with
    a tiny image tower): the last four with a sliding window of
    ``sliding_window``; 0 for none) in the shape of save_tiny_model's; its biases and norm weights random too (a
    zero bias or a unit norm would not show a converter that drops them), every weight rounded to float16 (what the
    GGUF holds). ``rope``: the config's ``rope_parameters``. ``tokenizer``: ``byte-level`` (byte_level_tokenizer) or
    ``sentencepiece`` (a SentencePiece BPE model with byte fallback, as Mistral, Gemma and Phi-3 ship theirs: see
    :func:`save_sentencepiece_tokenizer`). ``layers``: Gemma 3 with 6 has its own layer kinds (five local, one
    global), as llama.cpp assumes; with 2, one of each."""
    import torch
    import transformers

    target.mkdir(parents=True, exist_ok=True)
    if tokenizer == "sentencepiece":
        kind = "GemmaTokenizer" if architecture.startswith("Gemma") else "LlamaTokenizer"
        tok = save_sentencepiece_tokenizer(target, kind)
        ids = {"eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id}
    else:
        tok, ids = byte_level_tokenizer(), {}
    torch.manual_seed(seed)
    names = {"Gemma3ForCausalLM": "Gemma3TextConfig", "Gemma3ForConditionalGeneration": "Gemma3TextConfig"}
    config_class = getattr(transformers, names.get(architecture, architecture.replace("ForCausalLM", "Config")))
    extra: dict[str, Any] = {"head_dim": 32} if architecture.startswith(("Qwen3", "Gemma")) else {}  # wider heads
    if architecture.startswith("Gemma3"):  # a local (windowed) layer and a global one; its own attention scale
        extra["query_pre_attn_scalar"] = 24
        if layers == 2:
            extra["layer_types"] = ["sliding_attention", "full_attention"]
    if architecture.startswith(("Gemma", "Mistral", "Phi3")):
        extra["sliding_window"] = sliding_window or None  # shorter than the tests' prompts; 0: none
    if rope is not None:
        extra["rope_parameters"] = rope
        if "original_max_position_embeddings" in rope:  # Phi-3 keeps it beside rope_parameters too
            extra["original_max_position_embeddings"] = rope["original_max_position_embeddings"]
    config = config_class(**{**tiny_shape(tok, 1024), **ids, "num_hidden_layers": layers}, **extra)
    if architecture == "Gemma3ForConditionalGeneration":  # Gemma 3 4B-27B: text and images; a tiny image tower
        vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
        vision |= {"image_size": 28, "patch_size": 14}
        config = transformers.Gemma3Config(text_config=config.to_dict(), vision_config=vision, mm_tokens_per_image=4)
    model = getattr(transformers, architecture)(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.3)
            elif "norm" in name:
                param.normal_(1.0, 0.3)
            param.copy_(param.to(torch.float16).to(torch.float32))
    model.save_pretrained(target)
    tok.save_pretrained(target)
    return target


def save_sentencepiece_tokenizer(target: Path, kind: str = "LlamaTokenizer") -> Any:
    """Write a SentencePiece BPE tokenizer with byte fallback into ``target`` as a model folder ships it
    (``tokenizer.model``, and the ``tokenizer.json`` transformers makes of it as ``kind``: ``LlamaTokenizer`` for
    Llama 2, Mistral, Phi-3; ``GemmaTokenizer``, which keeps spaces as they are), with a chat template; returns it."""
    import json

    from transformers import AutoTokenizer

    (target / "tokenizer.model").write_bytes(sentencepiece_tokenizer().sp.serialized_model_proto())
    names = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    bos = {"add_bos_token": True} if kind == "GemmaTokenizer" else {}  # as Gemma's releases say (Llama's adds one)
    (target / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": kind, **names, **bos}))
    tok = AutoTokenizer.from_pretrained(target)
    tok.chat_template = CHAT_TEMPLATE.replace("<|im_start|>", "<s>").replace("<|im_end|>", "</s>")
    return tok


def save_tiny_sentencepiece_model(target: Path, seed: int = 0) -> Path:
    """A tiny random Llama with a SentencePiece BPE tokenizer (byte fallback), as Llama 2, Mistral and TinyLlama
    ship theirs: ``tokenizer.model`` and the ``tokenizer.json`` transformers makes of it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    target.mkdir(parents=True, exist_ok=True)
    tok = save_sentencepiece_tokenizer(target)
    torch.manual_seed(seed)
    shape = {**tiny_shape(tok, 1024), "eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id}
    shape["pad_token_id"] = None
    model = LlamaForCausalLM(LlamaConfig(**shape))
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.to(torch.float16).to(torch.float32))
    model.save_pretrained(target)
    tok.save_pretrained(target)
    return target


def save_gemma3_gguf_as_llama_cpp_writes_it(source: Path, target: Path, matrices: str = "float32") -> Path:
    """Write the tiny Gemma 3 folder ``source`` (save_tiny_family, SentencePiece tokenizer) as llama.cpp's converter
    writes a Gemma 3 file: architecture ``gemma3``, its tensor names, each norm stored as 1 + weight, the
    SentencePiece vocabulary (``llama`` tokenizer: pieces, scores, types), the window and the local layers' rotary
    base as keys, and, as its converter, neither which layers are local (llama.cpp: five in six) nor the rotary
    dimensions (the head size). Matrices in float32 (llama.cpp's arithmetic is then float32 too) or ``float16``
    (llama.cpp's converter's default; the folder's weights are float16-rounded, so nothing is lost). llama.cpp's own
    rules apply: the attention scale is 1/sqrt(head size) (``query_pre_attn_scalar`` must equal it), no rope
    scaling."""
    import json

    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    from tokenwire.engine.llamacpp import layout

    config = json.loads((source / "config.json").read_text())
    weights = {k: v.astype(np.float32) for k, v in load_file(str(source / "model.safetensors")).items()}
    w = gguf.GGUFWriter(str(target), "gemma3")
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_key_length(config["head_dim"])
    w.add_value_length(config["head_dim"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    rope = config["rope_parameters"]
    w.add_rope_freq_base(float(rope["full_attention"]["rope_theta"]))
    w.add_rope_freq_base_swa(float(rope["sliding_attention"]["rope_theta"]))
    w.add_sliding_window(config["sliding_window"])  # no pattern: llama.cpp's is five local layers, then a global one
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if matrices == "float32" else gguf.LlamaFileType.MOSTLY_F16)
    layout.add_sentencepiece_vocabulary(w, source)  # tokenwire's, as llama.cpp's converter writes it

    for name, (key, is_norm) in gemma3_llama_cpp_names(config["num_hidden_layers"]).items():
        w.add_tensor(name, weights[key] + 1.0 if is_norm else weights[key])  # Gemma's norms multiply by 1 + weight
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return target


def save_phi3_gguf_as_llama_cpp_writes_it(source: Path, target: Path) -> Path:
    """Write the tiny Phi-3 folder ``source`` (save_tiny_family, SentencePiece tokenizer) as llama.cpp's converter
    writes a Phi-3 file: architecture ``phi3``, the query, key and value in one matrix (``attn_qkv``, rows in the
    folder's order: heads rotated in halves) and the gate and up in one (``ffn_up``), float16 matrices, the sliding
    window as a key (0 for none), and with LongRoPE its long and short factors as tensors, its attention factor and
    original context as keys (the context stays the whole one)."""
    import json
    import math

    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    from tokenwire.engine.llamacpp import layout

    config = json.loads((source / "config.json").read_text())
    weights = load_file(str(source / "model.safetensors"))
    rope = config.get("rope_parameters") or {}
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    w = gguf.GGUFWriter(str(target), "phi3")
    if rope.get("long_factor"):  # its converter writes this key first (and the factors as tensors)
        scale = config["max_position_embeddings"] / rope["original_max_position_embeddings"]
        original = rope["original_max_position_embeddings"]
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)))
    w.add_context_length(config["max_position_embeddings"])
    w.add_rope_scaling_orig_ctx_len(config.get("original_max_position_embeddings", config["max_position_embeddings"]))
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_head_count(heads)
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_dimension_count(int(rope.get("partial_rotary_factor", 1.0) * hidden) // heads)
    w.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_sliding_window(config.get("sliding_window") or 0)
    layout.add_sentencepiece_vocabulary(w, source)  # tokenwire's, as llama.cpp's converter writes it
    if rope.get("long_factor"):
        w.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], np.float32))
        w.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], np.float32))
    for name, key in phi3_llama_cpp_names(config["num_hidden_layers"]).items():
        if key not in weights:  # lm_head, tied to the embedding: llama.cpp then reads token_embd
            continue
        data = weights[key]
        w.add_tensor(name, data.astype(np.float16 if data.ndim == 2 else np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return target


def phi3_llama_cpp_names(layers: int) -> dict[str, str]:
    """llama.cpp's tensor names for a Phi-3 model: each one's Hugging Face name."""
    names = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        names |= {
            f"blk.{i}.attn_norm.weight": p + "input_layernorm.weight",
            f"blk.{i}.attn_qkv.weight": p + "self_attn.qkv_proj.weight",
            f"blk.{i}.attn_output.weight": p + "self_attn.o_proj.weight",
            f"blk.{i}.ffn_norm.weight": p + "post_attention_layernorm.weight",
            f"blk.{i}.ffn_up.weight": p + "mlp.gate_up_proj.weight",
            f"blk.{i}.ffn_down.weight": p + "mlp.down_proj.weight",
        }
    return names


def gemma3_llama_cpp_names(layers: int) -> dict[str, tuple[str, bool]]:
    """llama.cpp's tensor names for a Gemma 3 model: each one's Hugging Face name, and whether it is a norm (stored as
    1 + weight): Gemma 2's, and a norm on each head's query and key."""
    from tokenwire.engine.llamacpp import layout

    names = layout.gemma2_names(layers)
    for i in range(layers):
        p = f"model.layers.{i}."
        names[f"blk.{i}.attn_q_norm.weight"] = (p + "self_attn.q_norm.weight", True)
        names[f"blk.{i}.attn_k_norm.weight"] = (p + "self_attn.k_norm.weight", True)
    return names
