"""Long-context tasks (harp.engine.longctx): passkey / niah generators, exact-match scoring, the loss by
position, on tiny random models and small real tokenizers built offline (seconds)."""

from __future__ import annotations

import math
import re

import pytest
import torch
from tiny import tiny_model, tiny_tokenizer
from torch import nn

from harp.engine import longctx as L
from harp.engine.perplexity import perplexity
from harp.engine.text import bos_token, load_text
from harp.model.prune import prune


def _byte_level_bpe(bos: bool):
    """A GPT-2 style byte-level BPE (the kind SmolLM2 and Qwen use), trained on the bundled text: exact
    round-trips of digits and spaces, offsets for sentence boundaries; with `bos`, <s> before every text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    text = load_text("wikitext2-valid").text[:120_000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text[i:i + 2000] for i in range(0, len(text), 2000)], trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def toks():
    return {"bpe": _byte_level_bpe(False), "bpe_bos": _byte_level_bpe(True),
            "words": tiny_tokenizer(bos=False), "words_bos": tiny_tokenizer(bos=True)}


def _enc(tok, s: str) -> list[int]:
    return tok(s, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------------------------
# Generators
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", L.LONGCTX_TASKS)
def test_generators_are_deterministic_for_a_seed(toks, task):
    tok = toks["bpe"]
    a = L.retrieval_items(task, tok, 400, 6, seed=3)
    b = L.retrieval_items(task, tok, 400, 6, seed=3)
    c = L.retrieval_items(task, tok, 400, 6, seed=4)
    assert a == b
    assert [x.answer for x in a] != [x.answer for x in c]
    assert [x.depth for x in a] == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]  # spread evenly over [0, 1]
    digits = 5 if task == "passkey" else 7
    assert all(re.fullmatch(rf"\d{{{digits}}}", x.answer) for x in a)


@pytest.mark.parametrize("name", ["bpe", "bpe_bos", "words", "words_bos"])
@pytest.mark.parametrize("task", L.LONGCTX_TASKS)
@pytest.mark.parametrize("context", [320, 555, 1500])
def test_prompt_has_the_asked_length_with_bos_where_the_tokenizer_adds_one(toks, name, task, context):
    tok = toks[name]
    bos = bos_token(tok)
    assert (bos is not None) == name.endswith("_bos")
    for it in L.retrieval_items(task, tok, context, 3, seed=0):
        assert abs(len(it.ids) - context) <= 2  # exactly, by construction
        assert (it.ids[0] == bos) if bos is not None else (it.ids[0] != tok.bos_token_id)
        assert bos is None or list(it.ids).count(bos) == 1


@pytest.mark.parametrize("context", [300, 2000])
def test_passkey_needle_is_at_the_asked_depth(toks, context):
    tok = toks["bpe_bos"]
    items = L.passkey_items(tok, context, 5, seed=1)
    head = 1 + len(_enc(tok, L.PASSKEY_INTRO + "\n"))
    for it in items:
        needle = _enc(tok, "\n" + L.PASSKEY_NEEDLE.format(key=it.answer) + "\n")
        tail = _enc(tok, "\n" + L.PASSKEY_QUESTION)
        assert list(it.ids[it.position:it.position + len(needle)]) == needle
        assert list(it.ids[-len(tail):]) == tail
        filler = context - head - len(needle) - len(tail)
        before = it.position - head  # filler tokens in front of the needle
        assert abs(before / filler - it.depth) <= 12 / filler  # the nearest sentence boundary: a few tokens
        assert it.placed_depth == pytest.approx(before / filler)
        text = tok.decode(list(it.ids))
        assert text.count(it.answer) == 2 and text.count("The grass is green.") >= context // 400


def test_niah_needles_keys_and_depth(toks):
    tok = toks["bpe"]
    context = 1200
    items = L.niah_items(tok, context, 5, seed=2, needles=4)
    haystack = L.load_filler(None).text
    for it in items:
        text = tok.decode(list(it.ids))
        sentences = re.findall(r"One of the special magic numbers for (\w+) is: (\d+)\.", text)
        assert len(sentences) == 4 and len({k for k, _ in sentences}) == 4
        assert (it.key, it.answer) in sentences
        assert {v for _, v in sentences} == {it.answer, *it.distractors}
        assert text.rstrip().endswith(f"The special magic number for {it.key} mentioned in the provided text is")
        needle = tok.decode(list(it.ids[it.position:it.position + it.needle_tokens]))
        assert f"for {it.key} is: {it.answer}." in needle
        # the needle sits at the asked fraction of the text between the instructions and the question
        body_start = len(_enc(tok, L.NIAH_INTRO + "\n"))
        body_end = context - len(_enc(tok, "\n" + L.NIAH_QUESTION.format(key=it.key)))
        assert abs((it.position - body_start) / (body_end - body_start) - it.depth) < 0.1
        assert abs(it.placed_depth - it.depth) < 0.05
        # real prose around it: a stretch of the haystack follows the needle
        after = tok.decode(list(it.ids[it.position + it.needle_tokens:it.position + it.needle_tokens + 12]))
        if it.depth < 0.9:
            assert after.strip()[:20] in haystack
    single = L.niah_items(tok, 700, 2, seed=0, needles=1)
    assert all(len(re.findall("special magic numbers for", tok.decode(list(i.ids)))) == 1 for i in single)


@pytest.mark.parametrize("name", ["bpe", "bpe_bos"])
def test_recall_probe_marks_the_answers_far_past_their_needles(toks, name):
    """`recall_probe` (kind=auto's recall objective): windows of exactly the asked length; the mask marks the
    positions whose next token is an answer, every answer is the value planted for its key, every needle ends at
    least `far` tokens before the first answer, and no wording is an evaluation task's (held out)."""
    tok, text = toks[name], load_text("wikitext2-valid")
    ids, mask = L.recall_probe(tok, text, 900, 400, n=3, needles=3, seed=1)
    assert ids.shape == mask.shape == (3, 900) and not mask[:, -1].any()
    again, _ = L.recall_probe(tok, text, 900, 400, n=3, needles=3, seed=1)
    assert torch.equal(ids, again) and not torch.equal(ids, L.recall_probe(tok, text, 900, 400, n=3, needles=3)[0])
    facts = [(re.compile(re.escape(f).replace(r"\{key\}", r"(\w+)").replace(r"\{value\}", r"(\d+)")),
              re.compile(re.escape(q).replace(r"\{key\}", r"(\w+)") + r" (\d+)")) for f, q in L.RECALL_FACTS]
    for row, m in zip(ids.tolist(), mask.tolist(), strict=True):
        if bos_token(tok) is not None:
            assert row[0] == bos_token(tok)
        decoded = tok.decode(row)
        assert "magic number" not in decoded and "pass key" not in decoded
        first_answer = m.index(True) + 1
        body, tail = tok.decode(row[:first_answer - 40]), tok.decode(row[first_answer - 40:])
        planted = {k: v for f, _ in facts for k, v in f.findall(body)}
        asked = [(g[0], g[-1]) for _, q in facts for g in q.findall(tail)]
        assert len(planted) == 3 and sorted(k for k, _ in asked) == sorted(planted)
        assert all(planted[k] == v and 5 <= len(v) <= 7 for k, v in asked)
        marked = tok.decode([row[t + 1] for t in range(900) if m[t]])
        assert sorted(marked.split()) == sorted(planted.values())
        for k, v in planted.items():
            sentence = next(f.format(key=k, value=v) for f, _ in L.RECALL_FACTS if f.format(key=k, value=v) in body)
            needle = _enc(tok, " " + sentence)
            end = next(i + len(needle) for i in range(900) if row[i:i + len(needle)] == needle)
            assert first_answer - end >= 400
    with pytest.raises(ValueError, match=r"no room for 3 needles 800 tokens before their questions"):
        L.recall_probe(tok, text, 900, 800, needles=3)


def test_filler_overrides_the_haystack(toks, tmp_path):
    tok = toks["bpe"]
    story = " ".join(f"Sentence number {i} of the story goes here." for i in range(400))
    f = tmp_path / "story.txt"
    f.write_text(story)
    for filler in (f, str(f), story, tmp_path):
        items = L.niah_items(tok, 500, 2, seed=0, filler=filler)
        text = tok.decode(list(items[0].ids))
        assert "of the story goes here." in text and "Citizen" not in text
    pk = L.passkey_items(tok, 500, 2, seed=0, filler=f)
    assert "The grass is green" not in tok.decode(list(pk[0].ids)) and len(pk[0].ids) == 500


# ------------------------------------------------------------------------------------------------------
# Scoring
# ------------------------------------------------------------------------------------------------------


class _Stub(nn.Module):
    """A 'model' whose generate reads the prompt and answers: the asked needle's value (`copy`), a
    distractor's (`distract`) or a fixed wrong number. Records what it was called with."""

    def __init__(self, tok, mode: str, max_positions: int = 4096):
        super().__init__()
        self.tok, self.mode = tok, mode
        self.w = nn.Parameter(torch.zeros(1))
        self.config = type("Cfg", (), {"max_position_embeddings": max_positions})()
        self.calls: list[dict] = []

    def generate(self, input_ids, attention_mask, generation_config):
        self.calls.append({"mask": attention_mask.clone(), "do_sample": generation_config.do_sample,
                           "max_new": generation_config.max_new_tokens})
        text = self.tok.decode(input_ids[0].tolist())
        asked = re.search(r"special magic number for (\w+) mentioned", text)
        if self.mode == "wrong":
            value = "31415"
        elif asked is None:  # passkey
            value = re.search(r"The pass key is (\d+)\.", text).group(1)
        else:
            pairs = re.findall(r"magic numbers for (\w+) is: (\d+)\.", text)
            pick = [v for k, v in pairs if (k == asked.group(1)) == (self.mode == "copy")]
            value = pick[0]
        new = torch.tensor([_enc(self.tok, " " + value + ".")])
        return torch.cat([input_ids, new], dim=1)


@pytest.mark.parametrize("task", L.LONGCTX_TASKS)
def test_a_model_that_copies_the_key_scores_one_and_one_that_cannot_scores_zero(toks, task):
    tok = toks["bpe_bos"]
    items = L.retrieval_items(task, tok, 700, 5, seed=0)
    copier = _Stub(tok, "copy")
    r = L.retrieval_score(copier, tok, items)
    assert (r.acc, r.n, r.correct, r.stderr) == (1.0, 5, 5, 0.0)
    assert r.name == f"{task}@700" and sum(b["n"] for b in r.by_depth) == 5
    assert all(c["mask"].shape == (1, 700) and bool(c["mask"].all()) and c["do_sample"] is False for c in copier.calls)
    assert all(c["max_new"] >= len(_enc(tok, " " + it.answer)) for c, it in zip(copier.calls, items, strict=True))
    wrong = L.retrieval_score(_Stub(tok, "wrong"), tok, items)
    assert (wrong.acc, wrong.correct, wrong.stderr) == (0.0, 0, 0.0)
    if task == "niah":  # answering another key's number is wrong: the question's key matters
        assert L.retrieval_score(_Stub(tok, "distract"), tok, items).acc == 0.0


def test_stderr_is_binomial_and_answers_must_be_whole_numbers(toks):
    tok = toks["bpe"]
    items = L.passkey_items(tok, 300, 4, seed=0)
    rows = [{"depth": it.depth, "correct": i < 3} for i, it in enumerate(items)]
    assert [b["acc"] for b in L.depth_bins(rows)] == [1.0, 1.0, 1.0, 0.0]
    assert L._answer_in("12345", " 12345.") and not L._answer_in("12345", " 123456") \
        and not L._answer_in("12345", " 912345")
    r = L.RetrievalScore("passkey", 300, 0.75, 4, 3, math.sqrt(0.75 * 0.25 / 4))
    assert r.to_dict()["stderr"] == pytest.approx(0.2165, abs=1e-4)


def test_real_generate_on_tiny_and_pruned_models(toks):
    tok = toks["bpe"]
    items = L.niah_items(tok, 320, 3, seed=0)
    model = tiny_model("llama", vocab_size=len(tok), max_position_embeddings=512)  # eager attention
    r = L.retrieval_score(model, tok, items)
    assert r.n == 3 and r.acc == 0.0 and all(isinstance(i["output"], str) for i in r.items)
    assert model.config._attn_implementation == "eager"  # switched to sdpa for the run, then back
    pruned = prune(tiny_model("qwen2", vocab_size=len(tok), max_position_embeddings=512), [5, 4], [0.5, 0.0])
    r2 = L.retrieval_score(pruned, tok, L.passkey_items(tok, 200, 2, seed=0))
    assert r2.n == 2 and r2.acc == 0.0


def _counting(model):
    """`model` with a count of the tokens its forward passes compute (prefills and decode steps)."""
    model.tokens_run = 0

    def hook(_module, _args, kwargs):
        model.tokens_run += kwargs["input_ids"].shape[1]
    model.register_forward_pre_hook(hook, with_kwargs=True)
    return model


@pytest.mark.parametrize("case", ["llama", "qwen2-layer0-pruned", "llama-windows", "gemma3"])
def test_shared_prefixes_are_computed_once_with_the_same_outputs(toks, case):
    """Passkey prompts share their filler up to the needle: scored together, that prefix runs once and each
    item continues from a copy of its cache (bypassed layers' and window layers' slots included: a copied
    slot answers for the copy, not the original), and every output equals the item's scored alone."""
    tok = toks["bpe"]
    family = case.split("-")[0]
    model = tiny_model(family, vocab_size=len(tok), max_position_embeddings=1024)
    if case == "qwen2-layer0-pruned":
        prune(model, [0, 4], [0.5, 0.0])  # layer 0 bypassed: its slot answers the cache's length queries
    elif case == "llama-windows":
        prune(model, [], [], windows={0: 40, 3: 100}, sinks=4)  # capped caches: copied, never cropped
    items = L.passkey_items(tok, 600, 5, seed=3)
    alone = [L.retrieval_score(model, tok, [it]).items[0]["output"] for it in items]
    _counting(model)
    seen: list[int] = []
    together = L.retrieval_score(model, tok, items, on_item=lambda i, row, s: seen.append(i))
    assert [row["output"] for row in together.items] == alone  # in the items' order, token for token
    assert sorted(seen) == list(range(5))  # each item reported once, as it is scored
    _, shared = L._shared_prefixes(items)
    reused = sum(x for x in shared if x >= L.SHARED_PREFIX_MIN) - max(shared)  # each shared prefix once
    assert reused > 600  # of 3,000 prompt tokens
    assert model.tokens_run <= sum(len(it.ids) + it.max_new_tokens for it in items) - reused


# ------------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------------


def test_context_longer_than_the_model_names_both_numbers(toks):
    tok = toks["bpe"]
    with pytest.raises(ValueError, match=r"`context=9000` is longer than the model's maximum 8192 tokens"):
        L.retrieval_items("passkey", tok, 9000, 2, max_context=8192)
    items = L.passkey_items(tok, 300, 1)
    model = tiny_model("llama", vocab_size=len(tok), max_position_embeddings=256)
    with pytest.raises(ValueError, match=r"`context=300`.*maximum 256 tokens") as e:
        L.retrieval_score(model, tok, items)
    assert "--" not in str(e.value)
    assert L.max_positions({"max_position_embeddings": 8192}) == 8192 and L.max_positions({}) is None


def test_too_short_filler_names_what_it_has_and_needs(toks, tmp_path):
    tok = toks["bpe"]
    short = "A short story. It ends soon. The end."
    have = len(_enc(tok, short))
    with pytest.raises(ValueError, match=r"`filler`.*has (\d+) tokens; `context=800` needs (\d+)") as e:
        L.niah_items(tok, 800, 2, filler=short)
    has, needs = map(int, re.search(r"has (\d+) tokens; `context=800` needs (\d+)", str(e.value)).groups())
    assert has == have and needs > has and needs > 800 // 2  # the rest: instructions and needles
    with pytest.raises(FileNotFoundError, match="`filler="):
        L.niah_items(tok, 800, 2, filler=str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="too short for a passkey prompt"):
        L.passkey_items(tok, 40, 1)


def test_unknown_task_and_bad_arguments(toks):
    tok = toks["bpe"]
    with pytest.raises(ValueError, match=r"Unknown long-context task 'pasky'.*passkey, niah"):
        L.retrieval_items("pasky", tok, 500)
    assert L.parse_contexts("1024, 4k,1024") == [1024, 4096] and L.parse_contexts(2048) == [2048]
    with pytest.raises(ValueError, match="`context="):
        L.parse_contexts("1024,lots")
    with pytest.raises(ValueError, match="`n=0`"):
        L.passkey_items(tok, 500, 0)
    with pytest.raises(ValueError, match="`needles=0`"):
        L.niah_items(tok, 500, 2, needles=0)
    with pytest.raises(ValueError, match="mixes"):
        L.retrieval_score(_Stub(tok, "copy"), tok, L.passkey_items(tok, 300, 1) + L.passkey_items(tok, 400, 1))


# ------------------------------------------------------------------------------------------------------
# Loss by position
# ------------------------------------------------------------------------------------------------------


def test_position_losses_match_full_logits_and_perplexity():
    torch.manual_seed(0)
    model = tiny_model("llama", max_position_embeddings=2048)  # built with eager attention
    windows = torch.randint(0, 128, (2, 1300))
    seen = []
    hook = model.model.layers[0].register_forward_pre_hook(lambda m, a: seen.append(model.config._attn_implementation))
    r = L.position_losses(model, windows, chunk_tokens=500)
    hook.remove()
    assert seen == ["sdpa", "sdpa"] and model.config._attn_implementation == "eager"
    assert [b["bucket"] for b in r.buckets] == ["0-512", "512-1k", "1k-2k"]  # 2k-4k, 4k-8k beyond S: left out
    assert [b["tokens"] for b in r.buckets] == [2 * 511, 2 * 512, 2 * (1300 - 1024)]
    with torch.no_grad():
        logits = model(windows).logits.float()
    per_tok = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), windows[:, 1:].reshape(-1),
                                                reduction="none").view(2, -1)
    assert torch.allclose(torch.tensor(r.curve), per_tok.mean(0).double().float(), atol=1e-4)
    for b in r.buckets:
        assert b["nll"] == pytest.approx(float(per_tok[:, b["start"] - 1 if b["start"] else 0:b["end"] - 1].mean()),
                                         abs=1e-4)
    assert r.ppl == pytest.approx(perplexity(model, windows).ppl, rel=1e-4)
    assert r.tokens == 2 * 1299 and r.to_dict()["seq_len"] == 1300 and "curve" not in r.to_dict()


