"""The `sparse-gpt2` command line: subcommands, help text, one-line errors, output folders, the tokenizer a
checkpoint ships, the perplexity metric read by `evaluate` and the forward-throughput measurement."""

import argparse
import math
import os
import stat
import time

import pytest
import torch

from modeling_sparse_gpt2.tooling import cli
from modeling_sparse_gpt2.tooling.checkpoints import DEFAULT_CALIBRATION, DEFAULT_MODEL, atomic_output_dir, load_tokenizer, save_model_and_tokenizer
from modeling_sparse_gpt2.tooling.evaluation import METRIC_PATH, forward_throughput

from conftest import run_without_the_package, save_tiny_dense_gpt2, tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dense")
    save_tiny_dense_gpt2(path)
    return path


def fails(capsys, *argv):
    """Run the command in this process; it must return 1 with one line on stderr and no traceback."""
    rc = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert rc == 1, err
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------------------- commands and help
def test_top_help_lists_the_commands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("convert", "heal", "evaluate", "run"):
        assert f"    {name} " in out


def test_no_command_runs_the_main_job(monkeypatch):
    import modeling_sparse_gpt2.tooling.main_job as main_job

    seen = []
    monkeypatch.setattr(main_job, "run_main_job", lambda job, data, conv, distill: seen.append((job.heal_steps, conv.ffn_flops_ratio)))
    assert cli.main([]) == 0 and cli.main(["--heal_steps", "3"]) == 0 and cli.main(["run", "--ffn_flops_ratio", "0.3"]) == 0
    steps, ratio = main_job.MainJobArguments.heal_steps, 0.4
    assert seen == [(steps, ratio), (3, ratio), (steps, 0.3)]


@pytest.mark.parametrize("name", ["convert", "heal", "evaluate", "run", "prepare-tokens", "pretrain"])
def test_every_option_is_described_and_defaults_print_once(name):
    parser = cli.command_parser(name)
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{name} {action.option_strings} has no help"
        text = cli.HelpFormatter("x")._get_help_string(action).replace("%(default)s", str(action.default))
        assert text.count("default") <= 1 and "(default: None)" not in text, (action.option_strings, text)


def test_heal_help_is_short_and_points_to_every_training_flag():
    short = cli.command_parser("heal").format_help()
    full = cli.command_parser("heal", show_all=True).format_help()
    assert len(short.splitlines()) < 200 < len(full.splitlines())
    assert "Every transformers TrainingArguments flag works" in short and "--help_all" in short
    assert "--adam_beta1" not in short and "--adam_beta1" in full


def test_convert_lists_no_flag_it_does_not_use():
    dests = {a.dest for a in cli.command_parser("convert")._actions}
    assert {"calibration_file", "num_calibration_samples", "ffn_flops_ratio"} <= dests
    assert not dests & {"train_file", "validation_file", "max_train_samples", "heal_steps"}


# ---------------------------------------------------------------------------- anticipated errors: one line, exit 1
def test_out_of_range_ffn_flops_ratio(capsys, dense_dir, tmp_path):
    err = fails(capsys, "convert", "--model_name_or_path", dense_dir, "--output_dir", tmp_path / "o", "--ffn_flops_ratio", 2)
    assert "ffn_flops_ratio must be in (0, 1.5]" in err


