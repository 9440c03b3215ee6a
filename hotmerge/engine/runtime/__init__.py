"""Live models that candidates are written into: hf.py (transformers), vllm.py (vLLM)."""
