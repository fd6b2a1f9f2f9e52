"""Export an orbax training checkpoint as a Hugging Face folder (safetensors, configs, tokenizer, model card).

    qponder --config=configs/export.py:tiny --workdir=runs/export_ci --config.checkpoint=runs/ci_tiny
    qponder --config=configs/export.py --workdir=runs/export_7b --config.checkpoint=runs/qponder_7b \
        --config.mesh=(1,8,1) --config.dtype=bfloat16

The checkpoint is restored sharded over the mesh (parameters only) and written one tensor at a time, so no host
holds the whole model. The architecture and tokenizer come from the run's base model (its config.json `model`
section, or model.model_path). Pass a training workdir in `checkpoint`, and a separate --workdir for the export
(qponder writes the export config into --workdir). The model card (README.md) carries the run's training config and
the newest eval report found under the training workdir. The export is written beside `out_dir` and renamed into
place, so the folder holds exactly the model just exported; a non-empty `out_dir` that is not an earlier export is
refused unless --config.overwrite=True.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # make `configs` importable from any cwd

import ml_collections  # noqa: E402

from configs import common  # noqa: E402

VARIANTS = ("tiny", "real")


def get_config(arg: str | None = None):
    variant = common.parse_variant(arg, VARIANTS, default="tiny")
    config = ml_collections.ConfigDict()
    config.job = "export"  # which job `qponder` runs (see qponder_jax/main.py:JOBS)
    config.variant = variant  # the variant this config was built for (informational)
    config.mesh = (1, -1, 1)  # mesh shape over ('data', 'fsdp', 'tensor') the checkpoint is restored onto
    config.checkpoint = ""  # the training workdir (holding checkpoints/) to export ("" = --workdir itself)
    config.step = -1  # checkpoint step to export (-1 = the latest)
    config.out_dir = ""  # HF folder to write ("" = <workdir>/hf); an earlier export there is replaced whole
    config.overwrite = False  # also replace a non-empty out_dir that is not an earlier export (its files are deleted)
    config.dtype = "" if variant == "tiny" else "bfloat16"  # safetensors dtype: "" = the parameters' own
    config.max_shard_gb = 4.0  # largest safetensors shard, in GiB
    config.eval_report = ""  # eval report.json for the model card ("" = the newest <checkpoint>/*/report.json)
    # the run's base model: only needed when the training workdir's config.json cannot say (model_path "" = ask it)
    config.model = common.model(dtype="float32")
    return config.lock()
