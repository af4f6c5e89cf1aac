"""Long-context evaluation, offline and deterministic: needle retrieval and loss by position.

Two retrieval tasks, generated locally for a tokenizer, a context length and a seed:

- `passkey` (Mohtashami & Jaggi 2023): a task description, the repeated filler "The grass is green. The
  sky is blue. ..." with "The pass key is NNNNN. Remember it. NNNNN is the pass key." hidden in it, and
  "What is the pass key? The pass key is" at the end. A random 5-digit key per item.
- `niah` (RULER's `niah_single` / `niah_multikey` shape, Hsieh et al. 2024): sentences "One of the special
  magic numbers for {key} is: {N}." hidden in real text (default: the bundled Tiny Shakespeare), one
  asked for and `needles - 1` distractors with other keys, 7-digit values; the question names the key.

Every prompt is built by token counts: the filler is tokenized once and cut by tokens, so a prompt has
exactly `context` tokens (a leading BOS counted where the tokenizer adds one, see `bos_token`). The needle
goes in at the sentence (or line) boundary of the filler closest to the asked depth; depths are spread
evenly over [0, 1] across the items. Scoring is greedy decoding of a few tokens with the model's own
`generate` and an exact match of the answer (not part of a longer number) in the continuation.

`position_losses` measures the mean next-token loss per position bucket (0-512, 512-1k, 1k-2k, 2k-4k,
4k-8k tokens) of long windows: does the model still use what is far back in its context?
"""

from __future__ import annotations

import bisect
import copy
import math
import random
import re
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, GenerationConfig, PreTrainedModel

from harp.engine.perplexity import model_device
from harp.engine.text import BUNDLED, TEXT_SUFFIXES, Text, bos_token, load_text
from harp.modeling import arch_for, cache_kwarg, get_module
from harp.util.progress import Progress

LONGCTX_TASKS = ("passkey", "niah")

# ---- passkey (Mohtashami & Jaggi, "Landmark Attention", 2023) --------------------------------------------
PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                 "I will quiz you about the important information there.")
PASSKEY_FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                  "There and back again.")
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"

# ---- niah (RULER's niah template, numbers as values) -----------------------------------------------------
NIAH_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
              "I will quiz you about the numbers afterwards.")
NIAH_NEEDLE = "One of the special magic numbers for {key} is: {value}."
NIAH_QUESTION = ("What is the special magic number for {key} mentioned in the provided text? "
                 "The special magic number for {key} mentioned in the provided text is")
NIAH_KEYS = (
    "apple", "anchor", "badger", "banjo", "beacon", "biscuit", "blossom", "bramble", "candle", "canyon",
    "cedar", "chestnut", "cobalt", "comet", "copper", "cricket", "crystal", "dolphin", "ember", "falcon",
    "fern", "garnet", "glacier", "harbor", "hazel", "heron", "indigo", "island", "jasmine", "juniper",
    "kettle", "lantern", "lemon", "lilac", "lobster", "maple", "meadow", "mosaic", "nectar", "nutmeg",
    "oasis", "olive", "orchid", "otter", "pebble", "pepper", "pigeon", "quartz", "quill", "raven",
    "ribbon", "saffron", "salmon", "sparrow", "spruce", "thistle", "thunder", "tulip", "velvet", "walnut",
    "willow", "zephyr",
)  # fmt: skip
DEFAULT_HAYSTACK = "tinyshakespeare"  # harp/data/tinyshakespeare.txt.gz (public domain), a bundled text

DEFAULT_BUCKETS: tuple[tuple[int, int], ...] = ((0, 512), (512, 1024), (1024, 2048), (2048, 4096), (4096, 8192))


@dataclass(frozen=True)
class RetrievalItem:
    """One prompt: `ids` (exactly `context` tokens, BOS first where the tokenizer adds one) and the
    `answer` the continuation must contain. `position` is the token index of the asked needle in `ids`;
    `placed_depth` the fraction of the filler before it (the asked `depth`, up to a sentence)."""

    task: str
    context: int
    ids: tuple[int, ...]
    answer: str
    depth: float
    placed_depth: float
    position: int
    needle_tokens: int
    max_new_tokens: int
    key: str | None = None  # niah: the key asked for
    distractors: tuple[str, ...] = ()  # niah: the other needles' values


