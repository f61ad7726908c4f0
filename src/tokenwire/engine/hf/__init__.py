"""The transformers backend: any Hugging Face causal LM, with tokenwire's own scheduler and KV cache."""
