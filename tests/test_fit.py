"""The closed-form refit (harp.methods.fit): recovery, optimality, accumulation, every family, save/reload, decode."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from tiny import FAMILIES, tiny_model

import harp
from harp.methods.fit import FitStats, check_fit_method, fit_layers, solve_map
from harp.methods.search import DEFAULT_GRID
from harp.model.accounting import output_cache
from harp.model.prune import prune, temporarily_pruned
from harp.modeling import attention_geometry, cache_kwarg, decoder_layers, fold_output

WINDOWS = torch.randint(0, 128, (8, 40), generator=torch.Generator().manual_seed(0))


def _direct(model, windows, idx, ridge=0.0, bias=False):
    """A direct solve from all activations at once (the oracle the accumulated statistics must match)."""
    attn = decoder_layers(model)[idx].self_attn
    vs, as_ = [], []

    def hook(mod, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        vs.append(mod.v_proj(x).double().reshape(-1, mod.v_proj.out_features))
        as_.append(out[0].double().reshape(-1, out[0].shape[-1]))

    h = attn.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(windows)
    finally:
        h.remove()
    v, a = torch.cat(vs), torch.cat(as_)
    if bias:
        v = torch.cat([v, torch.ones(len(v), 1, dtype=v.dtype)], 1)
    g = v.T @ v
    lam = ridge * float(g.diagonal().mean())
    return torch.linalg.solve(g + lam * torch.eye(len(g), dtype=g.dtype), v.T @ a).T, v, a


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_fit_recovers_a_linear_teacher(family):
    """A layer pruned with alpha = 1 computes exactly W_O R V: the fit finds W_O R again."""
    model = tiny_model(family)
    g = attention_geometry(model.config)
    want = fold_output(decoder_layers(model)[3].self_attn.o_proj.weight, g["heads"], g["kv_heads"], g["head_dim"])
    teacher = prune(copy.deepcopy(model), [3], [1.0])
    del teacher.config.harp  # it is the original model as far as the fit is concerned
    res = fit_layers(teacher, WINDOWS, [3], ridge=0.0, prior="zero")
    assert torch.allclose(res.fits[3].map.weight, want, atol=1e-4, rtol=1e-4)
    assert res.fits[3].calib_error < 1e-8
    assert res.fits[3].alpha == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fit_beats_every_alpha_on_the_grid(family):
    """Every alpha·W_O R is a feasible map, so the fit's reconstruction error is at most the best alpha's."""
    model = tiny_model(family)
    res = fit_layers(model, WINDOWS, [0, 3, 5], ridge=0.0, prior="zero")
    for idx, f in res.fits.items():
        _, v, a = _direct(model, WINDOWS, idx, bias=model.model.layers[idx].self_attn.o_proj.bias is not None)
        g = attention_geometry(model.config)
        w0 = fold_output(model.model.layers[idx].self_attn.o_proj.weight, g["heads"], g["kv_heads"], g["head_dim"])
        if f.map.bias is not None:
            w0 = torch.cat([w0, model.model.layers[idx].self_attn.o_proj.bias.double()[:, None]], 1)
        best_alpha = min(float(((a - al * v @ w0.T.detach()) ** 2).sum()) for al in DEFAULT_GRID) / float((a * a).sum())
        assert f.calib_error <= best_alpha + 1e-9
        assert f.calib_error <= f.alpha_error + 1e-9  # and than the unconstrained best scalar


@pytest.mark.parametrize("family", ["llama", "qwen2", "llama_mha", "gemma3"])
def test_accumulated_fit_equals_one_direct_solve(family):
    model = tiny_model(family)
    has_bias = model.model.layers[2].self_attn.o_proj.bias is not None
    for ridge in (0.0, 1e-2):
        res = fit_layers(model, WINDOWS, [2], ridge=ridge, prior="zero", batch_size=3)
        want, _, _ = _direct(model, WINDOWS, 2, ridge, bias=has_bias)
        got = res.fits[2].map
        full = got.weight if got.bias is None else torch.cat([got.weight, got.bias[:, None]], 1)
        assert torch.allclose(full, want, atol=1e-7, rtol=1e-6)
        assert (got.bias is not None) == has_bias  # an output bias is fitted exactly when o_proj has one


def test_fold_statistics_add_up():
    """The per-fold statistics sum to the statistics of all windows (cross-validation uses differences)."""
    model = tiny_model("llama")
    one = fit_layers(model, WINDOWS, [4], ridge=1e-3, prior="zero", folds=1)
    four = fit_layers(model, WINDOWS, [4], ridge=1e-3, prior="zero", folds=4)
    assert torch.allclose(one.fits[4].map.weight, four.fits[4].map.weight, atol=1e-9)
    assert four.folds == 4 and one.folds == 1


def test_auto_ridge_is_chosen_by_held_out_windows():
    model = tiny_model("llama")
    res = fit_layers(model, WINDOWS, [1, 4], ridge="auto", prior="auto")
    for f in res.fits.values():
        assert f.heldout_error is not None and f.heldout_error >= f.calib_error - 1e-12
        assert f.prior in ("zero", "alpha")
    # with a single fixed choice there is nothing to cross-validate
    assert fit_layers(model, WINDOWS, [1], ridge=1e-3, prior="zero").fits[1].heldout_error is None


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_fitted_checkpoint_reloads_bit_exactly_and_decodes(tmp_path, family):
    model = tiny_model(family)
    layers = [0, 3, 5]
    res = fit_layers(model, WINDOWS, layers, ridge=1e-3, prior="alpha")
    prune(model, layers, [1.0, 0.7, 1.0], res.maps)
    harp.save(model, tmp_path / "m")
    back = harp.load(tmp_path / "m")
    for (n, p), (n2, p2) in zip(model.state_dict().items(), back.state_dict().items(), strict=True):
        assert n == n2 and torch.equal(p, p2), n
    ids = WINDOWS[:1, :12]
    with torch.no_grad():
        full = back(ids).logits[0, -1]
        out = back(ids[:, :-1], use_cache=True)
        step = back(ids[:, -1:], use_cache=True, **{cache_kwarg(back): output_cache(out)}).logits[0, -1]
    assert torch.allclose(full, step, atol=1e-5)


def test_fitted_map_improves_calibration_loss_over_harp_alpha():
    """On the calibration windows the refit model's loss is lower than HARP's searched alphas' (tiny model)."""
    model = tiny_model("llama")
    layers = [5, 4]
    s = harp.search_alphas(model, WINDOWS, layers)
    harp_ppl = _ppl_with(model, layers, s.alphas, None)
    res = fit_layers(model, WINDOWS, layers, ridge=1e-4, prior="zero")
    assert _ppl_with(model, layers, [1.0, 1.0], res.maps) < harp_ppl