def test_corrupted_dense_weights_name_the_file(capsys, dense_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in os.listdir(dense_dir):
        (bad / f).write_bytes((dense_dir / f).read_bytes())
    with open(bad / "model.safetensors", "r+b") as f:
        f.truncate(4000)
    err = fails(capsys, "convert", "--model_name_or_path", bad, "--output_dir", tmp_path / "o", "--calibration_file", DEFAULT_CALIBRATION)
    assert str(bad / "model.safetensors") in err and "could not be read" in err


def test_empty_data_file_says_why(capsys, dense_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    err = fails(capsys, "convert", "--model_name_or_path", dense_dir, "--output_dir", tmp_path / "o", "--calibration_file", empty)
    assert f"--calibration_file: data file {empty} is empty (0 bytes)" in err


def test_healing_a_dense_student_says_what_it_got(capsys, dense_dir, tmp_path):
    err = fails(capsys, "heal", "--model_name_or_path", dense_dir, "--train_file", DEFAULT_CALIBRATION, "--output_dir", tmp_path / "o")
    assert "is a 'gpt2' model; expected a sparse GPT-2 (a converted checkpoint) (model_type 'sparse_gpt2')" in err


def test_evaluate_suggests_only_its_own_flags(capsys, dense_dir):
    err = fails(capsys, "evaluate", "--model_name_or_path", dense_dir)
    assert "--validation_file" in err and "--dataset_name" in err and "--calibration_file" not in err


def test_mistyped_relative_path_fails_before_any_hub_call(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    start = time.time()
    err = fails(capsys, "evaluate", "--model_name_or_path", "./sparse-outt", "--validation_file", DEFAULT_CALIBRATION)
    assert "--model_name_or_path: model folder not found: ./sparse-outt" in err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a bare name, offline: not looked up on the Hub either
    err = fails(capsys, "evaluate", "--model_name_or_path", "sparse-outt", "--validation_file", DEFAULT_CALIBRATION)
    assert "model folder not found: sparse-outt (HF_HUB_OFFLINE is set" in err
    assert time.time() - start < 10


def test_unknown_flag_and_missing_output_dir_are_one_line(capsys):
    assert "['--no_such_flag', '1']" in fails(capsys, "evaluate", "--model_name_or_path", "x", "--no_such_flag", "1")
    assert "--output_dir" in fails(capsys, "heal", "--model_name_or_path", "x")
    assert "unknown command 'convrt'" in fails(capsys, "convrt")


def test_unexpected_errors_keep_their_traceback(monkeypatch, dense_dir, tmp_path):
    import modeling_sparse_gpt2.tooling.commands as commands

    def boom(*a, **k):
        raise RuntimeError("a bug")

    monkeypatch.setattr(commands, "convert_and_save", boom)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["convert", "--model_name_or_path", str(dense_dir), "--output_dir", str(tmp_path / "o")])


def test_heal_refuses_a_non_empty_output_dir_before_any_work(capsys, tmp_path, monkeypatch):
    import modeling_sparse_gpt2.tooling.commands as commands

    out = tmp_path / "healed"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    monkeypatch.setattr(commands, "load_causal_lm", lambda *a, **k: pytest.fail("loaded a model before checking --output_dir"))
    err = fails(capsys, "heal", "--model_name_or_path", "x", "--train_file", DEFAULT_CALIBRATION, "--output_dir", out)
    assert "--overwrite_output_dir" in err and (out / "keep.txt").read_text() == "user data"


# ---------------------------------------------------------------------------- what a checkpoint folder holds
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_output_folder_gets_the_users_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        with atomic_output_dir(str(tmp_path / "out"), overwrite=False) as tmp:
            (open(os.path.join(tmp, "w.bin"), "w")).close()
            os.chmod(os.path.join(tmp, "w.bin"), 0o600)  # as a writer that uses mkstemp would leave it
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "out").st_mode) == 0o777 & ~umask
    assert stat.S_IMODE(os.stat(tmp_path / "out" / "w.bin").st_mode) == 0o666 & ~umask


def test_saved_checkpoint_has_use_cache_and_context_length(tmp_path):
    model = tiny_model()
    model.config.use_cache = False  # as training leaves it
    tok = load_tokenizer(DEFAULT_MODEL)
    save_model_and_tokenizer(str(tmp_path), model, tok)
    from transformers import AutoConfig, AutoTokenizer

    assert AutoConfig.from_pretrained(tmp_path).use_cache is True
    assert AutoTokenizer.from_pretrained(tmp_path).model_max_length == model.config.n_positions == 64


def test_tokenizer_loads_without_the_package_and_without_a_prompt(tmp_path):
    """transformers 5 reads config.json before the tokenizer files, so a bare ``AutoTokenizer`` call on a
    remote-code checkpoint asks about the config's code; ``trust_remote_code=True`` (the flag the model
    needs as well) loads it with no prompt, as GPT-2's tokenizer with the model's context length."""
    ckpt = tmp_path / "ckpt"
    save_model_and_tokenizer(str(ckpt), tiny_model(), load_tokenizer(DEFAULT_MODEL))
    out = run_without_the_package(f"""
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained({str(ckpt)!r}, trust_remote_code=True)
        print("TOKENIZER", type(tok).__name__, tok.model_max_length, tok("def f(x):")["input_ids"])
        """, tmp_path, ROOT)
    expected = load_tokenizer(DEFAULT_MODEL)("def f(x):")["input_ids"]
    assert f"TOKENIZER GPT2Tokenizer 64 {expected}" in out.stdout, out.stderr[-3000:]
    assert "[y/N]" not in out.stdout + out.stderr and "model of type" not in out.stderr


