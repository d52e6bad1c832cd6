"""`quantpredict measure`: quantize a model with each preset, run it with llama.cpp, record the damage."""

from __future__ import annotations

import json

import click

from predictor.measure.sweep import MeasureConfig, measure
from predictor.measure.tasks import SUITES


@click.command("measure")
@click.argument("base", type=click.Path(exists=True, dir_okay=False))
@click.option("--preset", "-p", "presets", multiple=True,
              help="Preset(s) to measure (default: the 16 standard presets Q2_K..Q8_0, IQ4_NL, IQ4_XS).")
@click.option("--imatrix", type=click.Path(exists=True, dir_okay=False),
              help="llama.cpp imatrix; each preset is then measured with it and without it.")
@click.option("--imatrix-only", is_flag=True, help="With --imatrix: skip the runs without it.")
@click.option("--make-imatrix", is_flag=True,
              help="Without --imatrix: compute one with our own forward pass (llama/gemma3) and measure with it too.")
@click.option("--imatrix-text", type=click.Path(exists=True, dir_okay=False),
              help="Calibration text for --make-imatrix (default: held-out passages of the eval items).")
@click.option("--suite", type=click.Choice(list(SUITES)), default="standard", show_default=True,
              help="How many evaluation items each run uses.")
@click.option("--ablate", "ablate", multiple=True,
              help="Tensor group to ablate (a role such as attn_v, or layers_0-9); 'all' for every group.")
@click.option("--ablation-type", default="Q4_0", show_default=True, help="GGML type of the ablated group.")
@click.option("--no-presets", is_flag=True, help="Run only the ablations.")
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), default="measured", show_default=True,
              help="Folder for the result tables and per-run JSON (resumable: finished runs are skipped).")
@click.option("--work-dir", type=click.Path(file_okay=False), help="Folder for big files (default OUT/work).")
@click.option("--model-id", help="Canonical model id written on every row (default: the GGUF's general.name).")
@click.option("--base-note", default="", help="Where the base weights came from, recorded on every row.")
@click.option("--threads", default=1, show_default=True,
              help="CPU threads for llama.cpp (more than the free cores makes it much slower, not faster).")
@click.option("--keep-gguf", is_flag=True, help="Keep the quantized GGUF files in the work folder.")
def command(base, presets, imatrix, imatrix_only, make_imatrix, imatrix_text, suite, ablate, ablation_type, no_presets, out_dir, work_dir,
            model_id, base_note, threads, keep_gguf):
    """Measure KLD, top-1 agreement, PPL and task accuracy of BASE quantized with each preset.

    BASE is a GGUF model llama.cpp can run. A quantized GGUF is dequantized to F32 first and that is
    the reference. Needs llama-cpp-python: pip install 'quantpredict[measure]'.

    \b
    Example:
      quantpredict measure SmolLM2-135M-Instruct.Q4_1.gguf --imatrix imatrix.gguf \\
          -p Q4_K_M -p Q8_0 --ablate all -o training_data/measured --work-dir /tmp/measure
    """
    from predictor.quant.recipes import STANDARD_PRESETS

    cfg = MeasureConfig(
        base=base, out_dir=out_dir, presets=[] if no_presets else (list(presets) or list(STANDARD_PRESETS)),
        imatrix=imatrix, without_imatrix=not imatrix_only, suite=suite, ablate=list(ablate),
        ablation_type=ablation_type, work_dir=work_dir, model_id=model_id, base_note=base_note, threads=threads,
        keep_gguf=keep_gguf, make_imatrix=make_imatrix, imatrix_text=imatrix_text,
    )
    summary = measure(cfg)
    click.echo(json.dumps(summary, indent=1))
