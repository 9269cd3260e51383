"""Cross-check of CUDA-graph decoding, each model alone in a fresh compile: sparse-gpt2 vs dense GPT-2.

    TORCH_LOGS=perf_hints python benchmarks/profile_decode.py     # on a GPU

GPT-2 small shape, random weights, bf16, the sparse model at FFN FLOPs 0.4 with its fused weights
frozen (``freeze_ffn_for_inference``); batch 32, 16-token prompt, 32 new tokens, greedy,
``cache_implementation="static"`` + ``CompileConfig(mode="reduce-overhead")``. Three untimed
``generate`` calls, one timed, then one under ``torch.profiler`` (total kernel time and the top
kernels). ``bench_speed.py`` measures dense first and sparse second in one process; this script
measures the sparse model first, so an order effect between the two shows up as a disagreement.
"""

import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import CompileConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_speed as B  # noqa: E402


def main():
    transformers.logging.set_verbosity_error()
    S = B.resolve_settings(B.parse_args([]))
    models, _ = B.build_e2e_models(S, 0.4, with_dense=True)
    for name in ("sparse@0.4", "dense"):
        m = models[name].to(torch.bfloat16).eval()
        if hasattr(m, "freeze_ffn_for_inference"):
            m.freeze_ffn_for_inference()
        ids = torch.randint(1, 50000, (32, 16), device="cuda")
        kw = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids),
                  cache_implementation="static", compile_config=CompileConfig(mode="reduce-overhead"))
        B.reset_compiler()
        with torch.no_grad():
            for _ in range(3):
                m.generate(ids, **kw)
            torch.cuda.synchronize()
            t = time.time()
            m.generate(ids, **kw)
            torch.cuda.synchronize()
            print(name, "generate 32 tokens", round((time.time() - t) * 1e3, 1), "ms", flush=True)
            acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            with torch.profiler.profile(activities=acts) as prof:
                m.generate(ids, **kw)
                torch.cuda.synchronize()
        averages = prof.key_averages()
        print(name, "kernel ms", round(sum(e.self_device_time_total for e in averages) / 1e3, 2))
        print(averages.table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=90))
        del m


if __name__ == "__main__":
    main()
