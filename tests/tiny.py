"""Tiny random-weight models, one per supported family, built from configs (no downloads)."""

from __future__ import annotations

import torch
import transformers

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)

FAMILIES: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama_mha": ("LlamaConfig", "LlamaForCausalLM", {"num_key_value_heads": 4, "attention_bias": True}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"use_sliding_window": False}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {"head_dim": 16, "sliding_window": 8, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0},
    ),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16, "sliding_window": 8}),
}


def tiny_model(family: str, seed: int = 0, attn: str = "eager", **overrides) -> torch.nn.Module:
    cfg_name, model_name, extra = FAMILIES[family]
    kw = {**COMMON, **extra, **overrides}
    config = getattr(transformers, cfg_name)(**kw)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    # random init of norms is constant 1 (or 0 for Gemma): perturb them so folds are really tested
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def tiny_tokenizer(vocab_size: int = 512, bos: bool = False):
    """A small BPE tokenizer trained on a slice of the bundled calibration text (no downloads). With
    `bos`, it puts `<s>` in front of every text it encodes, as Llama 3, Mistral and Gemma tokenizers do."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from harp.engine.text import load_text

    text = load_text("wikitext2-valid").text[:200_000]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=150)
    tok.train_from_iterator([text[i : i + 2000] for i in range(0, len(text), 2000)], trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_folder(path, family: str = "llama", bos: bool = False, **overrides):
    """Save a tiny random model + tokenizer as an ordinary transformers folder; returns the path."""
    tok = tiny_tokenizer(bos=bos)
    model = tiny_model(family, vocab_size=len(tok), **overrides)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


BYTE_SPECIALS = ["<|endoftext|>", "<|pad|>"]


def byte_tokenizer():
    """A byte-level tokenizer built in memory: 256 byte tokens + 2 specials (vocab 258), so every string
    round-trips exactly (tiny-model tests that generate or score text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for s in BYTE_SPECIALS:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=BYTE_SPECIALS[0], pad_token=BYTE_SPECIALS[1])
    return fast


VOCAB = 258  # len(byte_tokenizer())


# The start of a script run in a subprocess where `import harp` fails, as on a machine without harp.
HIDE_HARP = """
import sys

class _BlockHarp:  # make `import harp` fail, as on a machine without harp
    def find_spec(self, name, path=None, target=None):
        if name == "harp" or name.startswith("harp."):
            raise ImportError("harp is hidden in this test")
        return None

sys.meta_path.insert(0, _BlockHarp())
"""
