"""Shared by the benchmark tools: write a result section into a markdown file in docs/, stamped
with the commit and the machine."""

from edge_steer.bench.docs import git_commit, this_machine, upsert_section  # noqa: F401  (re-exported for the tools)
