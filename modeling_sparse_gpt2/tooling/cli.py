"""The `sparse-gpt2` command: ``convert | heal | evaluate | run | prepare-tokens | pretrain`` (``sparse-gpt2``
alone runs the main job).

    sparse-gpt2 --help                 # the commands
    sparse-gpt2 convert --help         # one command's flags (HfArgumentParser dataclasses)

Every anticipated error (bad flag value, missing or unreadable file, existing output folder) is one
line on stderr, ``error: ...``, and exit code 1; anything else keeps its traceback.
"""

import argparse
import dataclasses
import sys

from transformers import HfArgumentParser, TrainingArguments
from transformers.utils import logging as hf_logging

ANTICIPATED_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError)

# the TrainingArguments flags `sparse-gpt2 heal --help` lists; --help_all lists every one
HEAL_TRAINING_FLAGS = (
    "output_dir", "max_steps", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
    "learning_rate", "lr_scheduler_type", "warmup_steps", "bf16", "logging_steps", "save_steps", "save_total_limit",
    "eval_strategy", "eval_steps", "resume_from_checkpoint", "report_to", "seed", "use_cpu",
)


class UsageError(ValueError):
    """A flag the parser refused (unknown flag, missing value, wrong type)."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Print a default once, and only a real one (not None, not when the help already says what the default is)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, argparse.SUPPRESS) or "default" in text or action.default is False:
            return text
        return super()._get_help_string(action)


class Parser(HfArgumentParser):
    """HfArgumentParser whose parse errors raise ``UsageError`` (one line, exit code 1) instead of exiting with 2."""

    def error(self, message):
        raise UsageError(f"{message} (see: {self.prog} --help)")


def _command_table():
    from .conversion import ConversionArguments
    from .commands import ConvertArguments, EvaluateArguments, HealArguments, convert_and_save, evaluate_model, heal_and_save
    from .data import ConvertDataArguments, EvaluateDataArguments, HealDataArguments, MainJobDataArguments
    from .distillation import DistillationArguments
    from .main_job import MainJobArguments, run_main_job
    from .pretraining import PretrainArguments, train_dense_reference
    from .tokens import PrepareTokensArguments, prepare_token_files

    def convert(model_args, data_args, conv_args):
        convert_and_save(model_args, data_args, conv_args)

    def heal(heal_args, data_args, distill_args, training_args):
        trainer, _ = heal_and_save(heal_args, data_args, distill_args, training_args)
        # close the process group before exiting: under accelerate launch (gloo) a process that exits
        # with it open was seen to abort ("terminate called without an active exception", CI)
        trainer.accelerator.end_training()

    def evaluate(eval_args, data_args):
        import json

        print(json.dumps(evaluate_model(eval_args, data_args), indent=1))

    def run(job, data, conv, distill):
        run_main_job(job, data, conv, distill)

    def prepare_tokens(args):
        import json

        print(json.dumps(prepare_token_files(**dataclasses.asdict(args)), indent=1))
        print(f"wrote {args.output_dir}")

    def pretrain(args):
        summary = train_dense_reference(args)
        print(f"best validation perplexity {summary['best_val_ppl']:.2f} after {summary['steps']} steps ({summary['wall_s']} s); "
              f"wrote {args.output_dir}")

    return {
        "convert": (convert, (ConvertArguments, ConvertDataArguments, ConversionArguments),
                    "Convert a dense GPT-2 into a sparse GPT-2 checkpoint (calibration only; heal it afterwards)."),
        "heal": (heal, (HealArguments, HealDataArguments, DistillationArguments, TrainingArguments),
                 "Heal a converted sparse GPT-2 by distillation from its dense teacher, with Trainer (resumable)."),
        "evaluate": (evaluate, (EvaluateArguments, EvaluateDataArguments),
                     "Perplexity of any causal LM on held-out text (the sparse_perplexity evaluate metric), printed as JSON."),
        "run": (run, (MainJobArguments, MainJobDataArguments, ConversionArguments, DistillationArguments),
                "The main job: convert, heal briefly, measure (FLOPs, perplexity, forward tokens/s) and save; "
                "offline on the embedded dense GPT-2 by default."),
        "prepare-tokens": (prepare_tokens, (PrepareTokensArguments,),
                           "Tokenize JSON-lines text into .npy token streams (train / validation) for pretrain, "
                           "with a given tokenizer or a newly trained byte-level BPE one."),
        "pretrain": (pretrain, (PretrainArguments,),
                     "Train a dense GPT-2 reference from scratch on prepare-tokens' token files (the model the benchmarks convert)."),
    }


HEAL_EPILOG = (
    "Every transformers TrainingArguments flag works as well (--gradient_accumulation_steps, --fsdp, --optim, ...); "
    "`sparse-gpt2 heal --help_all` lists them all. --output_dir receives only the finished checkpoint, written "
    "atomically; the Trainer's resumable checkpoint-N folders go to OUTPUT_DIR.checkpoints beside it "
    "(resume with --resume_from_checkpoint OUTPUT_DIR.checkpoints/checkpoint-N)."
)


def command_parser(name: str, show_all: bool = False) -> Parser:
    """The HfArgumentParser of one command, its help text trimmed to what a user needs."""
    _, dataclass_types, description = _command_table()[name]
    parser = Parser(dataclass_types, prog=f"sparse-gpt2 {name}", description=description, formatter_class=HelpFormatter,
                    epilog=HEAL_EPILOG if name == "heal" else None)
    if name == "heal":
        training_fields = {f.name for f in dataclasses.fields(TrainingArguments)}
        for action in parser._actions:
            if action.dest == "output_dir":
                action.required = True
                action.help = "Folder the healed checkpoint is written to (atomically); required."
            elif action.dest in training_fields and action.dest not in HEAL_TRAINING_FLAGS and not show_all:
                action.help = argparse.SUPPRESS
        parser.add_argument("--help_all", action="help", help="Show every flag, each TrainingArguments one included, and exit.")
    return parser


def top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparse-gpt2", description="Convert a dense GPT-2 into a sparse GPT-2, heal it, evaluate it.",
        epilog="`sparse-gpt2` with no command (or with only flags) runs `sparse-gpt2 run`. "
               "`sparse-gpt2 COMMAND --help` lists a command's flags.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, _, description) in _command_table().items():
        sub.add_parser(name, help=description, add_help=False)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        top_parser().print_help()
        return 0
    name = argv.pop(0) if argv and not argv[0].startswith("-") else "run"
    table = _command_table()
    try:
        if name not in table:
            raise UsageError(f"unknown command {name!r}; choose one of {', '.join(table)} (see: sparse-gpt2 --help)")
        hf_logging.set_verbosity_error()
        if not sys.stderr.isatty():  # no "Loading weights" / "Writing model shards" bars in logs
            hf_logging.disable_progress_bar()
        parser = command_parser(name, show_all="--help_all" in argv)
        parsed = parser.parse_args_into_dataclasses(args=argv)
        table[name][0](*parsed)
    except ANTICIPATED_ERRORS as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
