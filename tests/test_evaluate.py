"""Downstream evaluation: the shipped lm-eval task YAMLs, data-folder resolution, `harp eval`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny import VOCAB, byte_tokenizer, tiny_model
from typer.testing import CliRunner

from harp.cli import get_app
from harp.engine.evaluate import LOCAL_TASKS, evaluate, parse_limit, resolve_tasks
from harp.engine.perplexity import perplexity
from harp.tasks import TASKS_DIR, harp_data

# First 32 records of each official file, vendored with licence notes (tests/data/README.md): the suite needs
# nothing outside the repository.
REAL_DATA = Path(__file__).resolve().parent / "data" / "tasks"
SUBSET_SHA256 = {
    "lambada_openai/lambada_test.jsonl": "4689a806decfa46d18cefda9209f5d5de6eb45b8dce8d9b4c657b42b22d84fd0",
    "piqa/valid.jsonl": "49224e9e9821cc9ad2a45a8b8a64c27a569732310560d6990323cc6b245f381c",
    "piqa/valid-labels.lst": "09bf2778d4b87fca5f5649a4d24009cc754bd5e4ae68e04593a8123d04c2e59b",
    "gsm8k/test.jsonl": "6b1b25e3c772d87e36c01839e3b91e910793caae412785024700e2c270176bb9",
    "nq_open/NQ-open.dev.jsonl": "8d18ad5d509474645fe0a3564b8e5b9627fe0e5d1647d16bb878d32267559b1b",
}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A data folder in the original files' layout and formats, with a few made-up records."""
    d = tmp_path / "data"
    _write_jsonl(d / "lambada_openai/lambada_test.jsonl", [
        {"text": "She opened the door and saw her old friend standing in the rain"},
        {"text": "He picked up the guitar and played a song for his sister"},
        {"text": "The cat sat on the warm windowsill all afternoon"},
    ])
    _write_jsonl(d / "piqa/valid.jsonl", [
        {"goal": "Dry wet hands", "sol1": "Use a towel.", "sol2": "Use a bucket of water."},
        {"goal": "Open a jar", "sol1": "Freeze the lid.", "sol2": "Twist the lid."},
        {"goal": "Cool soup", "sol1": "Let it rest.", "sol2": "Boil it."},
    ])
    (d / "piqa/valid-labels.lst").write_text("0\n1\n0\n")
    _write_jsonl(d / "gsm8k/test.jsonl", [
        {"question": "Tom has 3 apples and buys 2 more. How many apples?", "answer": "3 + 2 = 5\n#### 5"},
        {"question": "A box holds 4 pens. How many pens in 2 boxes?", "answer": "4 * 2 = 8\n#### 8"},
        {"question": "Ann had 10 coins and lost 3. How many are left?", "answer": "10 - 3 = 7\n#### 7"},
    ])
    _write_jsonl(d / "nq_open/NQ-open.dev.jsonl", [
        {"question": "what is the capital of france", "answer": ["Paris"]},
        {"question": "who wrote hamlet", "answer": ["William Shakespeare", "Shakespeare"]},
        {"question": "how many legs does a spider have", "answer": ["eight", "8"]},
    ])
    return d


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama", vocab_size=VOCAB, max_position_embeddings=512), byte_tokenizer()


def test_shipped_yamls_exist_and_name_their_loaders():
    names = {p.stem for p in TASKS_DIR.glob("*.yaml")}
    assert names == {t.lm_eval_name for t in LOCAL_TASKS.values()}
    for t in LOCAL_TASKS.values():
        text = (TASKS_DIR / f"{t.lm_eval_name}.yaml").read_text()
        assert f"task: {t.lm_eval_name}\n" in text
        assert f"!function harp_data.{t.data}" in text
        assert f"equivalent_hub_task: {t.hub}" in text


