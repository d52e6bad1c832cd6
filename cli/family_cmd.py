"""`quantpredict family`: train the self-trained model family and export it to GGUF (issue 3)."""

from __future__ import annotations

import json
from pathlib import Path

import click


def _echo_err(msg: str) -> None:
    click.echo(msg, err=True)


@click.group("family")
def command() -> None:
    """Train small Llama-architecture models from scratch and export them to GGUF.

    Needs torch: pip install 'quantpredict[family]' (CPU build: pip install torch==2.13.0).
    """


@command.command("train")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("--model", "-m", "models", multiple=True,
              help="Train only this model of a family file (repeatable; default: all, in file order).")
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), required=True,
              help="Run folder: the model's folder for one model, else the parent of one folder per model.")
@click.option("--records", type=click.Path(file_okay=False),
              help="Also copy each finished record to RECORDS/NAME.json (e.g. training_data/family/models).")
@click.option("--threads", default=1, show_default=True, help="torch CPU threads.")
def train_cmd(config, models, out_dir, records, threads):
    """Train the models of CONFIG (a family file or one model's config); resumable, prints the records.

    A run that stops resumes from its last checkpoint when the same command is run again.

    \b
    Example:
      quantpredict family train training_data/family/family.json --model fam-xs-tp2 \\
          -o /work/family_runs --records training_data/family/models
    """
    from predictor.family import require_torch

    require_torch()
    from predictor.family.family import expand_family, read_family, rebuild_command, train_family
    from predictor.family.train import train_run

    doc = read_family(config)
    if "models" in doc:
        recs = train_family(config, out_dir, only=list(models) or None, threads=threads, records_dir=records,
                            progress=_echo_err)
    else:
        (cfg,) = expand_family(doc)
        rec = train_run(cfg, out_dir, threads=threads, progress=_echo_err,
                        rebuild_command=rebuild_command(config, None, out_dir))
        if records:
            Path(records).mkdir(parents=True, exist_ok=True)
            (Path(records) / f"{cfg.name}.json").write_text(json.dumps(rec, indent=1) + "\n", encoding="utf-8")
        recs = [rec]
    click.echo(json.dumps([{k: r[k] for k in ("name", "n_params", "tokens_seen", "final_train_loss",
                                              "train_seconds")} | {"gguf": r["gguf"]["file"]} for r in recs],
                          indent=1))


@command.command("export")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--out", "out_path", type=click.Path(dir_okay=False),
              help="GGUF to write (default RUN_DIR/model.gguf).")
def export_cmd(run_dir, out_path):
    """Write the F32 GGUF of RUN_DIR's latest checkpoint (training writes it already; this re-exports,
    e.g. a partly trained run).

    \b
    Example:
      quantpredict family export /work/family_runs/fam-xs-tp8 -o /tmp/fam-xs-tp8.gguf
    """
    from predictor.family import require_torch

    require_torch()
    from predictor.family.export import export_checkpoint

    click.echo(str(export_checkpoint(run_dir, out_path)))


@command.command("list")
@click.argument("family", type=click.Path(exists=True, dir_okay=False))
@click.option("--runs", type=click.Path(file_okay=False), help="Runs folder, to show each model's status.")
def list_cmd(family, runs):
    """Show the models of a FAMILY file: parameters, tokens, tokens per parameter, settings."""
    from predictor.family import require_torch

    require_torch()
    from predictor.family.family import expand_family, read_family
    from predictor.family.model import count_params
    from predictor.family.train import run_status

    for c in expand_family(read_family(family), source=family):
        n = count_params(c.model)
        status = run_status(Path(runs) / c.name) if runs else ""
        if status != "done" and runs and (Path(runs) / c.name / "lock").exists():
            status = "training" if status == "new" else "training (resumed)"
        if status == "done":
            rec = json.loads((Path(runs) / c.name / "record.json").read_text(encoding="utf-8"))
            v = rec["final_val_loss"]
            status = (f"done: {rec['train_seconds']:.0f} s, train loss {rec['final_train_loss']:.3f}, val "
                      + " ".join(f"{k} {x:.3f}" for k, x in v.items()))
        click.echo(f"{c.name:16s} {n / 1e6:5.2f}M  d{c.model.d_model} L{c.model.n_layers} ff{c.model.d_ff}  "
                   f"{c.train.tokens / 1e6:5.1f}M tok  {c.train.tokens / n:4.1f} tok/param  "
                   f"lr {c.train.lr:g} wd {c.train.weight_decay:g}  {status}")


