"""The benchmarks behind `python -m qponder_jax.bench`: one module per subcommand (decode, sft, grpo, memory), each
with `add_arguments(parser)`, `run(args) -> dict` and `show(result)`; shared pieces in `common`."""