def test_position_losses_on_pruned_and_softcapped_models():
    windows = torch.randint(0, 128, (1, 600))
    pruned = prune(tiny_model("mistral", max_position_embeddings=1024), [5, 3], [0.7, 0.0])
    r = L.position_losses(pruned, windows)
    assert r.ppl == pytest.approx(perplexity(pruned, windows).ppl, rel=1e-4)
    gemma = tiny_model("gemma2", max_position_embeddings=1024)  # soft-capped attention: stays eager
    g = L.position_losses(gemma, windows)
    assert g.ppl == pytest.approx(perplexity(gemma, windows).ppl, rel=1e-4)
    assert gemma.config._attn_implementation == "eager"


def test_loss_plot_and_table(tmp_path):
    from harp.report.longctx import plot_position_losses, retrieval_markdown, smooth_curve

    model = tiny_model("llama", max_position_embeddings=1024)
    windows = torch.randint(0, 128, (1, 700))
    r = L.position_losses(model, windows)
    xs, ys = smooth_curve(r.curve, points=16)
    assert xs == sorted(xs) and len(xs) <= 17 and min(ys) >= min(r.curve) - 1e-9
    png = plot_position_losses({"original": r, "from json": r.to_dict()}, tmp_path / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # beside the original, a second panel of the loss over the original's (a taller figure); alone, one panel
    alone = plot_position_losses({"pruned": r}, tmp_path / "alone.png")
    buckets = {k: v for k, v in r.to_dict().items() if k not in ("curve", "curve_points")}  # an old JSON
    with_buckets = plot_position_losses({"original": r, "buckets only": buckets}, tmp_path / "b.png")

    def height(p):
        return int.from_bytes(p.read_bytes()[20:24], "big")  # the PNG header's IHDR height

    assert height(png) > 1.4 * height(alone) and height(with_buckets) == height(png)
    md = retrieval_markdown({"original": {"passkey@1024": {"acc": 0.9, "stderr": 0.04, "n": 50}}, "harp": {}})
    assert "| original | 0.90 ±0.04 (50) |" in md and "| harp | – |" in md
    part = {"acc": 0.5, "stderr": 0.29, "n": 3, "planned": 30}  # a cell measured in part so far
    assert "| harp | 0.50 ±0.29 (3 of 30) |" in retrieval_markdown({"harp": {"passkey@4096": part}})


def test_score_from_rows_joins_parts_of_a_run():
    rows = [{"depth": d, "answer": "1", "output": "1" if ok else "2", "correct": ok}
            for d, ok in [(0.0, True), (0.25, False), (0.5, True), (1.0, True)]]
    r = L.RetrievalScore.from_rows("passkey", 4096, rows, seconds=3.0)
    assert (r.acc, r.n, r.correct, r.seconds, r.name) == (0.75, 4, 3, 3.0, "passkey@4096")
    assert r.stderr == pytest.approx((0.75 * 0.25 / 4) ** 0.5)
    assert [b["n"] for b in r.by_depth] == [1, 1, 1, 1] and r.by_depth[1]["acc"] == 0.0
    with pytest.raises(ValueError, match="no scored items"):
        L.RetrievalScore.from_rows("passkey", 4096, [])


# ------------------------------------------------------------------------------------------------------
# harp eval
# ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, toks):
    path = tmp_path_factory.mktemp("lc") / "tiny"
    tiny_model("llama", vocab_size=len(toks["bpe"]), max_position_embeddings=2048).save_pretrained(path)
    toks["bpe"].save_pretrained(path)
    return path


def test_eval_command_long_context_tasks_and_loss_by_position(model_dir, tmp_path):
    import json

    from typer.testing import CliRunner

    from harp.cli import get_app

    out, png = tmp_path / "scores.json", tmp_path / "loss.png"
    args = ["eval", str(model_dir), "--tasks", "wikitext,passkey,niah", "--context", "400,600", "--limit", "2",
            "--eval", "tinyshakespeare", "--eval-tokens", "2400", "--eval-seq-len", "1200", "--json", str(out),
            "--plot", str(png)]
    r = CliRunner().invoke(get_app(), args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    d = json.loads(out.read_text())
    assert list(d["tasks"]) == ["passkey@400", "passkey@600", "niah@400", "niah@600"]
    for v in d["tasks"].values():
        assert v["n"] == 2 and 0.0 <= v["acc"] <= 1.0
        assert v["stderr"] == pytest.approx(math.sqrt(v["acc"] * (1 - v["acc"]) / 2))
    assert list(d["scores"]) == ["wikitext", "passkey@400", "passkey@600", "niah@400", "niah@600"]
    lbp = d["loss_by_position"]
    assert [b["bucket"] for b in lbp["buckets"]] == ["0-512", "512-1k", "1k-2k"] and lbp["seq_len"] == 1200
    assert lbp["ppl"] == pytest.approx(d["scores"]["wikitext"]["value"])
    assert png.read_bytes()[:4] == b"\x89PNG" and "passkey@600" in r.output and "512-1k" in r.output


def test_eval_command_checks_contexts_and_filler_before_loading(model_dir, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import harp.model.load
    from harp.cli import get_app

    def no_load(*a, **k):
        raise AssertionError("weights loaded before the arguments were checked")

    monkeypatch.setattr(harp.model.load, "load_model", no_load)
    r = CliRunner().invoke(get_app(), ["eval", str(model_dir), "--tasks", "passkey", "--context", "1024,4096"])
    assert r.exit_code != 0
    assert "--context 4096 is longer than the model's maximum 2048 tokens" in str(r.exception)
    r = CliRunner().invoke(get_app(), ["eval", str(model_dir), "--tasks", "niah", "--filler", str(tmp_path / "no.txt")])
    assert r.exit_code != 0 and "--filler" in str(r.exception) and "no such file" in str(r.exception)
    r = CliRunner().invoke(get_app(), ["eval", str(model_dir), "--tasks", "passkey", "--context", "lots"])
    assert r.exit_code != 0 and "Bad --context" in str(r.exception)


def test_long_context_task_names_resolve():
    from harp.engine.evaluate import resolve_tasks, valid_task_help

    assert [(s.name, s.kind) for s in resolve_tasks("passkey,NIAH,wikitext")] == [
        ("passkey", "longctx"), ("niah", "longctx"), ("wikitext", "perplexity")]
    assert "passkey, niah" in valid_task_help()
