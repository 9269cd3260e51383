"""GPT-2 end to end: training step and prefill of dense, sparse and the ideal, eager and compiled.

    python -m benchmarks.bench_e2e --output docs/benchmarks/results/e2e_h200.json   # GPU: GPT-2 small, bf16
    python -m benchmarks.bench_e2e --tiny --device cpu --output /tmp/e2e.json       # smoke run, seconds

Models (``harness.build_models``, random weights): dense GPT-2 small (d=768, 12 layers, 12 heads,
vocabulary 50,257, 1,024 positions), the sparse model at each ``--ratios`` FFN FLOPs target
and the ideal (plain GPT-2, ``n_inner`` = the sparse FFN's fused width).

* ``train``: one training step (forward, loss, backward, AdamW step) on ``--train-tokens``
  (16 x 1,024), fp32 master weights under bf16 autocast; tokens/s and peak GPU memory.
* ``prefill``: a no-grad forward of ``--prefill-tokens`` (8 x 1,024) in bf16 weights, no KV cache,
  logits of the last position only.

Both ``eager`` and ``compile`` (each transformer block compiled, regional compilation; ``--compile-scope
model`` compiles the whole model). Medians after a settled warm-up, ratios to dense and to the ideal
of the same run in each row. On GPU each row runs in a fresh process (``--isolation process``): both
stages are bound by the host at these sizes, and in one process the models' times depended on what
ran before them.
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from . import harness as H

SECTION = "e2e"
STAGES = ("train", "prefill")


def parser(description: str = __doc__.split("\n\n")[0]) -> argparse.ArgumentParser:
    """The flags of this benchmark (``profile_step`` adds its own to them)."""
    p = argparse.ArgumentParser(description=description)
    H.add_common_args(p, output=f"{H.RESULTS_DIR}/e2e.json")
    p.add_argument("--ratios", default=None, help="FFN FLOPs targets of the sparse model (default 0.4)")
    p.add_argument("--stages", default=None, help=f"comma list of {','.join(STAGES)} (default both)")
    p.add_argument("--modes", default=None, help="eager,compile (default GPU both; CPU eager)")
    p.add_argument("--compile-scope", default="blocks", choices=["blocks", "model"])
    p.add_argument("--train-tokens", default=None, help="batch x seq of a training step (default 16x1024)")
    p.add_argument("--prefill-tokens", default=None, help="batch x seq of a prefill (default 8x1024)")
    H.add_isolation_arg(p, "time")
    return p


def parse_args(argv=None):
    return parser().parse_args(argv)


def tokens_arg(text: str, flag: str) -> tuple:
    try:
        batch, seq = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"{flag}: expected BATCHxSEQ such as 8x1024, got {text!r}") from None
    return batch, seq


def settings(args) -> dict:
    S = H.common_settings(args, budget_s=540.0)
    stages = H.csv(args.stages) or list(STAGES)
    modes = H.csv(args.modes) or (["eager", "compile"] if S["gpu"] else ["eager"])
    for flag, chosen, allowed in (("--stages", stages, STAGES), ("--modes", modes, ("eager", "compile"))):
        if set(chosen) - set(allowed):
            raise SystemExit(f"{flag}: unknown {sorted(set(chosen) - set(allowed))}; choose from {','.join(allowed)}")
    S.update(model=H.TINY if args.tiny else H.GPT2_SMALL, ratios=H.csv(args.ratios, float) or [0.4],
             stages=stages, modes=modes, compile_scope=args.compile_scope,
             train_tokens=tokens_arg(args.train_tokens or ("2x16" if args.tiny else "16x1024"), "--train-tokens"),
             prefill_tokens=tokens_arg(args.prefill_tokens or ("2x16" if args.tiny else "8x1024"), "--prefill-tokens"),
             train_precision="fp32 weights, autocast to dtype" if S["dtype"] != "fp32" else "fp32",
             optimizer="torch.optim.AdamW(lr=1e-4, fused on CUDA)", isolation=H.isolation(args, S))
    return S


def autocast(S):
    if S["dtype"] != "fp32":
        return torch.autocast(device_type=torch.device(S["device"]).type, dtype=H.DTYPES[S["dtype"]])
    return contextlib.nullcontext()


@contextlib.contextmanager
def compiled(model, S, enabled: bool):
    """The model's forward under ``torch.compile``: each block (regional) or the whole model."""
    if not enabled:
        yield model
        return
    H.reset_compiler()
    if S["compile_scope"] == "model":
        yield torch.compile(model)
        return
    blocks = list(model.transformer.h)
    for block in blocks:
        block.compile()
    try:
        yield model
    finally:
        for block in blocks:
            block._compiled_call_impl = None


