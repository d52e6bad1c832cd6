"""`quantpredict inspect`: sizes, tensor types and simulated weight error per preset."""

from __future__ import annotations

import json

import click

from cli.progress import stderr_progress
from predictor.api import inspect_model
from predictor.features.weight_error import DEFAULT_SAMPLE_WEIGHTS

ROLE_COLUMNS = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "token_embd", "output"]


@click.command("inspect")
@click.argument("model", type=click.Path(exists=True))
@click.option("--imatrix", type=click.Path(exists=True, dir_okay=False), help="llama.cpp imatrix (.gguf or .dat).")
@click.option("--preset", "-p", "presets", multiple=True, help="Preset(s) to show (default: Q2_K..Q8_0, IQ4_NL, IQ4_XS).")
@click.option("--exact", is_flag=True, help="Quantize every row instead of a seeded sample (slow).")
@click.option("--sample-weights", default=DEFAULT_SAMPLE_WEIGHTS, show_default=True, help="Weights sampled per tensor.")
@click.option("--seed", default=0, show_default=True, help="Seed of the row sample.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--tensors", "show_tensors", is_flag=True, help="With --format json: include per-tensor statistics.")
def command(model, imatrix, presets, exact, sample_weights, seed, fmt, show_tensors):
    """Show what each llama.cpp preset would do to MODEL's tensors.

    MODEL is a safetensors file, a sharded model folder or a GGUF file.

    \b
    Example:
      quantpredict inspect ./Llama-3-8B/ --imatrix imatrix.gguf -p Q4_K_M -p Q3_K_M
    """
    report = inspect_model(
        model,
        imatrix=imatrix,
        presets=list(presets) or None,
        exact=exact,
        sample_weights=sample_weights,
        seed=seed,
        progress=stderr_progress("sampling tensors"),
    )
    if fmt == "json":
        d = report.as_dict()
        if not show_tensors:
            d.pop("tensor_stats")
        click.echo(json.dumps(d, indent=1))
        return
    click.echo(render_table(report))


def render_table(report) -> str:
    m = report.model
    lines = [
        f"model      {m['path']}",
        f"arch       {m.get('architecture')}  layers {m.get('n_layers')}  hidden {m.get('hidden_size')}  "
        f"ffn {m.get('ffn_size')}  heads {m.get('n_heads')}/{m.get('n_kv_heads')}  vocab {m.get('vocab_size')}  "
        f"tied {m.get('tied_embeddings')}",
        f"params     {m.get('n_params'):,}  tensors {m['n_tensors']}  source types {m['source_types']}",
    ]
    if m.get("unmapped_tensors"):
        lines.append(f"unmapped   {len(m['unmapped_tensors'])} tensor names not recognised: "
                     f"{', '.join(m['unmapped_tensors'][:5])}")
    sampling = "exact (all rows)" if report.exact else f"sampled, {report.sample_weights} weights/tensor, seed {report.seed}"
    lines.append(f"imatrix    {report.imatrix or 'none'}   error: {sampling}   ({report.seconds:.1f} s)")
    lines.append("")
    roles = [r for r in ROLE_COLUMNS if any(r in (p.as_dict().get("by_role") or {}) for p in report.presets)]
    header = f"{'preset':<8} {'GiB':>7} {'bpw':>6} {'rel_rmse':>9} {'±se':>7}"
    if report.imatrix:
        header += f" {'w_rmse':>7}"
    header += "".join(f" {r:>11}" for r in roles)
    lines.append(header)
    for p in report.presets:
        d = p.as_dict()
        if d["rel_rmse"] is None:
            lines.append(f"{d['preset']:<8} {d['gib']:>7.3f} {d['bits_per_weight']:>6.3f}  {d['note']}")
            continue
        row = f"{d['preset']:<8} {d['gib']:>7.3f} {d['bits_per_weight']:>6.3f} {d['rel_rmse']:>9.5f} {d['rel_rmse_se']:>7.5f}"
        if report.imatrix:
            w = d["weighted_rel_rmse"]
            row += f" {w:>7.5f}" if w is not None else f" {'-':>7}"
        for r in roles:
            v = d["by_role"].get(r)
            row += f" {v['rel_rmse']:>11.5f}" if v else f" {'-':>11}"
        lines.append(row)
    lines.append("")
    lines.append("rel_rmse = sqrt(sum (x_q - x)^2 / sum x^2) over all quantized weights; per-role columns likewise.")
    return "\n".join(lines)
