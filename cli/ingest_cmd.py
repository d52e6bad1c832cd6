"""`quantpredict ingest`: append measured results to a training-data folder."""

from __future__ import annotations

import json

import click

from predictor.data.ingest import ingest
from predictor.errors import UsageError
from predictor.schema import IMATRIX_VALUES


def _task_categories(pairs: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        task, sep, cat = pair.partition("=")
        if not sep or not task or not cat:
            raise UsageError(f"--task-category {pair!r}: write TASK=CATEGORY, e.g. my_task=reasoning")
        out[task.strip()] = cat.strip()
    return out


@click.command("ingest")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--baseline", type=click.Path(exists=True, dir_okay=False),
              help="Unquantized run: lm-eval results JSON, or llama-perplexity log of the 16-bit model.")
@click.option("--model", help="Model id or alias (see training_data/registry.csv).")
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False),
              help="Training-data folder to append to (default: training_data/ of this repository; may be empty).")
@click.option("--imatrix", type=click.Choice(IMATRIX_VALUES), default="unknown", show_default=True,
              help="Whether the quants were made with an importance matrix.")
@click.option("--imatrix-note", help="Calibration detail, e.g. 'wikitext 10m tokens'.")
@click.option("--source", help="Where the numbers come from (default: the tool that produced them).")
@click.option("--dataset", help="Text llama-perplexity was run on, e.g. 'wikitext-2 test'.")
@click.option("--baseline-precision", help="What the baseline is: bf16, fp16, Q8_0, ...")
@click.option("--task-category", "task_category", multiple=True, metavar="TASK=CATEGORY",
              help="Category of an lm-eval task quantpredict does not know (repeatable).")
@click.option("--dry-run", is_flag=True, help="Parse and check everything, write nothing.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def command(inputs, baseline, model, out_dir, imatrix, imatrix_note, source, dataset, baseline_precision,
            task_category, dry_run, fmt):
    """Add measurements to the training data.

    INPUTS are QUANT=FILE pairs (lm-eval v0.4 results JSON or llama-perplexity logs) or CSV files in
    the documented schema. Inputs are recognised by content. Nothing is written unless every input
    parses.

    \b
    Examples:
      quantpredict ingest --model Qwen/Qwen3-8B --baseline bf16.json Q4_K_M=q4km.json Q3_K_M=q3km.json
      quantpredict ingest --model Qwen/Qwen3-8B --baseline f16.log Q4_K_M=q4km.log --dataset "wikitext-2 test"
      quantpredict ingest rows.csv -o my_training_data/
    """
    report = ingest(
        inputs,
        out_dir=out_dir,
        model=model,
        baseline=baseline,
        imatrix=imatrix,
        imatrix_note=imatrix_note,
        source=source,
        dataset=dataset,
        baseline_precision=baseline_precision,
        task_categories=_task_categories(task_category),
        dry_run=dry_run,
    )
    for w in report.warnings:
        click.echo(f"warning: {w}", err=True)
    if fmt == "json":
        click.echo(json.dumps({
            "directory": str(report.directory), "written": report.written, "added": report.added,
            "duplicates": report.duplicates,
            "rows": {t: df.to_dicts() for t, df in report.new_rows.items()},
        }, indent=1, default=str))
        return
    for table in ("measurements", "distortion"):
        df = report.new_rows[table]
        click.echo(f"{table}: {report.added[table]} new rows, {report.duplicates[table]} already present")
        if df.height:
            cols = (["model", "quant", "task", "metric", "metric_filter", "baseline_score", "quant_score", "relative_drop_pct"]
                    if table == "measurements" else ["model", "quant", "metric", "value", "baseline", "relative_change_pct"])
            with_pl_config(lambda: click.echo(df.select(cols)))
    state = "dry run: nothing written" if dry_run else (f"written to {report.directory}" if report.written else "nothing new to write")
    click.echo(state, err=True)


def with_pl_config(fn):
    import polars as pl

    with pl.Config(tbl_rows=40, tbl_width_chars=160, fmt_str_lengths=40, tbl_hide_dataframe_shape=True):
        fn()