def _ppl_with(model, layers, alphas, maps):
    with temporarily_pruned(model, layers, alphas, maps):
        return harp.perplexity(model, WINDOWS).ppl


def test_scale_search_on_fitted_maps():
    """harp.search_alphas(maps=...) scales the fitted map; alpha 1 reproduces the plain fit."""
    model = tiny_model("qwen2")
    res = fit_layers(model, WINDOWS, [5, 4], ridge=1e-3, prior="zero")
    s = harp.search_alphas(model, WINDOWS, [5, 4], grid=[0.0, 1.0], maps=res.maps)
    assert all(a in (0.0, 1.0) for a in s.alphas)
    with temporarily_pruned(model, [5, 4], [1.0, 1.0], res.maps):
        at_one = harp.perplexity(model, WINDOWS).ppl
    assert min(e["ppl"] for e in s.log if e["layer"] == 5 and e["alpha"] == 1.0) >= at_one - 10  # sanity
    assert s.final_ppl <= max(e["ppl"] for e in s.log if e["layer"] == 4)


def test_bad_input():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="Unknown fit"):
        check_fit_method("magic")
    with pytest.raises(ValueError, match="Ridge"):
        fit_layers(model, WINDOWS, [1], ridge=-1.0)
    with pytest.raises(ValueError, match="prior"):
        fit_layers(model, WINDOWS, [1], prior="ones")
    with pytest.raises(ValueError, match="out of range"):
        fit_layers(model, WINDOWS, [9])
    with pytest.raises(ValueError, match="cross-validation"):
        fit_layers(model, WINDOWS[:1], [1], ridge="auto")
    pruned = prune(copy.deepcopy(model), [5], [0.5])
    with pytest.raises(ValueError, match="already HARP-pruned"):
        fit_layers(pruned, WINDOWS, [1])
    # fewer tokens than unknowns per output: a warning that says how many are needed
    with pytest.warns(UserWarning, match="unknowns per output"):
        fit_layers(model, WINDOWS[:1, :10], [1], ridge=1e-3, prior="zero")


