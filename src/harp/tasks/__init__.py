"""harp's lm-evaluation-harness task YAMLs (local data, fully offline) and their dataset loaders.

Use them from plain lm-eval too:

    HARP_DATA_DIR=/path/to/data lm_eval --model hf --model_args pretrained=DIR \\
        --include_path "$(python -c 'import harp.tasks as t; print(t.TASKS_DIR)')" --tasks harp_piqa
"""

from pathlib import Path

TASKS_DIR = Path(__file__).parent
