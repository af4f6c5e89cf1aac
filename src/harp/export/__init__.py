"""Exports for other engines: DeciLM (`deci`, for vLLM and llama.cpp) and GGUF (`gguf`); `run.export` is the entry."""