def test_singular_gram_stays_solvable():
    g = torch.zeros(4, 4, dtype=torch.float64)
    g[0, 0] = 1.0
    s = FitStats(g, torch.ones(3, 4, dtype=torch.float64), 1.0, 10)
    w = solve_map(s, 1e-3, None)
    assert torch.isfinite(w).all()
    w0 = solve_map(s, 0.0, None)  # no ridge: the minimum-norm solution, still finite
    assert torch.isfinite(w0).all() and torch.allclose(w0[:, 1:], torch.zeros(3, 3, dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_layers(tiny_model("llama"), WINDOWS, [2], ridge=1e-3, prior="zero")  # healthy data: no warning


# ------------------------------------------------------------------------------------------------
# harp prune --fit / --select auto, through harp.run_prune on a tiny folder
# ------------------------------------------------------------------------------------------------


def _settings(folder, out=None, **kw):
    base = dict(model=str(folder), k=2, calib_windows=4, seq_len=32, eval_tokens=256, eval_seq_len=64,
                progress=False, out=None if out is None else str(out))
    return harp.PruneSettings(**{**base, **kw})


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from tiny import tiny_folder

    return tiny_folder(tmp_path_factory.mktemp("fit") / "m", "qwen2", num_hidden_layers=6)


def test_run_prune_fit_lstsq_saves_the_refit_and_reports_both(folder, tmp_path):
    import json

    rep = harp.run_prune(_settings(folder, tmp_path / "out", fit="lstsq"), log=lambda *a: None)
    assert rep.method == "harp-ls" and rep.alphas == [1.0, 1.0]
    assert {"original", "harp", "harp-ls", "alpha=1", "alpha=0"} <= set(rep.ppl)
    assert rep.fit["used"] and len(rep.fit["per_layer"]) == 2
    recipe = json.loads((tmp_path / "out" / "harp_recipe.json").read_text())
    assert recipe["method"] == "harp-ls" and recipe["fit"]["method"] == "lstsq"
    back = harp.load(tmp_path / "out")
    ev = harp.evaluation_windows(harp.tokenize(back_tok(tmp_path / "out"), harp.load_text("wikitext2-raw-test")), 64,
                                 256)
    assert harp.perplexity(back, ev).ppl == pytest.approx(rep.ppl["harp-ls"], rel=1e-5)


def back_tok(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def test_run_prune_fit_none_is_the_papers_harp(folder):
    rep = harp.run_prune(_settings(folder, fit="none"), log=lambda *a: None)
    ref = harp.run_prune(_settings(folder, fit="none", references=False), log=lambda *a: None)
    assert rep.method == "harp" and rep.alphas == ref.alphas == rep.search["alphas"]
    assert rep.ppl["harp"] == pytest.approx(ref.ppl["harp"], rel=1e-6)
    assert "harp-ls" in rep.ppl and "harp-ls" not in ref.ppl


def test_run_prune_select_auto_picks_the_lower_calibration_perplexity(folder):
    rep = harp.run_prune(_settings(folder, select="auto", references=False), log=lambda *a: None)
    cands = rep.selection["candidates"]
    picked = rep.selection["picked"]
    assert picked == min(cands, key=lambda r: cands[r]["calib_ppl"])
    assert rep.selection["judged_on"] == "2 held-out calibration windows"  # not the windows the fit saw
    assert sorted(rep.layers) == cands[picked]["layers"]


def test_run_prune_streamed_fit_equals_in_memory(folder):
    a = harp.run_prune(_settings(folder, references=False), log=lambda *a: None)
    b = harp.run_prune(_settings(folder, references=False, streamed=True), log=lambda *a: None)
    assert b.ppl["harp-ls"] == pytest.approx(a.ppl["harp-ls"], rel=1e-6)
    assert [f["ridge"] for f in a.fit["per_layer"]] == [f["ridge"] for f in b.fit["per_layer"]]


def test_run_prune_rejects_bad_fit_settings_before_loading(folder):
    def boom(*a, **k):
        raise AssertionError("the model was loaded")

    for kw, msg in ((dict(fit="magic"), "Unknown fit"), (dict(ridge=-1.0), "Ridge"), (dict(fit_prior="x"), "prior")):
        with pytest.raises(ValueError, match=msg):
            harp.run_prune(_settings(folder, **kw), log=lambda *a: None, loader=boom)


def test_compare_methods_harp_ls_and_harp_any_ls():
    """harp compare's refit rows: the Selector's plans are the refit of the top / Attention Drop layers,
    fits are shared across k (each layer is fitted on the original model alone), and `applied` prunes
    with the fitted maps."""
    from harp.methods.scores import attention_drop_scores, pick
    from harp.methods.selector import Selector, applied

    model = tiny_model("llama")
    sel = Selector(model, WINDOWS)
    p4 = sel.select("harp-ls", 4)
    p2 = sel.select("harp-ls", 2)
    assert p4.layers == [5, 4, 3, 2] and p2.layers == [5, 4] and p4.alphas == [1.0] * 4
    assert torch.equal(p2.maps[5].weight, p4.maps[5].weight)  # the layer-5 fit is reused, not redone
    direct = fit_layers(model, WINDOWS, [5, 4])
    assert torch.allclose(direct.maps[4].weight, p2.maps[4].weight, atol=1e-12)
    anyd = sel.select("harp-any-ls", 3)
    assert sorted(anyd.layers) == sorted(pick(attention_drop_scores(model, WINDOWS, 4), 3, highest=True))
    with applied(model, p2):
        got = harp.perplexity(model, WINDOWS).ppl
    assert got == pytest.approx(p2.calib_ppl, rel=1e-9)
    assert got == pytest.approx(_ppl_with(model, [5, 4], [1.0, 1.0], direct.maps), rel=1e-6)


def test_heldout_errors_equal_direct_solves():
    """The cross-validation shortcut (one eigendecomposition per fold) gives the same held-out errors as
    solving each ridge / prior candidate directly."""
    from harp.methods.fit import RIDGE_GRID, heldout_errors

    g = torch.Generator().manual_seed(1)
    v = torch.randn(300, 12, generator=g, dtype=torch.float64)
    a = torch.randn(300, 20, generator=g, dtype=torch.float64)
    v[:, 3] = v[:, 2]  # a singular direction: only the ridge keeps it solvable

    def stats(rows):
        return FitStats(v[rows].T @ v[rows], a[rows].T @ v[rows], float((a[rows] ** 2).sum()), v[rows].shape[0])

    train, held = stats(slice(0, 200)), stats(slice(200, 300))
    prior = torch.randn(20, 12, generator=g, dtype=torch.float64)
    got = heldout_errors(train, held, list(RIDGE_GRID), {"zero": None, "alpha": prior})
    for r in RIDGE_GRID:
        for name, p in (("zero", None), ("alpha", prior)):
            want = held.error(solve_map(train, r, p))
            assert got[(r, name)] == pytest.approx(want, rel=1e-6), (r, name)
