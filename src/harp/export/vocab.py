"""GGUF tokenizer metadata (`tokenizer.*` keys) for an exported model.

Two sources, in this order of preference:

1. a reference GGUF of the same base model (`tokenizer_gguf`, or the model's own .gguf source):
   its `tokenizer.*` keys are copied verbatim;
2. the Hugging Face tokenizer, for byte-level BPE tokenizers (LLaMA 3, Qwen2, SmolLM, GPT-2 style):
   tokens, token types, merges and special ids are written the way llama.cpp's converter writes them.
   llama.cpp also needs the name of the pre-tokenizer (`tokenizer.ggml.pre`), which it identifies by
   hashing the token ids of a fixed probe text; harp knows the hashes of a few common tokenizers and
   asks for a reference GGUF otherwise (it never guesses).
"""

from __future__ import annotations

import json
import tempfile
from hashlib import sha256
from pathlib import Path
from typing import Any

import gguf

from harp.export.deci import ExportError

# llama.cpp's probe text for identifying BPE pre-tokenizers (llama.cpp, MIT licence, convert_hf_to_gguf
# `get_vocab_base_pre`): sha256(str(tokenizer.encode(PROBE))) names the pre-tokenizer.
PROBE = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f "
    "(multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 "
    "3.3 3..3 3...3 \u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785"
    "\U0001f601 ?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= "
    "\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll "
    "make it, 'D you like some tea? We'Ve a'lL"
)

# probe hash -> llama.cpp pre-tokenizer name (values from llama.cpp's converter)
KNOWN_PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # HuggingFaceTB/SmolLM(2)
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / Qwen2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
}

# Added tokens some models forget to flag as special (llama.cpp treats them as control tokens too).
_LOOKS_SPECIAL = {"<pad>", "<mask>", "<2mass>", "[@BOS@]"}


def copy_tokenizer_metadata(writer: gguf.GGUFWriter, source: str | Path, vocab_size: int) -> None:
    """Copy every `tokenizer.*` key of the GGUF file `source` into `writer`."""
    source = Path(source)
    if not source.is_file():
        raise FileNotFoundError(f"Tokenizer GGUF {source} not found.")
    reader = gguf.GGUFReader(source)
    tokens = reader.get_field("tokenizer.ggml.tokens")
    if tokens is None:
        raise ExportError(
            f"{source} has no tokenizer metadata (tokenizer.ggml.tokens); pick another `tokenizer_gguf`."
        )
    if len(tokens.data) != vocab_size:
        raise ExportError(
            f"{source} has {len(tokens.data)} tokens but the model's vocabulary has {vocab_size}: it is "
            "not a GGUF of the same base model. Pass a GGUF of the model you pruned."
        )
    for key, f in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, f.contents(), gguf.GGUFValueType.ARRAY, sub_type=f.types[-1])
        else:
            writer.add_key_value(key, f.contents(), f.types[0])


def pre_tokenizer_name(tokenizer: Any) -> str:
    digest = sha256(str(tokenizer.encode(PROBE)).encode()).hexdigest()
    name = KNOWN_PRE_TOKENIZERS.get(digest)
    if name is None:
        raise ExportError(
            "harp does not recognise this tokenizer's pre-tokenizer, so it cannot write llama.cpp "
            "tokenizer metadata that tokenises exactly like the original. Pass `tokenizer_gguf=FILE`, any "
            "GGUF of the same base model (e.g. the one llama.cpp's convert_hf_to_gguf.py makes of the "
            "unpruned model); its tokenizer metadata is copied."
        )
    return name


def _is_byte_level_bpe(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    model = json.loads(backend.to_str()).get("model", {})
    return model.get("type") == "BPE" and not model.get("byte_fallback", False)


def hf_tokenizer_metadata(writer: gguf.GGUFWriter, tokenizer: Any, vocab_size: int) -> None:
    """Write llama.cpp 'gpt2' (byte-level BPE) tokenizer metadata built from a HF tokenizer."""
    if not _is_byte_level_bpe(tokenizer):
        raise ExportError(
            f"harp builds GGUF tokenizer metadata for byte-level BPE tokenizers only; this one is "
            f"{type(tokenizer).__name__} (SentencePiece-style tokenizers need scores harp does not write). "
            "Pass `tokenizer_gguf=FILE`, any GGUF of the same base model; its tokenizer metadata is copied."
        )
    pre = pre_tokenizer_name(tokenizer)
    vocab: dict[str, int] = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ExportError(f"Tokenizer has token id {max(vocab.values())} >= model vocab_size {vocab_size}.")
    by_id = {i: tok for tok, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        tok = by_id.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        if tok in added:
            if not decoder[i].normalized:  # llama.cpp expects added tokens in normalised form
                tok = tokenizer.decode(tokenizer.encode(tok, add_special_tokens=False))
            if decoder[i].special or tok in _LOOKS_SPECIAL:
                types.append(gguf.TokenType.CONTROL)
            else:
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(tok)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # merges, special token ids, add_bos/eos flags and the chat template come from the tokenizer files
    with tempfile.TemporaryDirectory(prefix="harp-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=vocab_size)
        if not special.merges:
            raise ExportError("The tokenizer has no BPE merges; cannot write llama.cpp tokenizer metadata.")
        # what the HF tokenizer really does decides add_bos/add_eos when its files do not say
        plain = tokenizer.encode("a", add_special_tokens=False)
        full = tokenizer.encode("a")
        extra = len(full) > len(plain)
        flags = {
            "bos": extra and full[0] == tokenizer.bos_token_id,
            "eos": extra and full[-1] == tokenizer.eos_token_id,
        }
        for typ, value in flags.items():
            special.add_special_token.setdefault(typ, bool(value))
        special.add_to_gguf(writer, quiet=True)


def no_vocab_metadata(writer: gguf.GGUFWriter) -> None:
    """A GGUF without a vocabulary: llama.cpp evaluates token ids but cannot tokenise text."""
    writer.add_tokenizer_model("none")
