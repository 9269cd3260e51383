"""Hand-made mutants of the model, conversion, healing and FLOPs code, each run against a small test
selection in a temporary copy of the repository (never the working tree).

    python tests/mutation/run_mutants.py                 # every mutant, 2 at a time
    python tests/mutation/run_mutants.py --check         # only check that every original snippet is found
    python tests/mutation/run_mutants.py --only M07 M12  # some of them
    python tests/mutation/run_mutants.py --jobs 1 --out results.json

A mutant is (id, file, original snippet, replacement, what it breaks, test selection). The original
must occur exactly once in the file: otherwise the script stops with an error naming the mutant, so a
refactor refreshes the list rather than silently skipping it. A mutant is *killed* when its test
selection fails (the first failing test is recorded), *survived* when it passes. docs/mutation_testing.md
holds the table of the last run. Not collected by pytest (no test_ prefix).
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PKG = "modeling_sparse_gpt2"

FORMULA = ["tests/test_feedback_formula.py"]
FUSED = ["tests/test_paths_agree.py", "tests/test_components.py", "-k", "fused"]  # random configs + the pinned ones
CACHE = ["tests/test_paths_agree.py", "-k", "cache"]
PADDED_STATIC = ["tests/test_generation_cache.py", "-k", "tiny_config"]
PADDED = ["tests/test_generation_cache.py", "-k", "dynamic"]
BEAMS = ["tests/test_hf_integration.py", "-k", "test_generate_with_cache_equals_without"]
COMPONENTS = ["tests/test_components.py"]
FLOPS = ["tests/test_flops.py", "-k", "analytic or dense_equivalent"]
CONVERSION = ["tests/test_conversion.py", "-k", "least_squares or reproduce_the_dense or bit_identical or initialised or residual_lives"]
DISTILL = ["tests/test_distillation_loss.py"]
KERNELS = ["tests/test_kernels.py"]  # the Triton kernels, under the interpreter on a CPU

# (id, file under modeling_sparse_gpt2/, original, replacement, what it breaks, tests)
MUTANTS = [
    # ---- sparse_ffn.py: the fused and reference paths
    ("M01", "ffn_kernels.py", "a = a * (2 * torch.sigmoid(x[..., n_act + i : n_act + i + 1]))",
     "a = a * (2 * torch.sigmoid(x[..., n_act : n_act + 1]))", "fused path: every component gets the first token gate", FUSED),
    ("M02", "ffn_kernels.py", "a = a * (2 * torch.sigmoid(", "a = a * (torch.sigmoid(", "fused path: token gates halved", FUSED),
    ("M03", "sparse_ffn.py", "y = y + self.gates.factor(name, tau) * y_c", "y = y + y_c", "reference path ignores the gates", FUSED),
    ("M04", "sparse_ffn.py", "y = self.c_proj(self.middle(h, ctx))", "y = F.linear(self.middle(h, ctx), self.c_proj.weight)",
     "fused path drops the FFN bias", FUSED),
    # (M05, the fused-weight cache missing in-place weight changes, is retired: the c_fc / c_proj layout keeps no fused copy)
    ("M06", "sparse_ffn.py", "return 2 * 2 * self.spec.d * self.spec.f", "return 2 * self.spec.d * self.spec.f", "dense-equivalent FLOPs halved", FLOPS),
    # ---- feedback.py: the causal window and its decode state
    ("M07", "feedback.py", "for j in range(w - 1):", "for j in range(1, w - 1):", "feedback drops its oldest tap", FORMULA),
    ("M08", "feedback.py", "for j in range(w - 1):", "for j in range(0):", "feedback ignores every earlier token", FORMULA),
    ("M09", "feedback.py", "state.copy_(full[:, -(w - 1) :])", "state.copy_(full[:, : w - 1])", "decode state keeps the oldest, not the newest, values", CACHE),
    ("M10", "feedback.py", "u = u * token_mask[:, -u.shape[1] :, None].to(u.dtype)", "pass", "padding leaks into the feedback", PADDED),
    ("M11", "feedback.py", 'return F.gelu(s, approximate="tanh")', "return s", "feedback without its gelu", FORMULA),
    ("M12", "feedback.py", "state.copy_(state.index_select(0, beam_idx.to(state.device)))", "pass", "beam search does not reorder the feedback state", BEAMS),
    ("M13", "feedback.py", "return 2 * self.rows * self.window + 8 * self.rows", "return 8 * self.rows", "feedback's elementwise FLOPs omit the convolution", FLOPS),
    # ---- ffn_kernels.py: the Triton kernels (test_kernels runs them under TRITON_INTERPRET=1 on a CPU)
    ("M37", "ffn_kernels.py", "\n            poly = c0.to(tl.float32) + tc * b1 - b2 + tl.maximum(x - domain, 0.0)",
     "\n            poly = c0.to(tl.float32) + tc * b1 - b2", "forward kernel drops the linear tail", KERNELS),
    ("M38", "ffn_kernels.py", "(b1 + tc * d1 - d2) / domain, 0.0) + tl.where(x > domain, 1.0, 0.0)",
     "(b1 + tc * d1 - d2) / domain, 0.0)", "backward kernel drops the tail's slope from dL/dh", KERNELS),
    ("M39", "ffn_kernels.py", "tl.sum(gp * t_cur, axis=0)[None, :], 0.0)", "tl.sum(gp * t_prev, axis=0)[None, :], 0.0)",
     "backward per tile: T_(i-1) in the coefficient gradient of T_i", KERNELS),
    ("M40", "ffn_kernels.py", "terms = _add_at(terms, i, gp * t_cur)", "terms = _add_at(terms, i, gp * t_prev)",
     "backward in registers: T_(i-1) in the coefficient gradient of T_i", KERNELS),
    # ---- polynomial.py, spectral.py, tensor.py, micro.py, gates.py
    ("M14", "polynomial.py", "t_prev, t_cur = t_cur, two_t * t_cur - t_prev", "t_prev, t_cur = t_cur, two_t * t_cur + t_prev", "wrong Chebyshev recurrence (the specification)", COMPONENTS),
    ("M41", "polynomial.py", "            y.add_(torch.sub(x, domain, out=t_).clamp_min_(0.0))", "            pass",
     "CPU Function: the forward loses its linear tail", COMPONENTS),
    ("M42", "polynomial.py", "torch.addcmul(r_prev, t_, r, value=2.0 if i % 2 else -2.0, out=out)",
     "torch.addcmul(r_prev, t_, r, value=-2.0 if i % 2 else 2.0, out=out)", "CPU Function: wrong signs in the coefficient gradients' recurrence",
     COMPONENTS + ["tests/test_polynomial_cpu_path.py"]),
    ("M15", "polynomial.py", "    return out + F.relu(h - domain)", "    return out", "activation loses its linear tail beyond the domain", COMPONENTS),
    ("M16", "polynomial.py", "active = torch.argsort(c.abs(), descending=True)[: self.num_terms]", "active = torch.argsort(c.abs(), descending=True)[: self.num_terms + 1]",
     "one Chebyshev coefficient too many", CONVERSION),
    ("M17", "spectral.py", "return z * (z.abs() >= kth).to(z.dtype)", "return z", "spectral top-k selection is a no-op", ["tests/test_paths_agree.py", "-k", "topk"]),
    ("M18", "spectral.py", "rows[freqs == 0] = 1.0 / math.sqrt(d)", "rows[freqs == 0] = 1.0", "DCT row 0 not normalised", COMPONENTS),
    ("M19", "tensor.py", "h = torch.matmul(self.left, xt)", "h = torch.matmul(self.left.transpose(1, 2), xt)", "Monarch left factor transposed", COMPONENTS),
    ("M20", "tensor.py", "return 2 * self.nb * self.bs * self.bs + 2 * self.bs * self.nb * self.nb", "return 2 * self.nb * self.bs * self.bs",
     "Monarch FLOPs omit the right factor", FLOPS),
    ("M21", "micro.py", "z = z + F.gelu(torch.matmul(self.blocks[s], z), approximate=\"tanh\")", "z = F.gelu(torch.matmul(self.blocks[s], z), approximate=\"tanh\")",
     "micro steps lose their residual", COMPONENTS),
    ("M22", "sparse_ffn.py", "gate_mm = 2 * d * n_comp if self.gates.token else 0", "gate_mm = d * n_comp if self.gates.token else 0",
     "token-gate FLOPs halved", FLOPS),
    ("M23", "gates.py", "return 2 * torch.sigmoid(h_gate)", "return torch.sigmoid(h_gate)", "reference token gates halved", FUSED),
    # ---- modeling_sparse_gpt2.py: masks, cache, FLOPs report
    ("M24", "modeling_sparse_gpt2.py", "inputs[TOKEN_MASK_KWARG] = token_mask.clone(memory_format=torch.contiguous_format)", "pass",
     "static cache: the token mask does not reach the feedback (issue 13.1)", PADDED_STATIC),
    ("M25", "modeling_sparse_gpt2.py", "            kwargs[TOKEN_MASK_KWARG] = mask", "            pass", "2-D padding mask not passed to the FFN (a direct forward with a mask)", FORMULA),
    ("M26", "modeling_sparse_gpt2.py", "layer_idx = mlp.layer_idx if cache is not None else 0", "layer_idx = 0", "every layer shares one feedback state", CACHE),
    ("M27", "modeling_sparse_gpt2.py", "        reorder_feedback_states(cache, beam_idx)\n", "", "beam reorder skips the feedback state", BEAMS),
    ("M28", "modeling_sparse_gpt2.py", "tokens = batch_size * (seq_len if seq_len is not None else self.config.n_positions)",
     "tokens = batch_size * self.config.n_positions", "flops_report ignores seq_len", FLOPS),
    # ---- tooling/conversion.py
    ("M29", "tooling/conversion.py", 'ffn.w_out("polynomial").copy_(w_f[:m].T)', 'ffn.w_out("polynomial").copy_(1.1 * w_f[:m].T)', "fitted c_proj scaled by 1.1", CONVERSION),
    ("M30", "tooling/conversion.py", "ffn.c_proj.bias.copy_(w_f[-1])", "ffn.c_proj.bias.zero_()", "fitted bias dropped", CONVERSION),
    ("M31", "tooling/conversion.py", "ffn.set_spectral_frequencies(torch.topk(energy, kc).indices.sort().values.cpu())",
     "ffn.set_spectral_frequencies(torch.arange(kc))", "spectral frequencies not chosen by residual energy", CONVERSION),
    ("M32", "tooling/conversion.py", "[r + ffn(x) for r, x in zip(resid[part], xs[part])]", "[r + y for r, y in zip(resid[part], ys[part])]",
     "later layers fitted on dense, not converted, inputs", CONVERSION),
    ("M33", "tooling/conversion.py", "            sparse_sd[name].copy_(tensor)\n", "", "shared weights not copied", CONVERSION),
    # ---- tooling/distillation.py
    ("M34", "tooling/distillation.py", "kl = (kl * valid).sum() / valid.sum().clamp_min(1) * temperature**2", "kl = (kl * valid).sum() / valid.sum().clamp_min(1)",
     "KL term without T^2", DISTILL),
    ("M35", "tooling/distillation.py", "valid = (labels[:, 1:] != -100).float()", "valid = torch.ones_like(labels[:, 1:]).float()", "padding scored in the KL", DISTILL),
    ("M36", "tooling/distillation.py", "ignore_index=-100)\n    return alpha_kl * kl + (1 - alpha_kl) * ce, kl, ce",
     "ignore_index=-100)\n    return alpha_kl * kl + ce, kl, ce", "CE not weighted by 1 - alpha (the plain loss)", DISTILL),
]


def check(mutants):
    """Every original occurs exactly once; else stop, naming the mutant (refresh the list)."""
    bad = []
    for mid, rel, original, _, _, _ in mutants:
        path = os.path.join(ROOT, PKG, rel)
        count = open(path).read().count(original) if os.path.exists(path) else -1
        if count != 1:
            bad.append(f"{mid} ({PKG}/{rel}): original snippet found {count} times: {original!r}")
    if bad:
        sys.exit("mutants out of date with the code:\n  " + "\n  ".join(bad))


def copy_repo(dest):
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split("\n")
    for f in filter(None, files):
        src = os.path.join(ROOT, f)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dest, f)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, f))


def run_one(mutant, timeout):
    mid, rel, original, replacement, breaks, tests = mutant
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mid}-") as tmp:
        copy_repo(tmp)
        path = os.path.join(tmp, PKG, rel)
        source = open(path).read()
        open(path, "w").write(source.replace(original, replacement, 1))
        env = dict(os.environ, PYTHONPATH=tmp, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-rf", "-p", "no:cacheprovider", "--hypothesis-profile=mutation", *tests]
        try:
            res = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return dict(id=mid, file=rel, breaks=breaks, tests=" ".join(tests), status="timeout", by="")
        failed = re.findall(r"^FAILED (\S+)", res.stdout, re.M)
        errors = re.findall(r"^ERROR (\S+)", res.stdout, re.M)
        status = "killed" if res.returncode != 0 else "survived"
        if res.returncode not in (0, 1):  # collection error / internal error: say so
            status = "killed (error)" if (failed or errors) else f"error rc={res.returncode}"
        by = (failed or errors or [""])[0]
        return dict(id=mid, file=rel, breaks=breaks, tests=" ".join(tests), status=status, by=by, tail=res.stdout[-400:] if status.startswith("error") else "")


def markdown_table(results):
    done = {r["id"]: r for r in results}
    rows = ["| mutant | file | what it breaks | result | killed by |", "|---|---|---|---|---|"]
    for mid, rel, _, _, breaks, tests in MUTANTS:
        r = done.get(mid)
        status, by = (r["status"], r["by"]) if r else ("not run", " ".join(tests))
        rows.append(f"| {mid} | {rel} | {breaks} | {status} | `{by or '-'}` |")
    return "\n".join(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only check that every original snippet is found once")
    parser.add_argument("--only", nargs="*", help="mutant ids to run")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per mutant")
    parser.add_argument("--out", default="mutation_results.json")
    parser.add_argument("--table", metavar="RESULTS_JSON", help="print the markdown table of a results file and exit")
    args = parser.parse_args()
    if args.table:
        print(markdown_table(json.load(open(args.table))))
        return
    mutants = [m for m in MUTANTS if not args.only or m[0] in args.only]
    if args.only and len(mutants) != len(args.only):
        sys.exit(f"unknown mutant ids: {sorted(set(args.only) - {m[0] for m in MUTANTS})}")
    check(mutants)
    if args.check:
        print(f"{len(mutants)} mutants, every original found once")
        return
    results = []
    with ThreadPoolExecutor(args.jobs) as pool:
        for r in pool.map(lambda m: run_one(m, args.timeout), mutants):
            print(f"{r['id']} {r['status']:9s} {r['by'] or '-'}  ({r['breaks']})", flush=True)
            results.append(r)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    survived = [r["id"] for r in results if r["status"] != "killed"]
    print(f"{len(results) - len(survived)}/{len(results)} killed; not killed: {survived}")


if __name__ == "__main__":
    main()
