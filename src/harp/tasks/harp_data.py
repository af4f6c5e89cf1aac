"""Local datasets for harp's shipped lm-evaluation-harness tasks (the YAML files next to this one).

Each YAML names one of the loaders below as its `custom_dataset`; lm-eval calls it with the task's
metadata, so the data folder is found at run time, in this order:

1. `harp_data_dir` in the task metadata (harp passes its `data_dir` this way; plain lm-eval users can
   pass `--metadata '{"harp_data_dir": "/path"}'`),
2. the environment variable HARP_DATA_DIR,
3. `./data`, relative to the current directory.

The folder holds the public files in their original layout (see DATA_FILES). Nothing is
downloaded. This module imports nothing from harp so lm-eval can load it by file path alone.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

ENV_VAR = "HARP_DATA_DIR"
DEFAULT_DIRS = ("data",)  # never a developer machine's path: users pass `data_dir`

# task -> (relative path, where to get it, sha256 of the official file)
DATA_FILES: dict[str, list[tuple[str, str, str]]] = {
    "lambada_openai": [
        ("lambada_openai/lambada_test.jsonl",
         "OpenAI's LAMBADA test file (https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl)",
         "4aa8d02cd17c719165fc8a7887fddd641f43fcafa4b1c806ca8abc31fabdb226"),
    ],
    "piqa": [
        ("piqa/valid.jsonl", "PIQA validation (https://yonatanbisk.com/piqa/data/valid.jsonl)",
         "93503cc97c679e459b065c3d13e848282e44b2a25213985bed3e5d458abef72d"),
        ("piqa/valid-labels.lst", "PIQA validation labels (https://yonatanbisk.com/piqa/data/valid-labels.lst)",
         "b4192dc3a2a0363d9d60ccf79800cbbe2f32ebb17726efdde6970e0b8131bceb"),
    ],
    "gsm8k": [
        ("gsm8k/test.jsonl", "GSM8K test (github.com/openai/grade-school-math, grade_school_math/data/test.jsonl)",
         "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14"),
    ],
    "nq_open": [
        ("nq_open/NQ-open.dev.jsonl",
         "NQ-open dev (github.com/google-research-datasets/natural-questions, nq_open/NQ-open.dev.jsonl)",
         "f15567f38099f3615f5b8a685c0aef449c11ad90d3da3735e8d1b98115b40616"),
    ],
}


def resolve_data_dir(explicit: str | os.PathLike[str] | None = None) -> tuple[Path, str]:
    """The data folder and how it was found. Raises FileNotFoundError naming every place looked at."""
    if explicit:
        p = Path(explicit).expanduser()
        if not p.is_dir():
            raise FileNotFoundError(f"Task data folder {p} (from `data_dir` / harp_data_dir) does not exist.")
        return p.resolve(), "given"
    env = os.environ.get(ENV_VAR)
    if env:
        p = Path(env).expanduser()
        if not p.is_dir():
            raise FileNotFoundError(f"Task data folder {p} (from ${ENV_VAR}) does not exist.")
        return p.resolve(), f"${ENV_VAR}"
    for cand in DEFAULT_DIRS:
        p = Path(cand)
        if p.is_dir() and any((p / rel).is_file() for files in DATA_FILES.values() for rel, _, _ in files):
            return p.resolve(), f"default location ./{cand}"
    raise FileNotFoundError(
        "No task data folder found: pass `data_dir=DIR` (or set HARP_DATA_DIR) to a folder holding "
        f"{', '.join(rel for files in DATA_FILES.values() for rel, _, _ in files)}. "
        f"Looked in: {', '.join(str(Path(c).resolve()) for c in DEFAULT_DIRS)}."
    )


def task_files(task: str, data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """The files of one local task, checked to exist (clear error naming the file and its source)."""
    root, how = resolve_data_dir(data_dir)
    out = []
    for rel, source, _ in DATA_FILES[task]:
        p = root / rel
        if not p.is_file():
            raise FileNotFoundError(
                f"Task {task!r} needs {p} (data folder {root}, {how}), which is missing. Get {source} and put it "
                f"there, point `data_dir` / {ENV_VAR} at a folder that has it, or use the hub version of the task "
                "when online (see `harp eval --help`)."
            )
        out.append(p)
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def checksums(task: str, data_dir: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """Provenance of a task's files: path, sha256 and whether it matches the official file."""
    rows = []
    for p, (_, _, official) in zip(task_files(task, data_dir), DATA_FILES[task], strict=True):
        digest = sha256(p)
        rows.append({"path": str(p), "sha256": digest, "official": digest == official})
    return rows


def _jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}, line {n}: not valid JSON ({e}).") from None
    return rows


def _need_fields(rows: list[dict[str, Any]], fields: tuple[str, ...], path: Path) -> None:
    if not rows:
        raise ValueError(f"{path} holds no records.")
    missing = [f for f in fields if f not in rows[0]]
    if missing:
        raise ValueError(f"{path}: records lack field(s) {missing}; expected {list(fields)}.")


def _dataset(split: str, rows: list[dict[str, Any]]) -> Any:
    import datasets

    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})


def _data_dir(kwargs: dict[str, Any]) -> str | None:
    return kwargs.get("harp_data_dir")


# ------------------------------------------------------------------------------------------------
# Loaders (lm-eval `custom_dataset` callables): metadata and dataset_kwargs arrive as keywords.
# ------------------------------------------------------------------------------------------------


def lambada_openai(**kwargs: Any) -> Any:
    (path,) = task_files("lambada_openai", _data_dir(kwargs))
    rows = _jsonl(path)
    _need_fields(rows, ("text",), path)
    return _dataset("test", [{"text": r["text"]} for r in rows])


def piqa(**kwargs: Any) -> Any:
    docs_path, labels_path = task_files("piqa", _data_dir(kwargs))
    rows = _jsonl(docs_path)
    _need_fields(rows, ("goal", "sol1", "sol2"), docs_path)
    labels = [line.strip() for line in labels_path.read_text().splitlines() if line.strip()]
    if len(labels) != len(rows):
        raise ValueError(f"{labels_path} has {len(labels)} labels for {len(rows)} questions in {docs_path}.")
    if set(labels) - {"0", "1"}:
        raise ValueError(f"{labels_path}: labels must be 0 or 1.")
    docs = [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(y)}
            for r, y in zip(rows, labels, strict=True)]
    return _dataset("validation", docs)


def gsm8k(**kwargs: Any) -> Any:
    (path,) = task_files("gsm8k", _data_dir(kwargs))
    rows = _jsonl(path)
    _need_fields(rows, ("question", "answer"), path)
    return _dataset("test", [{"question": r["question"], "answer": r["answer"]} for r in rows])


def nq_open(**kwargs: Any) -> Any:
    (path,) = task_files("nq_open", _data_dir(kwargs))
    rows = _jsonl(path)
    _need_fields(rows, ("question", "answer"), path)
    docs = [{"question": r["question"], "answer": [str(a) for a in r["answer"]]} for r in rows]
    return _dataset("validation", docs)
