"""The serve daemon's reliability harness: protocol fuzzing (`fuzz`), injected faults and kills
(`faults`), load and e-stop latency (`load`), CURVE (`security`), on an instrumented sim cell (`cell`);
`report` writes docs/reliability.md. `tools/bench_reliability.py` runs it all; the test suite runs the
same functions at small sizes. Kept import-free: the load and atheris children start lean."""
