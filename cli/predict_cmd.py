"""`quantpredict predict MODEL` (also `quantpredict MODEL`), `quantpredict train`, `quantpredict validate`."""

from __future__ import annotations

import csv
import io
import json

import click

from cli.progress import stderr_progress
from predictor.model.predict import DEFAULT_TOLERANCE, KV_BYTES_PER_ELEMENT, TASKS, plot_predictions, predict

GIB = 2**30


def _imatrix_arg(value: str | None):
    if value is None:
        return None
    low = value.strip().lower()
    if low in ("yes", "true", "1"):
        return True
    if low in ("no", "false", "0"):
        return None
    return value


VERDICT_LEGEND = ("verdicts: 'indistinguishable from baseline' = the true-drop interval lies inside your benchmark's "
                  "noise; 'likely within noise' = the point is; minor < 5% < noticeable < 15% < severe; "
                  "'collapse risk' = KLD >= 1 nat (gibberish)")


def render_table(result) -> str:
    m, b = result.model, result.benchmark
    head = (f"{m.get('name') or m['path']}  ({m.get('architecture')}, {m['params_b']:.2f}B params, "
            f"family {m.get('family') or 'unknown'}, tier {result.tier}, task {result.task})")
    bench = (f"your benchmark: {b.get('name') or result.task}, {b.get('n_items')} items, noise ±{b.get('noise_halfwidth_pp', 0):.1f} pp"
             if b else "")
    lines = [head, "drop = % of the baseline score (relative, positive = worse); true = 80% interval of the true drop; "
                   f"bench = 80% interval of what {bench or 'a benchmark'} would measure; KLD = predicted mean "
                   "KL divergence (nats/token); memory = weights + KV cache + 512 MiB runtime"]
    cols = ["preset", "GiB", "bpw", "memory GiB", "KLD", "drop %", "true 80%", "bench 80%", "fits", "verdict"]
    rows = []
    for p in result.predictions:
        rows.append([p.preset, f"{p.tensor_bytes / GIB:.2f}", f"{p.bits_per_weight:.2f}",
                     f"{p.memory_bytes / GIB:.2f}" if p.memory_bytes else "–", f"{p.kld:.4f}", f"{p.drop_pct:.1f}",
                     f"{p.drop_true_low:.1f} .. {p.drop_true_high:.1f}", f"{p.drop_low:.1f} .. {p.drop_high:.1f}",
                     "–" if p.fits is None else ("yes" if p.fits else "no"), p.verdict])
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    lines.append("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        lines.append("  ".join(v.ljust(w) for v, w in zip(r, widths)))
    rec = result.recommendation
    lines.append(f"recommendation: {rec.preset or 'none'} — {rec.reason}")
    if rec.preset is None and m.get("memory_budget_bytes") and result.predictions:
        small = min(result.predictions, key=lambda p: p.memory_bytes or p.tensor_bytes)
        lines.append(f"  smallest preset {small.preset} needs {small.memory_bytes / GIB:.2f} GiB against a budget of "
                     f"{m['memory_budget_bytes'] / GIB:.2f} GiB (KV cache {(m.get('kv_cache_bytes') or 0) / GIB:.2f} GiB "
                     f"at {m.get('context')} tokens): a shorter --context or --kv-type q8_0 shrinks the cache")
    lines.append(VERDICT_LEGEND)
    for note in result.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def render_csv(results) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["task", "tier", "preset", "drop_pct", "drop_low", "drop_high", "drop_true_low", "drop_true_high",
                "kld", "tensor_bytes", "memory_bytes", "bits_per_weight", "fits", "verdict", "recommended"])
    for r in results:
        for p in r.predictions:
            w.writerow([r.task, r.tier, p.preset, p.drop_pct, p.drop_low, p.drop_high, p.drop_true_low,
                        p.drop_true_high, p.kld, p.tensor_bytes, p.memory_bytes, p.bits_per_weight,
                        "" if p.fits is None else p.fits, p.verdict, p.preset == r.recommendation.preset])
    return buf.getvalue()