def test_shipped_tasks_run_on_a_tiny_model_with_limit_2(tiny, data_dir):
    model, tok = tiny
    res = evaluate(model, tok, "lambada,piqa,gsm8k,nq_open,wikitext", limit=2, data_dir=data_dir,
                   batch_size=2, eval_text=str(data_dir / "lambada_openai/lambada_test.jsonl"), eval_tokens=None,
                   eval_seq_len=64, max_gen_toks=8)
    assert list(res.scores) == ["lambada", "piqa", "gsm8k", "nq_open", "wikitext"]
    for name in ("lambada", "piqa", "gsm8k", "nq_open"):
        s = res.scores[name]
        assert s.samples == 2 and s.total == 3, name
        assert 0.0 <= s.value <= 1.0 and s.metric == LOCAL_TASKS[name].metric
        assert s.higher_is_better
    assert "perplexity,none" in res.scores["lambada"].metrics  # LAMBADA reports its perplexity too
    assert "acc_norm,none" in res.scores["piqa"].metrics
    assert "exact_match,flexible-extract" in res.scores["gsm8k"].metrics
    assert res.data_dir == str(data_dir.resolve())
    assert all(not f["official"] for files in res.data_files.values() for f in files)  # made-up files
    ppl = res.scores["wikitext"]
    assert not ppl.higher_is_better and ppl.value > 1


def test_perplexity_task_is_harps_perplexity(tiny, tmp_path):
    model, tok = tiny
    text = tmp_path / "t.txt"
    text.write_text("Perplexity is measured on non-overlapping windows. " * 30)
    res = evaluate(model, tok, "ppl", eval_text=str(text), eval_tokens=512, eval_seq_len=128)
    ids = tok(text.read_text(), add_special_tokens=False)["input_ids"][:512]
    want = perplexity(model, torch.tensor(ids).view(4, 128)).ppl
    assert res.scores["wikitext"].value == pytest.approx(want, rel=1e-6)
    assert res.scores["wikitext"].samples == 4 * 127


