"""The main job: dense GPT-2 -> sparse GPT-2, healed briefly, measured, saved with its model card.

    sparse-gpt2                      # offline, on the small dense GPT-2 embedded in the package
    sparse-gpt2 run --model_name_or_path gpt2 --dataset_name wikitext --dataset_config_name wikitext-2-raw-v1

Steps (those of ``commands``): load dense -> perplexity -> convert (calibration) -> perplexity ->
heal (distillation) -> perplexity -> print the FLOPs, perplexity and forward-throughput tables ->
save checkpoint + model card (atomically).
"""

import os
import sys
import tempfile
import time
from dataclasses import dataclass, field

from transformers import set_seed

from .checkpoints import (
    DEFAULT_CALIBRATION,
    DEFAULT_MODEL,
    DEFAULT_VALIDATION,
    atomic_output_dir,
    check_output_dir,
    load_causal_lm,
    load_tokenizer,
    save_json,
    save_model_and_tokenizer,
)
from .budget import flops_by_component
from .commands import convert_model, heal_model, healing_training_arguments
from .data import block_size_for, load_split, token_stream, tokenize_blocks
from .evaluation import forward_throughput, perplexity
from .model_card import make_model_card


@dataclass
class MainJobArguments:
    model_name_or_path: str = field(default=DEFAULT_MODEL, metadata={"help": "Dense GPT-2 to convert: Hub id or folder; default: the small one embedded in the package."})
    output_dir: str = field(default="sparse-gpt2-out", metadata={"help": "Folder the sparse checkpoint is written to (atomically)."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an existing non-empty --output_dir."})
    heal_steps: int = field(default=100, metadata={"help": "Distillation steps (0: no healing)."})
    heal_batch_size: int = field(default=8, metadata={"help": "Sequences of --block_size tokens per healing step."})
    heal_learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate of the cosine healing schedule."})
    eval_stride: int | None = field(default=None, metadata={"help": "Perplexity window stride, 1 .. --block_size; default --block_size."})
    max_eval_tokens: int | None = field(default=None, metadata={"help": "Score only the first N held-out tokens (default: all)."})
    throughput_batch_size: int = field(default=4, metadata={"help": "Sequences per timed forward pass of the throughput table (0: skip it)."})
    seed: int = field(default=0, metadata={"help": "Seed of the healing run (data order, dropout)."})


def _fmt_table(header, rows):
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def summary_tables(model, seq_len: int, ppl: dict, throughput: dict | None = None) -> str:
    """FLOPs per component, perplexity per model and (if measured) forward tokens/s per model, as text tables."""
    report = model.flops_report(batch_size=1, seq_len=seq_len)
    dense = report["FLOPs/ffn_dense_equivalent"]
    rows = [(c, f"{v:,}", f"{v / dense:.4f}") for c, v in flops_by_component(model, 1, seq_len).items()]
    rows += [("sparse FFN total", f"{report['FLOPs/ffn_total']:,}", f"{report['FLOPs/ffn_ratio']:.4f}"), ("dense MLP", f"{dense:,}", "1.0000")]
    flops = _fmt_table(("FFN FLOPs per sequence", "FLOPs", "/ dense"), rows)
    base = ppl["dense"]["perplexity"]
    prow = [(k, f"{v['perplexity']:.3f}", f"{v['perplexity'] / base:.3f}") for k, v in ppl.items()]
    tables = [flops, _fmt_table(("model", "perplexity", "/ dense"), prow)]
    if throughput:
        b = throughput["dense"]
        shape = f"forward tokens/s ({b['batch_size']} x {b['seq_len']})"
        trow = [(k, f"{v['tokens_per_s']:,.0f}", f"{v['tokens_per_s'] / b['tokens_per_s']:.2f}") for k, v in throughput.items()]
        tables.append(_fmt_table(("model", shape, "/ dense"), trow))
    return "\n\n".join(tables)


def _layer_progress(n_layer: int, log):
    """A ``progress`` callback for the conversion: its messages as log lines, and a bar over the layers on a terminal."""
    from tqdm.auto import tqdm

    bar = tqdm(total=n_layer, desc="converting layers", unit="layer", disable=not sys.stderr.isatty(), leave=False)

    def progress(message):
        (tqdm.write if not bar.disable else log)("  " + message)
        if message.startswith("layer "):
            bar.update(1)
            if bar.n == n_layer:
                bar.close()

    return progress


def run_main_job(job: MainJobArguments, data, conv, distill, log=print) -> dict:
    start = time.time()
    set_seed(job.seed)
    local_default = data.dataset_name is None and data.calibration_file is None
    if local_default:
        data.calibration_file = DEFAULT_CALIBRATION
        data.validation_file = data.validation_file or DEFAULT_VALIDATION
    check_output_dir(job.output_dir, job.overwrite_output_dir)  # fail before any work

    log(f"[1/6] loading dense model {job.model_name_or_path}")
    dense = load_causal_lm(job.model_name_or_path, expect="gpt2").eval()
    tokenizer = load_tokenizer(job.model_name_or_path)
    block = block_size_for(dense.config, data.block_size)

    log("[2/6] reading calibration, healing and held-out text")
    if not (data.dataset_name or data.validation_file):
        raise ValueError("give --validation_file (held-out text for perplexity) or --dataset_name")
    args = (data.dataset_name, data.dataset_config_name)
    calib_texts = load_split(data.calibration_file, *args, "train", data.text_column)
    train_texts = load_split(data.train_file, *args, "train", data.text_column, file_flag="--train_file") if data.train_file else calib_texts
    val_texts = load_split(data.validation_file, *args, "validation", data.text_column, file_flag="--validation_file")
    calib = tokenize_blocks(calib_texts, tokenizer, block, data.num_calibration_samples, source=data.calibration_file or data.dataset_name)
    if len(calib) < data.num_calibration_samples:
        log(f"  note: only {len(calib)} calibration sequences of {block} tokens available (asked {data.num_calibration_samples})")
    train_blocks = tokenize_blocks(train_texts, tokenizer, block, max(job.heal_steps * job.heal_batch_size, 1), source="healing text")
    val = token_stream(val_texts, tokenizer)
    if job.max_eval_tokens:
        val = val[: job.max_eval_tokens]

    stride = job.eval_stride or block
    ppl = {"dense": perplexity(dense, val, block, stride)}
    log(f"  dense perplexity {ppl['dense']['perplexity']:.3f} ({ppl['dense']['tokens_scored']} tokens, {ppl['dense']['windowing']})")

    log(f"[3/6] converting at ffn_flops_ratio={conv.ffn_flops_ratio} on {calib.numel()} calibration tokens")
    sparse, conversion_report = convert_model(dense, calib, conv, log=_layer_progress(dense.config.n_layer, log))
    ppl["converted"] = perplexity(sparse, val, block, stride)
    log(f"  converted perplexity {ppl['converted']['perplexity']:.3f}")

    heal_log = []
    if job.heal_steps > 0:
        log(f"[4/6] healing: {job.heal_steps} distillation steps of {job.heal_batch_size} x {block} tokens")
        with tempfile.TemporaryDirectory() as work:  # the Trainer's scratch folder; nothing is saved there
            training_args = healing_training_arguments(work, job.heal_steps, job.heal_batch_size, job.heal_learning_rate, job.seed)
            trainer = heal_model(sparse.train(), dense, train_blocks, None, training_args, distill)
            heal_log = trainer.state.log_history
        sparse = sparse.float().eval()
        ppl["healed"] = perplexity(sparse, val, block, stride)
        log(f"  healed perplexity {ppl['healed']['perplexity']:.3f}")

    log("[5/6] results")
    throughput = None
    if job.throughput_batch_size > 0:
        n = min(job.throughput_batch_size, len(val) // block)
        if n > 0:
            batch = val[: n * block].view(n, block)
            throughput = {"dense": forward_throughput(dense, batch), "sparse": forward_throughput(sparse, batch)}
    report = sparse.flops_report(batch_size=1, seq_len=block)
    log(summary_tables(sparse, block, ppl, throughput))

    log(f"[6/6] saving the sparse checkpoint to {job.output_dir}")
    results = {
        "base_model": job.model_name_or_path, "block_size": block, "perplexity": ppl, "flops": report, "forward_throughput": throughput,
        "conversion": conversion_report, "healing_log": heal_log, "wall_s": round(time.time() - start, 1),
    }
    dataset_label = data.dataset_name or os.path.basename(data.validation_file or "")
    with atomic_output_dir(job.output_dir, job.overwrite_output_dir) as tmp:
        save_model_and_tokenizer(tmp, sparse, tokenizer)
        card = make_model_card(
            sparse, base_model=job.model_name_or_path,
            base_model_name="the small dense GPT-2 embedded in the package (trained on the Python docs)" if local_default else None,
            perplexities={k: v["perplexity"] for k, v in ppl.items()}, seq_len=block, dataset=data.dataset_name,
            perplexity_note=f"Held-out text: {dataset_label}; {ppl['dense']['windowing']}; {ppl['dense']['tokens_scored']} tokens scored.",
            provenance=(
                f"Converted with `convert_gpt2_to_sparse` at `ffn_flops_ratio={conv.ffn_flops_ratio}` on "
                f"{conversion_report['calibration_tokens']} calibration tokens, then healed for {job.heal_steps} "
                f"distillation steps of {job.heal_batch_size} x {block} tokens (T={distill.temperature}, alpha_kl={distill.alpha_kl})."
            ),
        )
        card.save(os.path.join(tmp, "README.md"))
        save_json(os.path.join(tmp, "sparse_gpt2_results.json"), results)
    results["wall_s"] = round(time.time() - start, 1)
    log(f"done in {results['wall_s']} s")
    return results


def main(argv=None):
    """``sparse-gpt2 run``: the main job (kept as an entry point of its own for old callers)."""
    from .cli import main as cli_main

    return cli_main(["run", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