# ---------------------------------------------------------------------------- measuring
def test_evaluate_loads_the_perplexity_metric_offline_and_it_matches_the_hand_computation(monkeypatch):
    import evaluate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    model = tiny_model().eval()
    tokens = torch.randint(0, 97, (100,), generator=torch.Generator().manual_seed(1))
    metric = evaluate.load(METRIC_PATH, keep_in_memory=True)
    metric.add_batch(input_ids=tokens[:40].tolist())  # the stream may arrive in pieces
    res = metric.compute(input_ids=tokens[40:].tolist(), model=model, block_size=48, stride=16)
    nll, scored = 0.0, set()  # token t (t >= 1) is scored in the first window that holds it past its predecessor
    with torch.no_grad():
        for begin in range(0, 99, 16):
            end = min(begin + 48, 100)
            logp = torch.log_softmax(model(tokens[None, begin:end]).logits[0], -1)
            for t in range(begin + 1, end):
                if t not in scored:
                    scored.add(t)
                    nll -= logp[t - begin - 1, tokens[t]].item()
            if end == 100:
                break
    assert res["tokens_scored"] == len(scored) == 99
    assert res["perplexity"] == pytest.approx(math.exp(nll / 99), rel=1e-5)
    assert res["ffn_flops_ratio"] == pytest.approx(model.flops_report(batch_size=1, seq_len=48)["FLOPs/ffn_ratio"])
    assert res["windowing"] == "windows of 48 tokens every 16 tokens; each token scored once"


def test_forward_throughput_counts_the_batch_tokens():
    model = tiny_model()
    res = forward_throughput(model, torch.zeros(3, 20, dtype=torch.long), warmup=1, repeats=3)
    assert res["batch_size"] == 3 and res["seq_len"] == 20
    assert res["tokens_per_s"] * res["seconds"] == pytest.approx(60)


# ---------------------------------------------------------------------------- prepare-tokens and pretrain
DOCS = ["def add(a, b):\n    return a + b\n", "The json module encodes and decodes JSON.", "", "Lists are mutable sequences."]


@pytest.fixture
def jsonl(tmp_path):
    import json

    def write(name, docs=DOCS):
        path = tmp_path / name
        path.write_text("".join(json.dumps({"text": d, "source": "python/x"}) + "\n" for d in docs))
        return path

    return write


def bare_gpt2_tokenizer_folder(path):
    """The embedded model's tokenizer as GPT-2's bare pair, vocab.json + merges.txt, and nothing else
    (what GPT2TokenizerFast.from_pretrained reads when there is no tokenizer.json)."""
    path.mkdir()
    load_tokenizer(DEFAULT_MODEL).backend_tokenizer.model.save(str(path))
    assert sorted(os.listdir(path)) == ["merges.txt", "vocab.json"]
    return path


@pytest.mark.parametrize("kind", ["embedded", "bare_vocab_merges"])
def test_prepare_tokens_writes_both_streams_with_a_tokenizer_folder(capsys, tmp_path, jsonl, kind):
    import numpy as np

    from modeling_sparse_gpt2.tooling.data import token_stream

    tokenizer = DEFAULT_MODEL if kind == "embedded" else bare_gpt2_tokenizer_folder(tmp_path / "bare")
    train, val, out = jsonl("train.jsonl"), jsonl("validation.jsonl", DOCS[:2]), tmp_path / "tokens"
    assert cli.main(["prepare-tokens", "--train_file", str(train), "--validation_file", str(val),
                     "--tokenizer_name_or_path", str(tokenizer), "--output_dir", str(out)]) == 0, capsys.readouterr().err
    reference = load_tokenizer(DEFAULT_MODEL)
    for split, docs in (("train", DOCS), ("validation", DOCS[:2])):
        ids = np.load(out / f"{split}.npy")
        assert ids.dtype == np.uint16
        assert ids.tolist() == token_stream([d for d in docs if d], reference).tolist()  # EOS after each document
    assert sorted(os.listdir(out)) == ["train.npy", "validation.npy"]
    assert [p for p in os.listdir(tmp_path) if p.startswith(".tokens.")] == []  # no temporary folder left


