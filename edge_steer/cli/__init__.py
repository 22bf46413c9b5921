"""`edge-steer`: the command line, one module per sub-command group. Each command parses its arguments
and calls plain functions of the package's rooms (sim, models, steering, export, runtime, bench); nothing
below this package imports it. Command modules import their heavy rooms inside the command, so that
`edge-steer --help` and `edge-steer send` start without torch. The commands are registered here, in
the order `--help` lists them."""

from __future__ import annotations

import typer

from edge_steer.cli import bench, demo, demos, export, serve, steer, tasks, train
from edge_steer.cli._common import app

for name, command in (("pretrain", train.pretrain), ("eval", train.eval_cmd), ("identify", steer.identify_cmd),
                      ("finetune", steer.finetune_cmd), ("apply", steer.apply_cmd), ("demo", demo.demo),
                      ("serve", serve.serve), ("send", serve.send), ("export", export.export_cmd),
                      ("report", steer.report_cmd)):
    app.command(name)(command)

_groups = (("tasks", "The task registry.", (("list", tasks.tasks_list),)),
           ("demos", "Scripted demonstrations in LeRobot format.",
            (("generate", demos.demos_generate), ("replay", demos.demos_replay))),
           ("bench", "Benchmarks that write their results into docs/.", (("adapt", bench.bench_adapt),)),
           ("keys", "CURVE key pairs for remote control of `edge-steer serve`", (("generate", serve.keys_generate),)))
for group, help_text, commands in _groups:
    sub = typer.Typer(help=help_text, no_args_is_help=True)
    for name, command in commands:
        sub.command(name)(command)
    app.add_typer(sub, name=group)


def main() -> None:
    app()