def test_piqa_loader_merges_labels_and_checks_them(data_dir):
    ds = harp_data.piqa(harp_data_dir=str(data_dir))["validation"]
    assert [d["label"] for d in ds] == [0, 1, 0] and ds[1]["goal"] == "Open a jar"
    (data_dir / "piqa/valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(ValueError, match="2 labels for 3 questions"):
        harp_data.piqa(harp_data_dir=str(data_dir))


def test_missing_data_names_the_file_and_the_fix(tiny, data_dir, monkeypatch, tmp_path):
    model, tok = tiny
    (data_dir / "gsm8k/test.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=r"gsm8k/test\.jsonl.*`data_dir`"):  # the CLI says --data-dir
        evaluate(model, tok, "gsm8k", limit=2, data_dir=data_dir)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate(model, tok, "piqa", limit=2, data_dir=tmp_path / "nowhere")
    # no explicit folder, no env var, no default folder: the error says where it looked
    monkeypatch.delenv("HARP_DATA_DIR", raising=False)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match="HARP_DATA_DIR"):
        evaluate(model, tok, "piqa", limit=2)
    # the environment variable is honoured
    monkeypatch.setenv("HARP_DATA_DIR", str(data_dir))
    assert evaluate(model, tok, "piqa", limit=1).scores["piqa"].samples == 1


def test_task_and_limit_parsing():
    specs = resolve_tasks("wikitext, LAMBADA,piqa,nq,hub:piqa,hellaswag,piqa")
    assert [(s.name, s.kind) for s in specs] == [
        ("wikitext", "perplexity"), ("lambada", "local"), ("piqa", "local"), ("nq_open", "local"),
        ("hub:piqa", "hub"), ("hellaswag", "hub")]
    assert specs[4].lm_eval_name == "piqa" and specs[2].lm_eval_name == "harp_piqa"
    with pytest.raises(ValueError, match="Valid tasks: wikitext"):
        resolve_tasks("pi qa")
    with pytest.raises(ValueError, match="No tasks"):
        resolve_tasks(" , ")
    assert parse_limit("100") == {"*": 100}
    assert parse_limit("200,gsm8k=20,nq=50") == {"*": 200, "gsm8k": 20, "nq_open": 50}
    assert parse_limit(None) == {"*": None}
    with pytest.raises(ValueError, match="TASK=N"):
        parse_limit("lots")
    with pytest.raises(ValueError, match="at least 1"):
        parse_limit("0")


def test_limit_for_a_task_not_asked_for_is_an_error(tiny, data_dir):
    model, tok = tiny
    with pytest.raises(ValueError, match="not in `tasks`"):  # the CLI says --tasks (harp.commands.cli_text)
        evaluate(model, tok, "piqa", limit="gsm8k=3", data_dir=data_dir)


def test_eval_command(tmp_path, data_dir):
    model = tiny_model("llama", vocab_size=VOCAB)
    src = tmp_path / "m"
    model.save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    text = tmp_path / "t.txt"
    text.write_text("Evaluation text for the command test. " * 40)
    out = tmp_path / "scores.json"
    args = ["eval", str(src), "--tasks", "wikitext,piqa", "--limit", "2", "--data-dir", str(data_dir),
            "--eval", str(text), "--eval-tokens", "256", "--eval-seq-len", "64", "--json", str(out)]
    r = CliRunner().invoke(get_app(), args)
    assert r.exit_code == 0, r.output
    d = json.loads(out.read_text())
    assert set(d["scores"]) == {"wikitext", "piqa"} and d["scores"]["piqa"]["samples"] == 2
    assert "piqa" in r.output and "ppl" in r.output
    again = CliRunner().invoke(get_app(), args)
    assert again.exit_code != 0 and isinstance(again.exception, FileExistsError)
    bad = CliRunner().invoke(get_app(), ["eval", str(src), "--tasks", "pi qa"])
    assert bad.exit_code != 0 and "Valid tasks" in str(bad.exception)


@pytest.mark.slow
def test_shipped_tasks_on_the_real_data_files(tiny):
    """The YAMLs against the real public records (vendored subsets of the official files), tiny model."""
    model, tok = tiny
    res = evaluate(model, tok, "lambada,piqa,gsm8k,nq_open", limit=2, data_dir=REAL_DATA, batch_size=2,
                   max_gen_toks=4)
    assert {k: (v.samples, v.total) for k, v in res.scores.items()} == {
        "lambada": (2, 32), "piqa": (2, 32), "gsm8k": (2, 32), "nq_open": (2, 32)}
    # subsets: not the official files, and recorded as such; each is the vendored file, unchanged
    files = [f for fs in res.data_files.values() for f in fs]
    assert len(files) == 5 and not any(f["official"] for f in files)
    got = {str(Path(f["path"]).relative_to(REAL_DATA.resolve())): f["sha256"] for f in files}
    assert got == SUBSET_SHA256


@pytest.mark.slow
def test_hub_task_offline_gives_a_clear_error(tiny, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model, tok = tiny
    with pytest.raises(ValueError, match="Unknown task 'no_such_task_xyz'"):
        evaluate(model, tok, "no_such_task_xyz", limit=1)
    with pytest.raises(ValueError, match="hub tasks need internet"):
        evaluate(model, tok, "hub:piqa", limit=1)


@pytest.mark.slow
def test_smollm2_lambada_and_piqa_score_above_zero():
    """The shipped YAMLs on the real model and data: a broken prompt/target gives 0 accuracy."""
    from harp.model.load import load_model

    model, tok = load_model(None)
    res = evaluate(model, tok, "lambada,piqa", limit=16, data_dir=REAL_DATA)
    assert res.scores["lambada"].samples == 16 and res.scores["piqa"].samples == 16
    assert res.scores["lambada"].value >= 1 / 16  # SmolLM2-135M: 0.30 on the first 100
    assert res.scores["piqa"].value >= 0.5  # 0.65 on the first 100; chance is 0.5


def test_generation_cap_never_raises_a_tasks_own_cap(tiny, data_dir, monkeypatch):
    import lm_eval

    seen = {}
    real = lm_eval.simple_evaluate

    def spy(*a, **k):
        seen[k["tasks"][0]] = k.get("gen_kwargs")
        return real(*a, **k)

    monkeypatch.setattr(lm_eval, "simple_evaluate", spy)
    model, tok = tiny
    evaluate(model, tok, "nq_open,gsm8k", limit=1, data_dir=data_dir, max_gen_toks=8)
    evaluate(model, tok, "nq_open", limit=1, data_dir=data_dir, max_gen_toks=128)
    assert seen["harp_gsm8k"] == {"max_gen_toks": 8}
    assert seen["harp_nq_open"] == {"max_gen_toks": 32}  # the YAML's 32, not 128
    assert "max_gen_toks: 32" in (TASKS_DIR / "harp_nq_open.yaml").read_text()
