"""`harp eval DIR`: perplexity (default) and downstream tasks of one model, offline."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

TASKS_HELP = (
    "Comma-separated: wikitext (perplexity), lambada, piqa, gsm8k, nq_open (shipped lm-eval tasks on local "
    "data), passkey, niah (long-context retrieval at each --context, generated offline), or hub:NAME / any "
    "lm-eval task name (online)."
)


def score_table(title: str, scores: dict) -> Table:
    t = Table(title=title, header_style="bold")
    for col in ("task", "metric", "value", "± stderr", "items", "time"):
        t.add_column(col, justify="right" if col not in ("task", "metric") else "left")
    for s in scores.values():
        arrow = "↑" if s.higher_is_better else "↓"
        items = f"{s.samples:,} tokens" if s.metric == "ppl" else f"{s.samples} / {s.total}"
        task = s.title if s.metric == "ppl" else s.task  # the perplexity row names its text
        t.add_row(task, f"{s.metric} {arrow}", f"{s.value:.4f}", "" if s.stderr is None else f"{s.stderr:.4f}",
                  items, f"{s.seconds:.0f} s")
    return t


def position_table(r) -> Table:
    t = Table(title=f"loss by position ({r.windows} x {r.seq_len} tokens)", header_style="bold")
    for col in ("positions", "mean loss (nats)", "ppl", "tokens"):
        t.add_column(col, justify="right")
    for b in r.buckets:
        t.add_row(b["bucket"], f"{b['nll']:.4f}", f"{b['ppl']:.2f}", f"{b['tokens']:,}")
    return t


def eval_cmd(
    model: str = typer.Argument(..., help="Model folder (HARP checkpoint or any causal LM), .gguf, "
                                          "'smollm2-135m', or a hub id."),
    tasks: str = typer.Option("wikitext", "--tasks", "-t", help=TASKS_HELP),
    limit: str = typer.Option(None, "--limit", help="Items per lm-eval task: N, or e.g. '200,gsm8k=20'."),
    eval_: str = typer.Option(None, "--eval", help="Perplexity text (default: bundled 'wikitext2-raw-test')."),
    eval_tokens: int = typer.Option(16384, "--eval-tokens", help="Perplexity on the first N tokens."),
    eval_seq_len: int = typer.Option(1024, "--eval-seq-len", help="Perplexity window length."),
    data_dir: Path = typer.Option(None, "--data-dir", help="Task data folder (default: $HARP_DATA_DIR, then ./data)."),
    batch_size: int = typer.Option(8, "--batch-size", help="lm-eval batch size."),
    max_gen_toks: int = typer.Option(None, "--max-gen-toks", help="Cap generated tokens (generation tasks)."),
    num_fewshot: int = typer.Option(None, "--num-fewshot", help="Override the tasks' few-shot count."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16"),
    threads: int = typer.Option(None, "--threads", help="torch CPU threads."),
    context: str = typer.Option(None, "--context", help="Prompt lengths in tokens for the passkey and niah tasks, "
                                "e.g. 1024,4096 or 4k,8k (default 4096, or the model's maximum if smaller)."),
    filler: str = typer.Option(None, "--filler", help="Haystack text for passkey and niah: a text file or folder "
                               "(default: the classic filler for passkey, bundled Tiny Shakespeare for niah)."),
    plot_out: Path = typer.Option(None, "--plot", help="Write a PNG of the perplexity text's mean loss against "
                                  "position (the loss by position is measured with it, at any --eval-seq-len)."),
    json_out: Path = typer.Option(None, "--json", help="Write the scores to this JSON file."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --json or --plot file."),
) -> None:
    """Evaluate one model: WikiText-2 perplexity by default, lm-eval and long-context tasks with --tasks.

    With --eval-seq-len above 1024 (or with --plot) the perplexity comes with the mean loss per position
    bucket (0-512, 512-1k, 1k-2k, 2k-4k, 4k-8k tokens); passkey and niah report accuracy per --context."""
    import torch

    from harp.engine.evaluate import evaluate, parse_limit, resolve_tasks
    from harp.jobs.eval import check_eval
    from harp.model.load import load_model
    from harp.modeling import HarpBlock
    from harp.report import check_plot_available
    from harp.report.longctx import plot_position_losses
    from harp.util.fsio import write_json_atomic

    console = Console()
    resolve_tasks(tasks)  # bad task names fail before the model loads
    parse_limit(limit)
    if json_out is not None and json_out.exists() and not overwrite:
        raise FileExistsError(f"{json_out} exists. Choose another --json path or pass --overwrite.")
    if plot_out is not None:
        check_plot_available()
    # before any weight is read: contexts against the model's config, texts, outputs
    check_eval(model, eval_, eval_tokens, eval_seq_len, json_out, overwrite, tasks=tasks, contexts=context,
               filler=filler, plot_out=plot_out)
    if threads:
        torch.set_num_threads(threads)
    m, tok = load_model(model, dtype=dtype)
    plan = getattr(m.config, "harp", None)
    if plan:  # top layer first, as harp prune and harp info list them
        desc = f"HARP {HarpBlock.from_config(m).describe()}"
    else:
        desc = "unpruned"
    console.print(f"model: {model} ({type(m).__name__}, {m.config.num_hidden_layers} layers, {desc})", highlight=False)
    res = evaluate(m, tok, tasks, limit, data_dir=data_dir, batch_size=batch_size, eval_text=eval_,
                   eval_tokens=eval_tokens, eval_seq_len=eval_seq_len, max_gen_toks=max_gen_toks,
                   num_fewshot=num_fewshot, contexts=context, filler=filler,
                   loss_by_position=True if plot_out is not None else None,
                   log=lambda s: console.print(s, highlight=False))
    console.print(score_table(f"harp eval: {model}", res.scores))
    if res.loss_by_position is not None:
        console.print(position_table(res.loss_by_position))
        if plot_out is not None:
            plot_position_losses({Path(model).name or model: res.loss_by_position}, plot_out)
            console.print(f"wrote {plot_out}", highlight=False)
    if json_out is not None:
        d = res.to_dict()
        d["model"] = model
        d["harp"] = plan
        write_json_atomic(json_out, d)
        console.print(f"wrote {json_out}", highlight=False)
