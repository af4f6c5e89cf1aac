"""`harp analyze`: Sim(H), attention diagonality, and the command's outputs."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from tiny import VOCAB, byte_tokenizer, tiny_model
from typer.testing import CliRunner

import harp
from harp.cli import get_app
from harp.methods.analyze import analyze
from harp.methods.scores import pairwise_similarity_sums
from harp.modeling import decoder_layers
from harp.report.analyze import analyze_figure, plot_analyze


def _ids(n=3, s=16, seed=0, vocab=128):
    return torch.randint(0, vocab, (n, s), generator=torch.Generator().manual_seed(seed))


def _brute_sim(h):
    """Mean over windows of the mean cos(h_i, h_j) over all ordered pairs i != j, by the S x S matrix."""
    vals = []
    for w in h.double():
        c = F.cosine_similarity(w[:, None, :], w[None, :, :], dim=-1)
        n = w.shape[0]
        vals.append(float((c.sum() - c.diagonal().sum()) / (n * (n - 1))))
    return sum(vals) / len(vals)


def test_pairwise_similarity_matches_the_full_matrix():
    h = torch.randn(3, 11, 7)
    assert float(pairwise_similarity_sums(h).mean()) == pytest.approx(_brute_sim(h), abs=1e-12)


def test_layer_with_identical_tokens_has_sim_one():
    model = tiny_model("llama", attn="eager")
    const = torch.randn(64)

    def same_for_every_token(mod, args, out):  # layer 2 outputs one vector at every position
        h = out[0] if isinstance(out, tuple) else out
        return const.expand_as(h).clone()

    handle = decoder_layers(model)[2].register_forward_hook(same_for_every_token)
    try:
        res = analyze(model, _ids())
    finally:
        handle.remove()
    sims = [r["sim"] for r in res.layers]
    assert sims[2] == pytest.approx(1.0, abs=1e-9)
    assert sims[1] < 0.9  # below it, tokens still differ
    # above it, attention averages identical values: every layer stays at 1
    assert all(s == pytest.approx(1.0, abs=1e-6) for s in sims[3:])


def test_sim_and_diagonality_against_direct_computation():
    model = tiny_model("qwen2", attn="eager")
    ids = _ids(seed=1)
    res = analyze(model, ids, batch_size=2)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True, output_attentions=True)
    n = len(decoder_layers(model))
    # hidden_states[j + 1] is the output of layer j (the last one after the final norm: skip it)
    for j in range(n - 1):
        assert res.layers[j]["sim"] == pytest.approx(_brute_sim(out.hidden_states[j + 1]), abs=1e-6)
    assert res.embedding_sim == pytest.approx(_brute_sim(out.hidden_states[0]), abs=1e-6)
    for j, a in enumerate(out.attentions):
        diag = torch.diagonal(a.double(), dim1=-2, dim2=-1)[..., 1:].mean()
        assert res.layers[j]["attn_self"] == pytest.approx(float(diag), abs=1e-6)
        assert res.layers[j]["attn_first"] == pytest.approx(float(a.double()[..., 1:, 0].mean()), abs=1e-6)


def test_pruned_layers_are_diagonal_and_sdpa_models_are_switched_back():
    model = tiny_model("llama", attn="sdpa")
    harp.prune(model, [5, 4], [0.6, 0.0])
    res = analyze(model, _ids(seed=2))
    assert res.layers[5]["attn_self"] == 1.0 and res.layers[5]["attn_first"] == 0.0
    assert res.layers[4]["attn_self"] is None and res.layers[4]["alpha"] == 0.0
    assert res.layers[4]["attn_cos"] == pytest.approx(1.0)  # a removed sub-layer changes nothing
    assert 0.0 < res.layers[0]["attn_self"] < 1.0
    assert model.config._attn_implementation == "sdpa"


def test_analyze_command_writes_table_json_plot_and_refuses_to_clobber(tmp_path):
    model = tiny_model("llama", vocab_size=VOCAB)
    src = tmp_path / "tiny"
    model.save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "an"
    args = ["analyze", str(src), "--text", str(text), "--windows", "2", "--seq-len", "32", "--out", str(out),
            "--highlight-top", "2"]
    r = CliRunner().invoke(get_app(), args)
    assert r.exit_code == 0, r.output
    data = json.loads((out / "analyze.json").read_text())
    assert len(data["layers"]) == 6 and all(0 <= row["sim"] <= 1 for row in data["layers"])
    assert (out / "analyze.png").stat().st_size > 5000
    assert "| layer | Sim(H)" in (out / "analyze.md").read_text()
    assert "Sim(H)" in r.output
    again = CliRunner().invoke(get_app(), args)
    assert again.exit_code != 0 and isinstance(again.exception, FileExistsError)


def test_plot_marks_pruned_layers(tmp_path):
    model = tiny_model("gemma2", attn="eager")
    harp.prune(model, [5], [0.3])
    res = analyze(model, _ids(seed=3))
    p = plot_analyze(res, tmp_path / "a.png", highlight_top=1)
    assert p.stat().st_size > 5000


def test_plot_labels_layers_with_integer_ticks():
    import matplotlib.pyplot as plt

    # 4 layers: matplotlib's default locator would put ticks at 0.5, 1.5, ... (18 layers: 2.5, 7.5, ...)
    res = analyze(tiny_model("llama", attn="eager", num_hidden_layers=4), _ids(seed=4))
    fig = analyze_figure(res)
    fig.canvas.draw()
    try:
        for ax in fig.axes:
            ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks
    finally:
        plt.close(fig)


@pytest.mark.slow
def test_smollm2_high_layers_are_more_over_smoothed():
    """The paper's evidence on the real default model: token states grow more alike with depth."""
    from harp.engine.text import calibration_windows, load_text, tokenize
    from harp.model.load import load_model

    model, tok = load_model(None, attn_implementation="eager")
    w = calibration_windows(tokenize(tok, load_text(None)), 2, 128, 0)
    res = analyze(model, w, name="smollm2")
    sims = [r["sim"] for r in res.layers]
    assert len(sims) == 30
    top = sum(sims[-6:]) / 6
    middle = sum(sims[2:11]) / 9
    assert top > middle + 0.05, (top, middle)
    assert all(r["attn_self"] is not None and 0 < r["attn_self"] < 1 for r in res.layers)
