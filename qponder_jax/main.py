"""The `qponder` entry point (also `python -m qponder_jax.main`).

    qponder --config=configs/<name>.py[:variant] --workdir=DIR [--config.<key>=<value> ...]

The config (an ml-collections `get_config(arg)` file, locked, so a misspelled override is an error) names its job
in `config.job`; `JOBS` maps job names to `"module:function"` strings, imported only when that job runs. A job is
`fn(config, workdir)`. Add one with a line in `JOBS` or `register_job(name, fn)`; nothing else changes.
"""

from __future__ import annotations

import difflib
import importlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

from qponder_jax import distributed  # registers --coordinator_address, --num_processes, --process_id
from qponder_jax.errors import Preempted

JobFn = Callable[[Any, Path], Any]

JOBS: dict[str, str | JobFn] = {
    "sft": "qponder_jax.train.sft_job:run",  # cold-start SFT (configs/qponder_ci.py)
    "grpo": "qponder_jax.train.grpo_job:run",  # GRPO (configs/qponder.py, configs/preresq.py)
    "eval": "qponder_jax.eval:run",  # IQA evaluation (configs/eval.py)
    "distill": "qponder_jax.distill:run",  # teacher -> cold-start JSONL (configs/distill.py)
    "export": "qponder_jax.export:run",  # checkpoint -> HF folder (configs/export.py)
    "score": "qponder_jax.score:run",  # score image files, folders, manifests (configs/score.py; also qponder-score)
    "demo": "qponder_jax.demo:run",  # the whole pipeline at toy scale (configs/demo.py)
}

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "ml-collections config file, optionally with :variant (e.g. configs/qponder_ci.py:tiny)"
)
_WORKDIR = flags.DEFINE_string("workdir", None, "run folder: checkpoints, metrics, TensorBoard events, built assets")


def register_job(name: str, fn: str | JobFn) -> None:
    """Adds (or replaces) job `name`: a callable or a "module:function" string."""
    JOBS[name] = fn


def get_job(name: str) -> JobFn:
    """The job function for `name`; raises with the known names or the import problem."""
    if name not in JOBS:
        from qponder_jax.errors import ConfigError

        close = difflib.get_close_matches(str(name), list(JOBS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"config field job={name!r}: unknown job{hint}; known jobs: {sorted(JOBS)}")
    target = JOBS[name]
    if callable(target):
        return target
    module_name, _, fn_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            raise ValueError(f"job {name!r} lives in {module_name}, which is not available in this install") from e
        raise
    fn = getattr(module, fn_name, None)
    if fn is None:
        raise ValueError(f"job {name!r}: {module_name} has no function {fn_name!r}")
    return fn


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config=configs/qponder_ci.py:tiny")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    try:
        has_job = "job" in config
    except OSError as e:  # config_flags defers a config file that cannot be loaded until it is used
        raise SystemExit(f"qponder: error: {_config_error(e)}") from None
    if not has_job:
        raise app.UsageError(f"config {_CONFIG.config_filename} has no `job` field")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax and grain log every save at INFO; ask with --verbosity=0
    workdir = Path(_WORKDIR.value)
    try:  # multi-process start-up (before any JAX device use), then: every process runs the same config
        distributed.initialize_from_env()
        distributed.check_consistent(config, workdir)
    except distributed.DistributedError as e:
        raise SystemExit(f"qponder: error: {e}") from e
    job = _validated_job(config, workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    _write_config(config, workdir)
    try:
        result = job(config, workdir)
        if getattr(result, "status", None) == "preempted":
            raise Preempted(f"preempted; checkpoint saved in {workdir}. Rerun the same command to resume.")
    except Preempted as e:  # exit status EXIT_RESUME: a scheduler or launch/ reruns it, never records it as done
        print(f"qponder: {e} (exit status {e.code})", flush=True)
        raise
    except _user_errors() as e:  # evaluated only when an exception reaches it
        raise SystemExit(f"qponder: error: {e}") from e


def _validated_job(config, workdir: Path) -> JobFn:
    """The config's job, once `validation.check_config` passed: a config that cannot run stops here with one line
    naming the field, before any model or data is built."""
    from qponder_jax import validation
    from qponder_jax.errors import ConfigError

    try:
        job = get_job(config.job)
        validation.check_config(config, workdir)
    except ConfigError as e:
        raise SystemExit(f"qponder: error: {e}") from None
    return job


def _config_error(error: BaseException) -> str:
    """A config file that cannot be loaded (missing, or its get_config raised), as one line naming --config."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [str(error)]
    if isinstance(error, OSError):
        return f"--config: cannot load the config file ({lines[-1]})"  # e.g. "[Errno 2] No such file ...: 'x.py'"
    flag = lines[0].split(": Error whilst", 1)[0].removeprefix("flag ")  # "--config=<file>:<variant>"
    return f"{flag}: {lines[-1].split(': ', 1)[-1]}"  # the exception line that ends get_config's traceback


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors whose message says what to fix (a missing path, a workdir of another model, no checkpoint that restores,
    a diverged run): printed as one line with exit status 1, without a traceback."""
    from qponder_jax.errors import ConfigError, DataError
    from qponder_jax.train.loop import NonFiniteError
    from qponder_jax.train.state import CheckpointMismatchError, CheckpointUnreadableError

    return (
        ConfigError,
        DataError,
        FileNotFoundError,
        CheckpointMismatchError,
        CheckpointUnreadableError,
        NonFiniteError,
    )


def _write_config(config, workdir: Path) -> None:
    """The resolved config as `<workdir>/config.json` (for the record; the run reads its flags, not this file)."""
    import jax

    if jax.process_index() != 0:
        return
    path = workdir / "config.json"
    if path.is_file():  # never overwrite the record of another job (e.g. eval run inside a training workdir)
        try:
            previous_job = json.loads(path.read_text()).get("job")
        except (json.JSONDecodeError, AttributeError):
            previous_job = None
        if previous_job != config.job:
            path = workdir / f"config.{config.job}.json"
    path.write_text(json.dumps(json.loads(config.to_json_best_effort()), indent=2) + "\n")


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with one-line errors for a bad flag, a config file that cannot be loaded (missing, or an
    unknown variant) and a `--config.<key>` override that names no config field."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:  # app.parse_flags_with_usage would print it with get_config's whole traceback
        message = _config_error(e) if "parsing config file" in str(e) else " ".join(str(e).split())
        raise SystemExit(f"qponder: error: {message}") from None
    except OSError as e:  # an override of a config file that could not be loaded
        raise SystemExit(f"qponder: error: {_config_error(e)}") from None
    except (AttributeError, KeyError) as e:  # raised by the locked ConfigDict for an unknown key
        while e.args and isinstance(e.args[0], BaseException):  # ml_collections wraps a KeyError in an AttributeError
            e = e.args[0]
        message = " ".join(str(e.args[0] if e.args else e).split())
        raise SystemExit(f"qponder: error: bad --config override: {message}") from None


def run() -> None:
    """The console script."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