@dataclass
class RetrievalScore:
    """Exact-match accuracy of one task at one context, with the binomial standard error
    sqrt(p (1 - p) / n), accuracy per depth bin and every item's output."""

    task: str
    context: int
    acc: float
    n: int
    correct: int
    stderr: float
    by_depth: list[dict[str, Any]] = field(default_factory=list)
    items: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.task}@{self.context}"

    def to_dict(self, items: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not items:
            d.pop("items")
        return d

    @classmethod
    def from_rows(cls, task: str, context: int, rows: Sequence[dict[str, Any]], seconds: float = 0.0) -> RetrievalScore:
        """The score of scored items (`{"depth", "answer", "output", "correct"}` each, as in `items`), e.g. the
        rows of several runs over parts of one item list joined."""
        if not rows:
            raise ValueError(f"{task}@{context}: no scored items to summarise.")
        n = len(rows)
        correct = sum(bool(r["correct"]) for r in rows)
        p = correct / n
        return cls(task=task, context=context, acc=p, n=n, correct=correct, stderr=math.sqrt(p * (1 - p) / n),
                   by_depth=depth_bins(rows), items=list(rows), seconds=seconds)


@dataclass
class PositionLosses:
    """Mean next-token NLL (nats) per position bucket of N windows of S tokens. A bucket [start, end)
    holds the predictions of the tokens at those positions (position 0, the first token, is never
    predicted); buckets that start at or beyond S are left out, the last one present may be partial.
    `curve[p - 1]` is the mean NLL of predicting the token at position p, over the windows."""

    buckets: list[dict[str, Any]]
    nll: float
    ppl: float
    tokens: int
    windows: int
    seq_len: int
    curve: list[float] = field(default_factory=list)

    def to_dict(self, curve: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not curve:
            d.pop("curve")
        return d


# ------------------------------------------------------------------------------------------------------
# Argument checks (shared with the command line's preflight: no weights needed)
# ------------------------------------------------------------------------------------------------------


def check_task(task: str) -> str:
    """The canonical task name, or a ValueError naming the valid ones."""
    name = str(task).strip().lower()
    if name not in LONGCTX_TASKS:
        raise ValueError(f"Unknown long-context task {task!r} (`task`): valid tasks are {', '.join(LONGCTX_TASKS)}.")
    return name


def parse_contexts(spec: str | int | Sequence[int]) -> list[int]:
    """'1024,4096', '4k,8k', 4096 or [1024, 4096] -> [1024, 4096] (distinct, in the order given)."""
    parts: list[Any]
    if isinstance(spec, int) and not isinstance(spec, bool):
        parts = [spec]
    elif isinstance(spec, str):
        parts = [p.strip() for p in spec.split(",") if p.strip()]
    else:
        parts = list(spec)
    out: list[int] = []
    for p in parts:
        try:
            s = str(p).strip().lower()
            n = int(float(s[:-1]) * 1024) if s.endswith("k") else int(s)
        except ValueError:
            raise ValueError(f"Bad `context={spec!r}`: give token counts, e.g. '1024,4096' or '4k,8k'.") from None
        if n < 64:
            raise ValueError(f"`context={n}` is too short for a retrieval prompt: use at least 64 tokens.")
        if n not in out:
            out.append(n)
    if not out:
        raise ValueError("`context` is empty: give token counts, e.g. '1024,4096'.")
    return out


def max_positions(config: Any) -> int | None:
    """The model's maximum context from its config (`max_position_embeddings`), or None."""
    n = getattr(config, "max_position_embeddings", None) if not isinstance(config, dict) \
        else config.get("max_position_embeddings")
    return int(n) if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def check_context(context: int, limit: int | None, name: str = "context") -> None:
    """A context longer than the model's maximum is refused with both numbers."""
    if limit is not None and context > limit:
        raise ValueError(
            f"`{name}={context}` is longer than the model's maximum {limit} tokens (max_position_embeddings); "
            f"pass a smaller `{name}`."
        )


# ------------------------------------------------------------------------------------------------------
# Filler / haystack text, tokenized once per tokenizer
# ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Haystack:
    ids: tuple[int, ...]
    bounds: tuple[int, ...]  # token indices where a sentence or line starts (sorted, 0 included)
    description: str


_CACHE: weakref.WeakKeyDictionary[Any, dict[str, _Haystack]] = weakref.WeakKeyDictionary()
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")


def load_filler(filler: str | Path | Text | None) -> Text:
    """The haystack text: None (the bundled Tiny Shakespeare), a `Text`, a file or folder path, a bundled
    text name (`harp.engine.text.BUNDLED`), or the text itself (a string that is neither an existing path
    nor looks like one)."""
    if isinstance(filler, Text):
        return filler
    s = DEFAULT_HAYSTACK if filler is None else str(filler)
    if s in BUNDLED:
        return load_text(s)
    if isinstance(filler, Path) or _looks_like_path(s):
        try:
            return load_text(s)
        except FileNotFoundError:
            raise FileNotFoundError(f"`filler={s}`: no such file or folder (give a text file, a folder of text "
                                    "files, or the filler text itself).") from None
    if not s.strip():
        raise ValueError("`filler` is empty: give a text file, a folder of text files, or the text itself.")
    return Text("text", f"given text ({len(s):,} characters)", s)


def _looks_like_path(s: str) -> bool:
    if "\n" in s or len(s) > 4096:
        return False
    p = Path(s).expanduser()
    if p.exists():
        return True
    if " " in s.strip():
        return False
    return "/" in s or p.suffix.lower() in TEXT_SUFFIXES | {".gz"}


def _haystack(tokenizer: Any, text: Text) -> _Haystack:
    try:
        per_tok = _CACHE.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: no cache
        per_tok = {}
    key = text.sha256
    if key not in per_tok:
        per_tok[key] = _tokenize_with_bounds(tokenizer, text)
    return per_tok[key]


def _tokenize_with_bounds(tokenizer: Any, text: Text) -> _Haystack:
    s = text.text
    try:
        enc = tokenizer(s, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False,
                        verbose=False)
        ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    except (NotImplementedError, TypeError, ValueError, KeyError):  # slow tokenizers have no offsets
        ids = list(tokenizer(s, add_special_tokens=False, return_attention_mask=False)["input_ids"])
        return _Haystack(tuple(ids), tuple(range(len(ids) + 1)), text.description)
    bounds = [0]
    for i in range(1, len(ids)):
        st = offsets[i][0]
        k = st  # back over the spaces before the token, then look at what ends there
        while k > 0 and s[k - 1] in " \t":
            k -= 1
        spaced = k < st or s[st:st + 1] in (" ", "\t", "\n")
        if k > 0 and (s[k - 1] == "\n" or (spaced and _SENTENCE_END.search(s[max(0, k - 4):k]))):
            bounds.append(i)
    bounds.append(len(ids))
    return _Haystack(tuple(ids), tuple(sorted(set(bounds))), text.description)


def _encode(tokenizer: Any, s: str) -> list[int]:
    return list(tokenizer(s, add_special_tokens=False, return_attention_mask=False)["input_ids"])


def _depths(n: int) -> list[float]:
    return [0.5] if n == 1 else [i / (n - 1) for i in range(n)]


def _closest(bounds: Sequence[int], target: float) -> int:
    j = bisect.bisect_left(bounds, target)
    cands = [bounds[k] for k in (j - 1, j) if 0 <= k < len(bounds)]
    return min(cands, key=lambda b: (abs(b - target), b))


# ------------------------------------------------------------------------------------------------------
# Item generators
# ------------------------------------------------------------------------------------------------------


def passkey_items(tokenizer: Any, context: int, n: int = 50, seed: int = 0, *,
                  filler: str | Path | Text | None = None) -> list[RetrievalItem]:
    """`n` passkey prompts of exactly `context` tokens; depths spread evenly over [0, 1]. The filler is
    the classic repeated "The grass is green. ..." (never too short), or `filler` text cut by tokens."""
    return _items("passkey", tokenizer, context, n, seed, filler, needles=1)


def niah_items(tokenizer: Any, context: int, n: int = 50, seed: int = 0, *,
               filler: str | Path | Text | None = None, needles: int = 4) -> list[RetrievalItem]:
    """`n` needle-in-a-haystack prompts of exactly `context` tokens in real text (`filler`, default the
    bundled Tiny Shakespeare): `needles` magic-number sentences with distinct keys (1 = RULER's
    niah_single, more = niah_multikey), the first of them asked for at the item's depth, the others at
    seeded random boundaries. Each item starts at a seeded random sentence of the text."""
    if isinstance(needles, bool) or not isinstance(needles, int) or not 1 <= needles <= len(NIAH_KEYS):
        raise ValueError(f"`needles={needles!r}` must be between 1 and {len(NIAH_KEYS)}.")
    return _items("niah", tokenizer, context, n, seed, filler if filler is not None else DEFAULT_HAYSTACK,
                  needles=needles)


def retrieval_items(task: str, tokenizer: Any, context: int, n: int = 50, seed: int = 0, *,
                    filler: str | Path | Text | None = None, max_context: int | None = None) -> list[RetrievalItem]:
    """Items of `task` ('passkey' or 'niah'); `max_context` (the model's maximum) refuses longer contexts."""
    name = check_task(task)
    check_context(context, max_context)
    if name == "passkey":
        return passkey_items(tokenizer, context, n, seed, filler=filler)
    return niah_items(tokenizer, context, n, seed, filler=filler)


def _items(task: str, tokenizer: Any, context: int, n: int, seed: int, filler: Any,
           needles: int) -> list[RetrievalItem]:
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise ValueError(f"`context={context!r}` must be a positive number of tokens.")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"`n={n!r}` must be at least 1.")
    bos = bos_token(tokenizer)
    hay = None if filler is None else _haystack(tokenizer, load_filler(filler))
    if hay is None:  # the classic passkey filler: sentences cycled and cut by tokens
        sent_ids = [_encode(tokenizer, " " + s) for s in PASSKEY_FILLER]  # the space goes with the next word
    rng = random.Random(f"harp-longctx:{task}:{seed}")
    out: list[RetrievalItem] = []
    for depth in _depths(n):
        if task == "passkey":
            answer = str(rng.randint(10000, 99999))
            head = _encode(tokenizer, PASSKEY_INTRO + "\n")
            target = _encode(tokenizer, "\n" + PASSKEY_NEEDLE.format(key=answer) + "\n")
            tail = _encode(tokenizer, "\n" + PASSKEY_QUESTION)
            others: list[list[int]] = []
            key, distract_vals = None, ()
        else:
            keys = rng.sample(NIAH_KEYS, needles)
            values = [str(v) for v in rng.sample(range(1_000_000, 10_000_000), needles)]
            key, answer, distract_vals = keys[0], values[0], tuple(values[1:])
            head = _encode(tokenizer, NIAH_INTRO + "\n")
            target = _encode(tokenizer, " " + NIAH_NEEDLE.format(key=key, value=answer) + "\n")
            others = [_encode(tokenizer, " " + NIAH_NEEDLE.format(key=k, value=v) + "\n")
                      for k, v in zip(keys[1:], values[1:], strict=True)]
            tail = _encode(tokenizer, "\n" + NIAH_QUESTION.format(key=key))
        fixed = (bos is not None) + len(head) + len(target) + sum(map(len, others)) + len(tail)
        budget = context - fixed
        if budget < max(1, 4 * needles):
            raise ValueError(f"`context={context}` is too short for a {task} prompt: its fixed parts alone take "
                             f"{fixed} tokens; use a `context` of at least {fixed + 4 * needles}.")
        if hay is None:
            fill, bounds = _cycled(sent_ids, budget)
        else:
            fill, bounds = _cut(hay, budget, rng, context)
        # the asked needle at the boundary closest to the depth; distractors at other random boundaries
        at = _closest(bounds, depth * budget)
        free = [b for b in bounds if b != at] or list(bounds)
        spots = sorted([(at, 0)] + [(rng.choice(free), i + 1) for i in range(len(others))])
        ids: list[int] = [] if bos is None else [bos]
        ids += head
        prev, position = 0, -1
        for b, which in spots:
            ids += fill[prev:b]
            prev = b
            if which == 0:
                position = len(ids)
                ids += target
            else:
                ids += others[which - 1]
        ids += fill[prev:]
        ids += tail
        assert len(ids) == context, (len(ids), context)
        out.append(RetrievalItem(
            task=task, context=context, ids=tuple(int(i) for i in ids), answer=answer, depth=round(depth, 6),
            placed_depth=at / budget, position=position, needle_tokens=len(target),
            max_new_tokens=len(_encode(tokenizer, " " + answer)) + 4, key=key, distractors=distract_vals,
        ))
    return out


# ---- the recall probe of `kind=auto` (not an evaluation task) -------------------------------------------
# Facts planted in calibration text and asked for at its end, teacher-forced. Their wording, keys and intro
# are held out from both evaluation tasks above (no pass key, no magic number, no instructions), so a plan
# chosen on this probe is judged on passkey and niah without having seen either template.
RECALL_FACTS = (  # (planted sentence, question the answer follows)
    ("The {key} code is {value}.", "The {key} code is"),
    ("Remember that the locker of {key} opens with {value}.", "The locker of {key} opens with"),
    ("{key} was given the ticket number {value}.", "Which ticket number was {key} given? It was"),
    ("Write this down: the account of {key} is {value}.", "The account of {key} is"),
    ("On the back of the photo of {key}, someone wrote {value}.", "On the back of the photo of {key}, someone wrote"),
)
RECALL_KEYS = (
    "Abigail", "Bernard", "Clara", "Desmond", "Elena", "Felix", "Greta", "Hugo", "Ingrid", "Jonas", "Kira",
    "Leon", "Mira", "Nils", "Olga", "Pavel", "Rosa", "Silas", "Tessa", "Viktor", "Wanda", "Yusuf", "Zora",
)  # fmt: skip


def recall_probe(tokenizer: Any, text: Text, length: int, far: int, *, n: int = 1, needles: int = 4,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` teacher-forced recall windows of exactly `length` tokens for a loss objective: `needles` facts
    ("The Clara code is 48213.", wordings from `RECALL_FACTS`, none of them an evaluation task's) planted in
    `text`, all at least `far` tokens before the end of the haystack, then every question, in shuffled order,
    followed by its answer (a 5- to 7-digit number). Returns (ids (n, length), mask (n, length)): mask[i, t]
    marks the positions whose next token is an answer token, so a model's NLL there is how well it still
    recalls what lies `far` tokens and more back (with `far` >= a window layer's w, past its window)."""
    if isinstance(needles, bool) or not isinstance(needles, int) or not 1 <= needles <= len(RECALL_KEYS):
        raise ValueError(f"`needles={needles!r}` must be between 1 and {len(RECALL_KEYS)}.")
    bos = bos_token(tokenizer)
    hay = _haystack(tokenizer, text)
    rng = random.Random(f"harp-recall:{seed}")
    rows, masks = [], []
    for _ in range(n):
        keys = rng.sample(RECALL_KEYS, needles)
        facts = [rng.choice(RECALL_FACTS) for _ in keys]
        values = [str(rng.randrange(10 ** (d - 1), 10 ** d)) for d in (rng.randint(5, 7) for _ in keys)]
        planted = [_encode(tokenizer, " " + fact.format(key=k, value=v) + "\n")
                   for (fact, _), k, v in zip(facts, keys, values, strict=True)]
        order = rng.sample(range(needles), needles)
        asked = [(_encode(tokenizer, "\n" + facts[j][1].format(key=keys[j])), _encode(tokenizer, " " + values[j]))
                 for j in order]
        fixed = (bos is not None) + sum(map(len, planted)) + sum(len(q) + len(a) for q, a in asked)
        budget = length - fixed
        room = budget - far  # the needles go in the filler's first `room` tokens: every answer is `far` past them
        if room < 4 * needles:
            raise ValueError(f"Recall windows of {length} tokens leave no room for {needles} needles {far} tokens "
                             f"before their questions (the fixed parts take {fixed}): use windows of at least "
                             f"{fixed + far + 4 * needles} tokens or a smaller distance.")
        fill, bounds = _cut(hay, budget, rng, length)
        spots = sorted({_closest([b for b in bounds if b <= room], room * (i + 0.5) / needles)
                        for i in range(needles)})
        while len(spots) < needles:  # too few boundaries: any token will do
            spots = sorted(set(spots) | {rng.randrange(room + 1)})
        ids: list[int] = [] if bos is None else [bos]
        prev = 0
        for b, needle in zip(spots, planted, strict=True):
            ids += fill[prev:b] + needle
            prev = b
        ids += fill[prev:]
        mask = [False] * length
        for q, a in asked:
            ids += q
            for j in range(len(a)):  # position t predicts token t + 1: the answer's tokens
                mask[len(ids) - 1 + j] = True
            ids += a
        assert len(ids) == length, (len(ids), length)
        rows.append(ids)
        masks.append(mask)
    return torch.tensor(rows, dtype=torch.long), torch.tensor(masks, dtype=torch.bool)


def _cycled(sentences: list[list[int]], budget: int) -> tuple[list[int], list[int]]:
    fill: list[int] = []
    bounds = [0]
    i = 0
    while len(fill) < budget:
        fill += sentences[i % len(sentences)]
        i += 1
        bounds.append(len(fill))
    fill = fill[:budget]
    return fill, [b for b in bounds if b < budget] + [budget]


def _cut(hay: _Haystack, budget: int, rng: random.Random, context: int) -> tuple[list[int], list[int]]:
    total = len(hay.ids)
    if total < budget:
        raise ValueError(
            f"The `filler` text ({hay.description}) has {total:,} tokens; `context={context}` needs {budget:,} "
            f"of it. Give a longer text or a smaller `context`."
        )
    last = bisect.bisect_right(hay.bounds, total - budget)
    starts = hay.bounds[:last] or (0,)
    start = rng.choice(starts)
    lo, hi = bisect.bisect_left(hay.bounds, start), bisect.bisect_right(hay.bounds, start + budget)
    bounds = sorted({b - start for b in hay.bounds[lo:hi]} | {0, budget})
    return list(hay.ids[start:start + budget]), bounds


# ------------------------------------------------------------------------------------------------------
# Scoring
# ------------------------------------------------------------------------------------------------------


@contextmanager
def attention_implementation(model: nn.Module, impl: str = "sdpa") -> Iterator[str | None]:
    """Run `model` with `impl` attention (default sdpa: no heads x S x S probability tensor is kept)
    and restore its own after. Gemma 2's attention soft-capping has no sdpa form: such a model keeps
    eager attention (exact, O(S^2) memory). Yields the implementation in use (None for a model that
    cannot switch, e.g. a stub)."""
    config = getattr(model, "config", None)
    old = getattr(config, "_attn_implementation", None)
    if getattr(config, "attn_logit_softcapping", None) or not hasattr(model, "set_attn_implementation") \
            or old in (None, impl):
        yield old
        return
    model.set_attn_implementation(impl)
    try:
        yield impl
    finally:
        model.set_attn_implementation(old)


def _answer_in(answer: str, text: str) -> bool:
    return re.search(rf"(?<!\d){re.escape(answer)}(?!\d)", text) is not None


def _pad_id(tokenizer: Any, model: nn.Module) -> int:
    for v in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None),
              getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(v, (list, tuple)):
            v = v[0] if v else None
        if isinstance(v, int):
            return v
    return 0


def depth_bins(items: Sequence[dict[str, Any]], bins: int = 5) -> list[dict[str, Any]]:
    """Accuracy per depth bin ([0, 0.2), ..., [0.8, 1.0] for 5 bins); empty bins left out."""
    out = []
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        sel = [it for it in items if lo <= it["depth"] < hi or (b == bins - 1 and it["depth"] == 1.0)]
        if sel:
            c = sum(bool(it["correct"]) for it in sel)
            out.append({"depth": f"{lo:.1f}-{hi:.1f}", "n": len(sel), "correct": c, "acc": c / len(sel)})
    return out


SHARED_PREFIX_MIN = 128  # a prompt prefix shared with the others is computed once from this many tokens on


def _shared_prefixes(items: Sequence[RetrievalItem]) -> tuple[tuple[int, ...], list[int]]:
    """A base prompt (the one whose needle is deepest: passkey prompts share the filler up to their needle)
    and how many leading tokens each item shares with it and with one other item at least, at least one
    token short of the item."""
    top = max(range(len(items)), key=lambda i: items[i].position)
    base = items[top].ids

    def common(ids: tuple[int, ...]) -> int:
        n, i = min(len(ids), len(base)) - 1, 0
        while i < n and ids[i] == base[i]:
            i += 1
        return i

    shared = [common(it.ids) for it in items]
    shared[top] = max((x for i, x in enumerate(shared) if i != top), default=0)  # the base shares what others do
    return base, shared


@torch.no_grad()
def retrieval_score(model: nn.Module, tokenizer: Any, items: Sequence[RetrievalItem], *,
                    progress: bool | str = False,
                    on_item: Callable[[int, dict[str, Any], float], None] | None = None) -> RetrievalScore:
    """Greedy-decode each item's few answer tokens (batch size 1, explicit attention mask, sdpa attention
    where the model has it, no attention weights returned) and score an exact match of the answer in
    the continuation. All items must be one task at one context. Works with harp-pruned models.

    Prompts that share a prefix of at least SHARED_PREFIX_MIN tokens (passkey's filler before its needle)
    share its computation: the items run in order of that prefix, one model cache advances along it and
    each item continues from a copy (window layers' caches included), so a passkey cell costs about half
    the prefills. `on_item(index, row, seconds)` is called as each item is scored (`index` into `items`);
    the score lists the items in their given order."""
    if not items:
        raise ValueError("`items` is empty: nothing to score.")
    tasks = {(it.task, it.context) for it in items}
    if len(tasks) != 1:
        raise ValueError(f"`items` mixes tasks/contexts {sorted(tasks)}: score one task at one context at a time.")
    task, context = tasks.pop()
    check_context(context, max_positions(getattr(model, "config", None)))
    dev = model_device(model)
    was_training = model.training
    model.eval()
    pad = _pad_id(tokenizer, model)
    base, shared = _shared_prefixes(items)
    if not isinstance(model, PreTrainedModel):  # a model without transformers' cache: every prompt whole
        shared = [0] * len(items)
    order = sorted(range(len(items)), key=lambda i: shared[i])
    kw = cache_kwarg(model)
    t0 = time.perf_counter()
    rows: dict[int, dict[str, Any]] = {}
    cache, fed = None, 0
    desc = progress if isinstance(progress, str) else f"{task}@{context}"
    try:
        with attention_implementation(model), Progress(len(items), desc, enabled=bool(progress)) as bar:
            for i in order:
                t1 = time.perf_counter()
                it = items[i]
                past = None
                if shared[i] >= SHARED_PREFIX_MIN:
                    if cache is None:
                        cache = DynamicCache(config=model.config)
                    if shared[i] > fed:  # advance the shared cache to this item's prefix
                        model(input_ids=torch.tensor([base[fed:shared[i]]], dtype=torch.long, device=dev),
                              use_cache=True, logits_to_keep=1, **{kw: cache})
                        fed = shared[i]
                    past = copy.deepcopy(cache)
                ids = torch.tensor([it.ids], dtype=torch.long, device=dev)
                gc = GenerationConfig(max_new_tokens=it.max_new_tokens, do_sample=False, num_beams=1,
                                      pad_token_id=pad, output_attentions=False, output_hidden_states=False)
                extra = {} if past is None else {kw: past}
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gc,
                                     **extra)
                text = tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
                rows[i] = {"depth": it.depth, "answer": it.answer, "output": text,
                           "correct": _answer_in(it.answer, text)}
                if on_item is not None:
                    on_item(i, rows[i], time.perf_counter() - t1)
                bar.advance()
    finally:
        if was_training:
            model.train()
    return RetrievalScore.from_rows(task, context, [rows[i] for i in range(len(items))], time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------------------
# Loss by position
# ------------------------------------------------------------------------------------------------------


@torch.no_grad()
def token_nll(model: nn.Module, hidden: torch.Tensor, windows: torch.Tensor, chunk_tokens: int = 1024) -> torch.Tensor:
    """Per-token next-token NLL (B, S-1), float32, given final-normed hidden states (B, S, H) of
    `windows` (B, S): position t predicts token t+1. Like `head_nll`, the LM head runs `chunk_tokens`
    rows at a time (with Gemma's final soft-capping), never over all tokens at once."""
    arch = arch_for(model.config)
    head = get_module(model, arch.lm_head)
    cap = getattr(model.config, "final_logit_softcapping", None)
    b, s, _ = hidden.shape
    h = hidden[:, :-1, :].reshape(-1, hidden.shape[-1])
    t = windows[:, 1:].reshape(-1).to(h.device)
    out = torch.empty(h.shape[0], dtype=torch.float32)
    for i in range(0, h.shape[0], chunk_tokens):
        logits = head(h[i:i + chunk_tokens]).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        out[i:i + chunk_tokens] = F.cross_entropy(logits, t[i:i + chunk_tokens], reduction="none").cpu()
    return out.view(b, s - 1)


def bucket_label(start: int, end: int) -> str:
    """(512, 1024) -> '512-1k', (0, 512) -> '0-512'."""
    def k(x: int) -> str:
        return f"{x // 1024}k" if x >= 1024 and x % 1024 == 0 else str(x)
    return f"{k(start)}-{k(end)}"


@torch.no_grad()
def position_losses(model: nn.Module, windows: torch.Tensor, *,
                    buckets: Sequence[tuple[int, int]] = DEFAULT_BUCKETS, chunk_tokens: int = 1024,
                    progress: bool | str = False) -> PositionLosses:
    """Mean NLL per position bucket of `windows` (N, S), S up to 8192 or more, and the overall
    perplexity (the same number `perplexity` gives for these windows).

    One window at a time, without a KV cache, with **sdpa** attention (the model is switched from eager
    for the pass and back after; eager attention would keep heads x S x S probabilities, O(S^2)
    memory), and the LM head in `chunk_tokens`-row chunks: an 8k-token forward of a 1.5B model fits in
    a few GiB beyond its weights. Gemma 2 keeps eager attention (its soft-capping has no sdpa form)."""
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError("`windows` must be a 2-D tensor (N, seq_len) with seq_len >= 2.")
    n_win, s = windows.shape
    arch = arch_for(model.config)
    backbone = get_module(model, arch.backbone)
    dev = model_device(model)
    sums = torch.zeros(s - 1, dtype=torch.float64)
    desc = progress if isinstance(progress, str) else "loss by position"
    with attention_implementation(model), Progress(n_win, desc, enabled=bool(progress)) as bar:
        for i in range(n_win):
            batch = windows[i:i + 1].to(dev)
            hidden = backbone(input_ids=batch, use_cache=False).last_hidden_state
            sums += token_nll(model, hidden, batch, chunk_tokens)[0].double()
            del hidden
            bar.advance()
    curve = sums / n_win  # curve[p - 1]: predicting the token at position p
    rows = []
    for lo, hi in buckets:
        a, b = max(lo, 1), min(hi, s)
        if lo >= s or a >= b:
            continue
        seg = sums[a - 1:b - 1]
        nll = float(seg.sum() / (seg.numel() * n_win))
        rows.append({"bucket": bucket_label(lo, hi), "start": lo, "end": hi, "nll": nll, "ppl": math.exp(nll),
                     "tokens": seg.numel() * n_win})
    total = float(sums.sum() / ((s - 1) * n_win))
    return PositionLosses(buckets=rows, nll=total, ppl=math.exp(total), tokens=(s - 1) * n_win, windows=n_win,
                          seq_len=s, curve=[float(x) for x in curve])
