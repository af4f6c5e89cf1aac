"""Windows start the way the model's tokenizer starts a text: BOS first where it adds one."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import tiny_folder, tiny_tokenizer

import harp
from harp.engine.evaluate import perplexity_windows
from harp.engine.text import bos_token, calibration_windows, evaluation_windows, load_text, tokenize


@pytest.fixture(scope="module")
def toks():
    return tiny_tokenizer(bos=False), tiny_tokenizer(bos=True)


def test_bos_token_follows_the_tokenizer(toks):
    plain, with_bos = toks
    assert plain.bos_token_id == with_bos.bos_token_id == 1  # both *have* a BOS token ...
    assert bos_token(plain) is None  # ... but only one puts it in front of a text
    assert bos_token(with_bos) == 1
    assert with_bos("hello")["input_ids"][0] == 1


def test_windows_start_with_bos_and_keep_their_shape():
    ids = torch.arange(10, 1010)
    cal = calibration_windows(ids, 4, 33, seed=1, bos=1)
    assert cal.shape == (4, 33)
    assert (cal[:, 0] == 1).all()
    for row in cal:  # 32 consecutive text tokens after BOS, aligned to 32-token chunks of the text
        text = row[1:]
        assert (text.diff() == 1).all() and (int(text[0]) - 10) % 32 == 0
    ev = evaluation_windows(ids, 33, 33 * 3, bos=1)
    assert ev.shape == (3, 33) and (ev[:, 0] == 1).all()
    assert torch.equal(ev[:, 1:].reshape(-1), ids[: 3 * 32])  # consecutive text, nothing skipped
    # without a BOS the windows are exactly the text, as before
    assert torch.equal(evaluation_windows(ids, 32, 96), ids[:96].view(3, 32))
    assert calibration_windows(ids, 2, 2, bos=1)[:, 0].tolist() == [1, 1]  # BOS + one text token: one target
    # skip = n with the same seed: held-out windows, disjoint from the default ones
    fit_w, held = calibration_windows(ids, 8, 32, seed=3), calibration_windows(ids, 4, 32, seed=3, skip=8)
    assert not {tuple(r) for r in fit_w.tolist()} & {tuple(r) for r in held.tolist()}
    both = {tuple(r) for r in calibration_windows(ids, 12, 32, seed=3).tolist()}
    assert both == {tuple(r) for r in fit_w.tolist()} | {tuple(r) for r in held.tolist()}
    with pytest.raises(ValueError, match="were asked for"):
        calibration_windows(ids, 30, 32, skip=10)


def test_bos_windows_through_the_library(toks):
    plain, with_bos = toks
    text = load_text("wikitext2-valid")
    a = calibration_windows(tokenize(with_bos, text), 2, 64, bos=bos_token(with_bos))
    b = calibration_windows(tokenize(plain, text), 2, 64, bos=bos_token(plain))
    assert (a[:, 0] == 1).all() and not (b[:, 0] == 1).any()
    ev, _ = perplexity_windows(with_bos, None, 256, 64)
    assert ev.shape == (4, 64) and (ev[:, 0] == 1).all()
    ev, _ = perplexity_windows(plain, None, 256, 64)
    assert not (ev[:, 0] == 1).any()


@pytest.mark.parametrize("bos", [False, True])
def test_prune_records_and_uses_bos(tmp_path, bos):
    folder = tiny_folder(tmp_path / "m", bos=bos, num_hidden_layers=4)
    out = tmp_path / "out"
    rep = harp.run_prune(harp.PruneSettings(model=str(folder), k=1, alphas=[0.5], calib_windows=2, seq_len=32,
                                            eval_tokens=128, eval_seq_len=64, references=False, out=str(out),
                                            progress=False), log=lambda *a: None)
    recipe = json.loads((out / "harp_recipe.json").read_text())
    assert recipe["calibration"]["bos_token"] == (1 if bos else None)
    assert recipe["evaluation"]["bos_token"] == (1 if bos else None)
    assert rep.ppl[rep.method] > 0
