"""`harp bench`: measure how much faster and lighter a HARP-pruned model is than its original.

Method (what the numbers mean):

* Both models live in one process and are measured **interleaved**: for every context length, after
  `warmup` unmeasured rounds, each of `repeats` rounds (more if `min_seconds` asks for it) measures
  the original (A) and the pruned model (B) on the same tokens. The pruned/original ratio is
  computed within each round, so a slow moment of the machine hits both sides of a pair; medians,
  min-max and a bootstrap 95 % interval of the median ratio are reported.
* `timing="lockstep"` (default) interleaves at the finest grain that keeps each model's own
  computation intact: the two prefills run in two threads that hand the CPU to each other at every
  attention and MLP sub-layer (A's embedding, B's embedding, A's layer-0 attention, B's layer-0
  attention, ...), never running at the same time; each model's time is the sum of its own
  segments. Shared 2-core machines drift by tens of percent within seconds; a multi-second prefill
  of A and then of B sees different drifts, while 60 alternating segments of both see the same.
  Decode alternates step by step (A's step 1, B's step 1, ...). `timing="forward"` times whole
  forwards A then B instead, and also records process CPU time.
* Prompt: uniform random token ids (fixed seed); where the tokenizer adds a BOS token, the first
  token is BOS, as in every real prompt of that model.
* Prefill: one forward of `n` tokens into an empty `DynamicCache`, logits for the last token only
  (`logits_to_keep=1`, as `generate` does).
* Decode: `new_tokens` greedy steps of one token each on that cache; throughput = new_tokens / time.
* KV-cache bytes: read from the cache object after the prefill (`harp.accounting.kv_cache_bytes`).
* Bounds: `harp.accounting` (docs/method.md, "Speed bounds"): prefill FLOPs ratio, decode bytes-read
  ratio. The measured prefill saving `1 - t_pruned/t_orig` is reported as a fraction of the ideal
  saving `1 - 1/bound`.
* Memory: with `isolated_memory=True` each model is re-loaded in a fresh subprocess that runs every
  context once, so its peak RSS (ru_maxrss) belongs to that model alone. The process-wide peak of
  the benchmark itself (both models loaded) is always reported, and labelled as such.

Modules: `timing` (timed forwards, lockstep), `probe` (resident memory, the fresh-process probe),
`results` (statistics and the result dict), `run` (`run_bench`, writing the files); the tables and
the plot are drawn by `harp.report.bench`.
"""

from harp.bench.probe import peak_rss_bytes, probe_memory, weights_bytes
from harp.bench.results import RESULT_VERSION, context_row, median_ci95
from harp.bench.run import (
    JSON_NAME,
    MAX_ROUNDS,
    PLOT_NAME,
    TABLE_NAME,
    TIMINGS,
    check_pair,
    output_paths,
    parse_contexts,
    run_bench,
    write_bench,
)
from harp.bench.timing import (
    alternating_decode,
    lockstep_prefill,
    lockstep_round,
    measure,
    prompt_tokens,
    switch_points,
)
from harp.modeling import cache_kwarg
from harp.report import check_plot_available
from harp.report.bench import bench_table, plot_bench

__all__ = [
    "JSON_NAME",
    "MAX_ROUNDS",
    "PLOT_NAME",
    "RESULT_VERSION",
    "TABLE_NAME",
    "TIMINGS",
    "alternating_decode",
    "bench_table",
    "cache_kwarg",
    "check_pair",
    "check_plot_available",
    "context_row",
    "lockstep_prefill",
    "lockstep_round",
    "measure",
    "median_ci95",
    "output_paths",
    "parse_contexts",
    "peak_rss_bytes",
    "plot_bench",
    "probe_memory",
    "prompt_tokens",
    "run_bench",
    "switch_points",
    "weights_bytes",
    "write_bench",
]
