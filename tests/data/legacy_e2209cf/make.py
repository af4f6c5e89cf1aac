"""Regenerate the legacy checkpoint of tests/test_legacy_checkpoint.py with harp as of commit e2209cf.

Run it against a checkout of that commit, never against the current code (`import harp` must resolve
to the old checkout; the script checks):

    git -C /work/main worktree add /tmp/harp-e2209cf e2209cf
    cd /work/main && HF_HUB_OFFLINE=1 PYTHONPATH=/tmp/harp-e2209cf/src \\
        .venv/bin/python tests/data/legacy_e2209cf/make.py --overwrite
    git worktree remove /tmp/harp-e2209cf

It writes next to itself: `checkpoint/` (the `harp.save` folder), `reference.safetensors` (the prompt
and its float32 logits) and `reference.json` (prompt, greedy cached continuation, the `harp` block).
The vendored files were produced once, with torch 2.13.0+cpu and transformers 5.25.0; regenerating
them is only needed if the test's inputs change, and replaces the very thing the test guards.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

COMMIT = "e2209cf"
HERE = Path(__file__).resolve().parent
SEED = 0
VOCAB = 64
CONFIG = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
    attention_bias=False,
)
# every pruned-layer kind of harp at e2209cf: a plain alpha, alpha 0 (attention sub-layer removed) and a
# closed-form refit map (alpha 1); layer 2 stays unpruned so the KV cache has one real layer, and pruned
# layer 0 covers the cache-slot path that broke on transformers 5.25 (commit 400aced)
PLAIN, REFIT, UNPRUNED, REMOVED = 0, 1, 2, 3
PLAIN_ALPHA = 0.7
PROMPT_LEN = 16
NEW_TOKENS = 8


def check_old_harp(harp) -> None:
    src = Path(harp.__file__).resolve().parent
    print(f"harp {harp.__version__} from {src}")
    head = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    if not head.stdout.strip().startswith(COMMIT):
        raise SystemExit(
            f"`import harp` resolves to {src} at {head.stdout.strip()}, not a checkout of {COMMIT}: "
            "run with PYTHONPATH=<checkout of e2209cf>/src."
        )


def tiny_llama() -> torch.nn.Module:
    """A random-weight LlamaForCausalLM built from a config (as tests/tiny.py does), norms perturbed."""
    import transformers

    torch.manual_seed(SEED)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def cache_kwarg(model: torch.nn.Module) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@torch.no_grad()
def greedy_cached(model: torch.nn.Module, ids: torch.Tensor, n: int) -> list[int]:
    """Greedy continuation: one prefill, then one token at a time through the KV cache."""
    out = model(input_ids=ids, use_cache=True)
    new = [int(out.logits[0, -1].argmax())]
    for _ in range(n - 1):
        out = model(input_ids=torch.tensor([[new[-1]]]), use_cache=True, **{cache_kwarg(model): output_cache(out)})
        new.append(int(out.logits[0, -1].argmax()))
    return new


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--overwrite", action="store_true", help="replace checkpoint/ and the reference files")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # trust_remote_code copies the checkpoint's modeling files here: a temporary folder, not ~/.cache
    modules = tempfile.mkdtemp(prefix="harp-legacy-modules-")
    os.environ["HF_MODULES_CACHE"] = modules  # read when transformers is first imported, just below

    import transformers
    from safetensors.torch import save_file

    import harp

    check_old_harp(harp)
    model = tiny_llama()
    g = torch.Generator().manual_seed(SEED + 1)
    calib = torch.randint(0, VOCAB, (8, 32), generator=g)
    prompt = torch.randint(0, VOCAB, (1, PROMPT_LEN), generator=g)

    fit = harp.fit_layers(model, calib, [REFIT])  # on the original model, before anything is pruned
    harp.prune(model, [PLAIN, REFIT, REMOVED], [PLAIN_ALPHA, 1.0, 0.0], maps=fit.maps)
    with torch.no_grad():
        live = model(input_ids=prompt).logits

    ckpt = args.out / "checkpoint"
    fit_info = fit.to_dict()
    fit_info.pop("seconds", None)  # the only non-deterministic entry
    harp.save(
        model,
        ckpt,
        overwrite=args.overwrite,
        recipe={"produced_by": "tests/data/legacy_e2209cf/make.py", "harp_commit": COMMIT, "fit": fit_info},
    )

    loaded = harp.load(ckpt)
    with torch.no_grad():
        logits = loaded(input_ids=prompt).logits.float()
    assert torch.equal(logits, live), "harp.load of the fresh checkpoint does not reproduce the pruned model"
    greedy = greedy_cached(loaded, prompt, NEW_TOKENS)
    with torch.no_grad():  # the cached decode agrees with argmax over full (uncached) forwards
        seq = prompt
        for _ in range(NEW_TOKENS):
            seq = torch.cat([seq, loaded(input_ids=seq).logits[:, -1:].argmax(-1)], dim=1)
    assert seq[0, PROMPT_LEN:].tolist() == greedy, (seq[0, PROMPT_LEN:].tolist(), greedy)
    plain = transformers.AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.equal(plain(input_ids=prompt).logits.float(), logits), "trust_remote_code logits differ"

    tensors = {"input_ids": prompt.contiguous(), "logits": logits.contiguous()}
    save_file(tensors, str(args.out / "reference.safetensors"))
    cfg = json.loads((ckpt / "config.json").read_text())
    ref = {
        "harp_commit": COMMIT,
        "harp_version": harp.__version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "input_ids": prompt[0].tolist(),
        "greedy_cached": greedy,
        "harp": cfg["harp"],
    }
    (args.out / "reference.json").write_text(json.dumps(ref, indent=2) + "\n")
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"harp block {cfg['harp']}; greedy {greedy}; {args.out}: {size:,} bytes")
    shutil.rmtree(ckpt / "__pycache__", ignore_errors=True)
    shutil.rmtree(modules, ignore_errors=True)


if __name__ == "__main__":
    main()
