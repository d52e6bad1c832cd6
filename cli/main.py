"""`quantpredict` command line: a thin layer over `predictor`.

Data goes to stdout, progress and errors to stderr. User errors exit with status 2 and one line;
`--debug` (or QUANTPREDICT_DEBUG=1) shows the traceback instead.
"""

from __future__ import annotations

import os
import sys

import click

from predictor.errors import QuantPredictError


class _Group(click.Group):
    def parse_args(self, ctx, args):
        # `quantpredict MODEL ...` is `quantpredict predict MODEL ...`
        rest = [a for a in args if a != "--debug"]
        if rest and not rest[0].startswith("-") and rest[0] not in self.commands:
            args = list(args)
            args.insert(args.index(rest[0]), "predict")
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except QuantPredictError as exc:
            if ctx.meta.get("debug") or os.environ.get("QUANTPREDICT_DEBUG"):
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except MemoryError:
            click.echo("error: out of memory — try a smaller sample or free memory", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(package_name="quantpredict")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Which llama.cpp quant should I use? Reads a model's weights, never runs it."""
    ctx.meta["debug"] = debug


def _register() -> None:
    from cli import family_cmd, ingest_cmd, inspect_cmd, measure_cmd, predict_cmd

    for mod in (predict_cmd, inspect_cmd, ingest_cmd, measure_cmd, family_cmd):
        for command in getattr(mod, "commands", [mod.command]):
            cli.add_command(command)


_register()


def main() -> None:
    cli(prog_name="quantpredict")


if __name__ == "__main__":
    main()