def test_prepare_tokens_refuses_a_non_empty_output_dir_and_overwrite_replaces_it(capsys, tmp_path, jsonl):
    train, out = jsonl("train.jsonl"), tmp_path / "tokens"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    argv = ["prepare-tokens", "--train_file", train, "--validation_file", train, "--tokenizer_name_or_path", DEFAULT_MODEL, "--output_dir", out]
    err = fails(capsys, *argv)
    assert f"--output_dir: {out} exists and is not empty; pass --overwrite_output_dir" in err
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "user data"
    assert cli.main([str(a) for a in argv] + ["--overwrite_output_dir"]) == 0
    assert sorted(os.listdir(out)) == ["train.npy", "validation.npy"]


def test_prepare_tokens_writes_nothing_when_it_fails_half_way(tmp_path, jsonl, monkeypatch):
    import modeling_sparse_gpt2.tooling.data as data

    real, calls = data.token_stream, []

    def second_split_fails(texts, tokenizer):
        calls.append(1)
        if len(calls) == 2:  # train.npy is written by now, in the temporary folder
            raise RuntimeError("killed")
        return real(texts, tokenizer)

    monkeypatch.setattr(data, "token_stream", second_split_fails)
    train, out = jsonl("train.jsonl"), tmp_path / "tokens"
    with pytest.raises(RuntimeError, match="killed"):
        cli.main(["prepare-tokens", "--train_file", str(train), "--validation_file", str(train),
                  "--tokenizer_name_or_path", DEFAULT_MODEL, "--output_dir", str(out)])
    assert len(calls) == 2 and sorted(os.listdir(tmp_path)) == ["train.jsonl"]  # no output folder, no temporary one


def test_prepare_tokens_names_the_flag_of_a_missing_file_or_a_wrong_tokenizer(capsys, tmp_path, jsonl):
    train, out = jsonl("train.jsonl"), tmp_path / "tokens"
    err = fails(capsys, "prepare-tokens", "--train_file", tmp_path / "nope.jsonl", "--validation_file", train,
                "--tokenizer_name_or_path", DEFAULT_MODEL, "--output_dir", out)
    assert err == f"error: --train_file: data file not found: {tmp_path / 'nope.jsonl'}"
    not_a_tokenizer = tmp_path / "not_a_tokenizer"
    not_a_tokenizer.mkdir()
    (not_a_tokenizer / "config.json").write_text("{}")
    err = fails(capsys, "prepare-tokens", "--train_file", train, "--validation_file", train,
                "--tokenizer_name_or_path", not_a_tokenizer, "--output_dir", out)
    assert err.startswith(f"error: --tokenizer_name_or_path: no tokenizer could be loaded from {not_a_tokenizer}")
    assert "--tokenizer_name_or_path: model folder not found" in fails(
        capsys, "prepare-tokens", "--train_file", train, "--validation_file", train, "--tokenizer_name_or_path", "./typo", "--output_dir", out)
    assert not out.exists()


def test_pretrain_refuses_a_non_empty_output_dir_before_any_work(capsys, tmp_path, monkeypatch):
    import modeling_sparse_gpt2.tooling.tokens as tokens

    out = tmp_path / "dense"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    monkeypatch.setattr(tokens, "load_tokenizer_from_flag", lambda *a, **k: pytest.fail("loaded a tokenizer before checking --output_dir"))
    err = fails(capsys, "pretrain", "--train_tokens", tmp_path / "t.npy", "--validation_tokens", tmp_path / "v.npy",
                "--tokenizer_name_or_path", DEFAULT_MODEL, "--output_dir", out)
    assert f"--output_dir: {out} exists and is not empty; pass --overwrite_output_dir" in err
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "user data"


@pytest.mark.parametrize("missing", ["--train_tokens", "--validation_tokens"])
def test_pretrain_names_a_missing_token_file(capsys, tmp_path, missing):
    import numpy as np

    present = tmp_path / "present.npy"
    np.save(present, np.arange(100, dtype=np.uint16))
    files = {"--train_tokens": present, "--validation_tokens": present, missing: tmp_path / "absent.npy"}
    err = fails(capsys, "pretrain", *[x for kv in files.items() for x in kv], "--n_positions", 16, "--n_embd", 16, "--n_head", 2,
                "--tokenizer_name_or_path", DEFAULT_MODEL, "--output_dir", tmp_path / "dense")
    assert err == f"error: {missing}: token file not found: {tmp_path / 'absent.npy'}"
    assert not (tmp_path / "dense").exists()