@command.command("report")
@click.option("--records", type=click.Path(exists=True, file_okay=False), default="training_data/family/models",
              show_default=True, help="Folder of the model records.")
@click.option("--measured", type=click.Path(exists=True, file_okay=False),
              help="`quantpredict measure` output folder (distortion.csv, measurements.csv, runs.csv).")
@click.option("--imatrix", type=click.Choice(["no", "yes"]), default="no", show_default=True,
              help="Which measured runs to show.")
@click.option("--predicted", "runs", type=click.Path(exists=True, file_okay=False),
              help="Run folder of `family train` (RUNS/NAME/model.gguf): show the predictor's weights-tier KLD "
                   "beside the measured one instead of the training facts.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
def report_cmd(records, measured, imatrix, runs, fmt):
    """One row per trained model: training facts, KLD at a few presets, arithmetic accuracy.

    \b
    Example:
      quantpredict family report --measured training_data/measured/family --format csv
      quantpredict family report --measured training_data/measured/family --predicted /work/family_runs
    """
    import polars as pl

    from predictor.family.report import build_family_table, predicted_kld_table

    if runs:
        imatrix_dir = Path(measured) / "imatrix" if measured else None
        df = predicted_kld_table(records, runs, imatrix=imatrix, imatrix_dir=imatrix_dir, measured_dir=measured,
                                 progress=lambda n: click.echo(f"predicting {n}", err=True))
    else:
        df = build_family_table(records, measured, imatrix=imatrix)
    if fmt == "csv":
        click.echo(df.write_csv(), nl=False)
    elif fmt == "json":
        click.echo(json.dumps(df.to_dicts(), indent=1))
    else:
        with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_width_chars=250, float_precision=4,
                       tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True):
            click.echo(str(df))


@command.command("probe")
@click.argument("gguf", type=click.Path(exists=True, dir_okay=False))
@click.option("--model-id", required=True, help="Name written on every row (e.g. fam-xs-tp8).")
@click.option("--imatrix", type=click.Path(exists=True, dir_okay=False),
              help="Also probe every preset quantized with this imatrix.")
@click.option("-p", "--preset", "presets", multiple=True,
              help="Preset(s) without imatrix (default: Q8_0 Q5_K_M Q4_K_M Q3_K_M Q2_K).")
@click.option("--imatrix-preset", "imatrix_presets", multiple=True,
              help="Preset(s) with --imatrix (default: Q2_K IQ2_XXS IQ1_S, into collapse).")
@click.option("--math-items", default=200, show_default=True, help="Held-out problems scored.")
@click.option("-o", "--out", "out_csv", type=click.Path(dir_okay=False), required=True,
              help="CSV to append the rows to (created with a header if missing; the model's old rows replaced).")
def probe_cmd(gguf, model_id, imatrix, presets, imatrix_presets, math_items, out_csv):
    """Math accuracy (teacher-forced answers) and prose/code KLD at each preset, one forward pass.

    For models too small to solve `measure`'s arithmetic; see predictor/family/probe.py.

    \b
    Example:
      quantpredict family probe runs/fam-xs-tp8/model.gguf --model-id fam-xs-tp8 \\
          --imatrix training_data/measured/family/imatrix/fam-xs-tp8.imatrix.gguf \\
          -o training_data/measured/family/math_probe.csv
    """
    from predictor.family.probe import PROBE_IMATRIX_PRESETS, PROBE_PRESETS, probe_model, write_probe_rows

    rows = probe_model(gguf, presets=presets or PROBE_PRESETS, imatrix_path=imatrix, n_math=math_items,
                       imatrix_presets=imatrix_presets or PROBE_IMATRIX_PRESETS,
                       progress=lambda s: _echo_err(f"probe {model_id}: {s}"))
    write_probe_rows(out_csv, model_id, rows)
    click.echo(f"{len(rows)} rows for {model_id} -> {out_csv}")
