"""Model cards for converted / healed checkpoints, generated with `huggingface_hub.ModelCard`."""

import os

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..configuration_sparse_gpt2 import SPARSE_KNOBS
from .budget import flops_by_component

TEMPLATE = os.path.join(os.path.dirname(__file__), "templates", "model_card.md")


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def flops_table(model, seq_len: int) -> str:
    """Per component, summed over blocks: FLOPs of one sequence and share of the dense MLP."""
    report = model.flops_report(batch_size=1, seq_len=seq_len)
    dense = report["FLOPs/ffn_dense_equivalent"]
    rows = [(c, f"{v:,}", f"{v / dense:.4f}") for c, v in flops_by_component(model, 1, seq_len).items()]
    rows.append(("**sparse FFN total**", f"{report['FLOPs/ffn_total']:,}", f"{report['FLOPs/ffn_ratio']:.4f}"))
    rows.append(("dense GPT-2 MLP", f"{dense:,}", "1.0000"))
    rows.append(("elementwise (apart)", f"{report['ElementwiseFLOPs/ffn_total']:,}", f"{report['ElementwiseFLOPs/ffn_total'] / dense:.4f}"))
    return _table(["component", "FLOPs", "ratio to dense MLP"], rows)


def _value(value) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def knob_rows(config) -> list[tuple[str, str, str]]:
    """(knob, value used, what it does) for the FFN-wide knobs and those of the components in use:
    the values the layers are built with (None resolved), one value or one per layer."""
    rows = []
    for knob in SPARSE_KNOBS:
        layers = [i for i in range(config.n_layer) if knob.component in (None, *config.layer_spec(i).components)]
        if not layers:
            continue
        used = []
        for i in layers:
            value = knob.resolved(config, i)
            if knob.kind == "ratio":  # the ratio given, and the count it resolves to
                value = f"{config.knob(knob.name, i):.4g} ({value} {knob.spec_field.split('_', 1)[1]})"
            used.append(_value(value))
        text = used[0] if len(set(used)) == 1 else "; ".join(f"layer {i}: {v}" for i, v in zip(layers, used))
        rows.append((knob.name, f"`{text}`" if len(set(used)) == 1 else text, knob.help))
    return rows


def make_model_card(model, base_model: str, perplexities: dict, seq_len: int, dataset: str | None = None,
                    repo_id: str | None = None, provenance: str = "", perplexity_note: str = "",
                    base_model_name: str | None = None) -> ModelCard:
    """``perplexities``: {"dense": ppl, "converted": ppl, "healed": ppl} (missing ones are skipped).

    ``base_model`` goes into the metadata only when it is a Hub id (not a local folder);
    ``base_model_name`` is how the text names it (default: ``base_model``).
    """
    config = model.config
    report = model.flops_report(batch_size=1, seq_len=seq_len)
    name = repo_id or "sparse-gpt2"
    own = perplexities.get("healed", perplexities.get("converted"))
    eval_results = None
    if own is not None:
        eval_results = [EvalResult(task_type="text-generation", dataset_type=dataset or "custom", dataset_name=dataset or "held-out text",
                                   metric_type="perplexity", metric_value=round(float(own), 4))]
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        base_model=base_model if base_model and not os.path.isdir(base_model) else None,
        tags=["sparse-gpt2", "gpt2", "sparse", "ultra-efficient-sparse-ffn", "distillation"],
        datasets=[dataset] if dataset and not os.path.exists(dataset) else None,
        license="apache-2.0",
        model_name=name,
        eval_results=eval_results,
    )
    ppl_rows = [(k, f"{v:.3f}") for k, v in perplexities.items() if v is not None]
    comps = sorted({c for i in range(config.n_layer) for c in config.layer_spec(i).components})
    return ModelCard.from_template(
        card_data,
        template_path=TEMPLATE,
        model_name=name,
        base_model=base_model_name or f"`{base_model}`",
        components=", ".join(comps),
        ffn_ratio_pct=f"{100 * report['FLOPs/ffn_ratio']:.1f}%",
        context_length=config.n_positions,
        perplexity_table=_table(["model", "perplexity"], ppl_rows) if ppl_rows else "not measured",
        perplexity_note=perplexity_note,
        seq_len=seq_len,
        flops_table=flops_table(model, seq_len),
        knobs_table=_table(["knob", "value used", "what it does"], knob_rows(config)),
        repo_id=repo_id or "path/to/this/folder",
        provenance=provenance,
    )