def train_step(model, fwd, S):
    """``(step, optimizer)``: one training step of ``model`` (its forward: ``fwd``) on ``S["train_tokens"]``
    random tokens: forward under autocast, loss, backward, AdamW step."""
    batch, seq = S["train_tokens"]
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=S["device"])
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=S["gpu"] or None)

    def step():
        with autocast(S):
            loss = fwd(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, opt


def prefill_call(model, fwd, S):
    """A no-grad prefill of ``S["prefill_tokens"]`` random tokens (no KV cache, the last position's logits)."""
    batch, seq = S["prefill_tokens"]
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=S["device"])

    @torch.no_grad()
    def prefill():
        return fwd(input_ids=ids, use_cache=False, logits_to_keep=1).logits

    return prefill


def measure_train(model, S, compile_: bool) -> dict:
    batch, seq = S["train_tokens"]
    with compiled(model, S, compile_) as fwd:
        step, opt = train_step(model, fwd, S)
        out = dict(first_call_s=H.first_call_s(step, S))
        if S["gpu"]:
            torch.cuda.reset_peak_memory_stats()
        out.update(H.time_fn(step, S, min_sample_ms=0.0))
        out["gpu_kernel_ms"] = H.gpu_kernel_ms(step, S, calls=2)
    if S["gpu"]:
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del opt
    model.zero_grad(set_to_none=True)
    out["tokens_per_s"] = batch * seq / out["median_ms"] * 1e3
    return out


def measure_prefill(model, S, compile_: bool) -> dict:
    batch, seq = S["prefill_tokens"]
    with compiled(model, S, compile_) as fwd:
        prefill = prefill_call(model, fwd, S)
        out = dict(first_call_s=H.first_call_s(prefill, S))
        out.update(H.time_fn(prefill, S, min_sample_ms=0.0))
        out["gpu_kernel_ms"] = H.gpu_kernel_ms(prefill, S)
    out["tokens_per_s"] = batch * seq / out["median_ms"] * 1e3
    return out


def _isolated_worker(S, target, kind, stage, compile_):
    model = H.model_in_fresh_process(S, target, kind)
    if stage == "train":
        return measure_train(model, S, compile_)
    return measure_prefill(H.inference_copy(model, S), S, compile_)


def bench(S: dict, results: H.Results, section: str = SECTION):
    rows = results.section(section, S)
    for target, kinds, models, info in H.models_per_target(S, results, section):
        infer = {kind: H.inference_copy(m, S) for kind, m in models.items()} if "prefill" in S["stages"] and not S["isolation"] else {}
        for stage in S["stages"]:
            for mode in S["modes"]:
                for kind in kinds:
                    row = dict(stage=stage, mode=mode, kind=kind, target=None if kind == "dense" else target,
                               ffn_flops_ratio=info[kind]["ffn_flops_ratio"])
                    if S["isolation"]:
                        fn = lambda k=kind, st=stage, c=(mode == "compile"): H.in_fresh_process(_isolated_worker, S, target, k, st, c)  # noqa: E731
                    elif stage == "train":
                        fn = lambda m=models[kind], c=(mode == "compile"): measure_train(m, S, c)  # noqa: E731
                    else:
                        fn = lambda m=infer[kind], c=(mode == "compile"): measure_prefill(m, S, c)  # noqa: E731
                    results.measure(rows, row, fn, label=f"{section} {stage} {mode} {kind}@{target}")
                    H.free_memory(S)
        del models, infer
    H.add_stage_ratios(rows)
    results.save()


def main(argv=None):
    return H.run_main(parse_args, settings, bench, argv, benchmark="bench_e2e")


if __name__ == "__main__":
    main()
