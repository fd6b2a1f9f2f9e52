"""Errors a user fixes by changing the config, the command line or the input files (the `qponder` CLI prints them as
one line), and the exit status of a run that stopped early and resumes when rerun."""

# Exit status of a run that stopped before finishing and continues when the same command is rerun: preempted (SIGTERM,
# checkpoint saved) or a process whose peers never joined. 75 is sysexits' EX_TEMPFAIL ("try again later");
# launch/sweep.py, launch/local.py, launch/tpu_pod.sh and launch/slurm_gpu.sbatch read it as "resume later".
EXIT_RESUME = 75


class ConfigError(ValueError):
    """A config value that cannot work; the message names the config field and what to set it to."""


class DataError(ValueError):
    """Input data that cannot be used (a malformed line, a file whose every record is unusable); the message names the
    file and line."""


class Preempted(SystemExit):
    """A job stopped early on a preemption notice after saving its state; rerunning the same command resumes it.

    A SystemExit with status `EXIT_RESUME` (so it is not caught as an error); `str(e)` says what to rerun."""

    def __init__(self, message: str):
        super().__init__(EXIT_RESUME)
        self.message = message

    def __str__(self) -> str:
        return self.message