@click.command("predict")
@click.argument("model", type=click.Path(exists=True))
@click.option("--task", "-t", default="math", show_default=True,
              help=f"Task category ({', '.join(TASKS)}, all) or a benchmark name (gsm8k, mmlu, humaneval, ifeval, ...).")
@click.option("--bench-n", type=click.IntRange(min=1),
              help="Items in the benchmark you would measure with [default: the task's standard test size].")
@click.option("--imatrix", help="llama.cpp imatrix file (.gguf/.dat), or 'yes' to assume one will be used.")
@click.option("--memory", help="Memory budget for weights + KV cache, e.g. 8GB (GB = GiB).")
@click.option("--context", type=int, help="Context length for the KV cache [default: 4096].")
@click.option("--kv-type", type=click.Choice(list(KV_BYTES_PER_ELEMENT)), default="f16", show_default=True)
@click.option("--tolerance", type=float, default=DEFAULT_TOLERANCE, show_default=True,
              help="Largest acceptable predicted relative drop (%) for the recommendation.")
@click.option("--train-tokens", type=float, help="Pre-training tokens in trillions (if the registry lacks them).")
@click.option("--model-dir", type=click.Path(file_okay=False), help="Trained predictor [default: models/default].")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
@click.option("--plot", type=click.Path(dir_okay=False), help="Also draw predicted drop vs file size to FILE.png.")
def command(model, task, bench_n, imatrix, memory, context, kv_type, tolerance, train_tokens, model_dir, fmt, plot):
    """Predict the accuracy drop of MODEL at every llama.cpp preset and recommend one.

    MODEL: a safetensors file, a model folder, a GGUF, or just a config.json.

    \b
    Examples:
      quantpredict examples/Meta-Llama-3-8B-Instruct/config.json --task math --memory 8GB
      quantpredict predict ./Qwen3-8B/ --task all --imatrix imatrix.gguf --format json
      quantpredict config.json --task gsm8k --bench-n 250
    """
    res = predict(model, task=task, bench_n=bench_n, imatrix=_imatrix_arg(imatrix), memory=memory, context=context,
                  kv_type=kv_type, tolerance=tolerance, train_tokens=train_tokens, model_dir=model_dir,
                  progress=stderr_progress("reading weights"))
    results = res if isinstance(res, list) else [res]
    if fmt == "json":
        obj = [r.as_dict() for r in results] if isinstance(res, list) else res.as_dict()
        click.echo(json.dumps(obj, indent=1))
    elif fmt == "csv":
        click.echo(render_csv(results), nl=False)
    else:
        click.echo("\n\n".join(render_table(r) for r in results))
    if plot:
        path = plot_predictions(results, plot)
        click.echo(f"plot written to {path}", err=True)


@click.command("train")
@click.option("--training-data", type=click.Path(file_okay=False, exists=True),
              help="training_data folder [default: the repository's].")
@click.option("--out", "-o", default="models/default", show_default=True, type=click.Path(file_okay=False))
@click.option("--no-validate", is_flag=True, help="Skip grouped CV (no metrics; intervals from training residuals, flagged in the card).")
def train_command(training_data, out, no_validate):
    """Fit the predictor on training_data/ and write models/default (deterministic).

    \b
    Example:
      quantpredict train -o models/default
    """
    from predictor.model.train import train

    path = train(training_data, out, validate=not no_validate,
                 progress=lambda msg: click.echo(msg, err=True))
    click.echo(f"model written to {path}")


@click.command("validate")
@click.option("--model-dir", type=click.Path(file_okay=False, exists=True), help="[default: models/default]")
@click.option("--training-data", type=click.Path(file_okay=False, exists=True))
@click.option("--out", "-o", default="validation_report", show_default=True, type=click.Path(file_okay=False))
def validate_command(model_dir, training_data, out):
    """Grouped cross-validation (whole models / whole families held out) against the baselines;
    writes REPORT.md and PNG plots.

    \b
    Example:
      quantpredict validate --model-dir models/default -o validation_report
    """
    from predictor.model.validate import write_report

    path = write_report(model_dir, out, training_data, progress=lambda msg: click.echo(msg, err=True))
    click.echo(f"report written to {path / 'REPORT.md'}")


commands = [command, train_command, validate_command]
