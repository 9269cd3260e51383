"""Trainer integration: put the analytic FLOPs, the gate values and the measured throughput into the Trainer's logs."""

import time

import torch
from transformers import TrainerCallback


class SparseFLOPsCallback(TrainerCallback):
    """Log ``FLOPs/...`` (per optimizer step), ``Gates/...`` and ``Throughput/tokens_per_s`` through ``trainer.log``.

    ``Throughput/tokens_per_s`` is the global batch's tokens over the wall time since the previous
    log (the device synchronised at both ends), so the first log carries the start-up cost and the
    later ones the steady rate; ``train_runtime`` in the final metrics averages both.

    Keys added in ``on_log`` reach neither ``state.log_history`` nor the reporters (TensorBoard,
    W&B), so the stats are gathered in ``on_step_end`` and logged through the trainer itself;
    create the callback with :func:`attach_flops_callback` (or pass ``trainer=`` and add it).
    """

    def __init__(self, trainer=None, seq_len: int | None = None):
        self.trainer = trainer
        self.seq_len = seq_len
        self._last_log = None  # (global_step, perf_counter) of the previous log

    @staticmethod
    def _now() -> float:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_log = (state.global_step, self._now())
        return control

    def stats(self, model, args, global_step: int) -> dict:
        model = getattr(model, "module", model)
        sequences = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)
        seq_len = self.seq_len or model.config.n_positions
        report = model.flops_report(batch_size=sequences, seq_len=seq_len)
        stats = {k: float(v) for k, v in report.items() if k.startswith("FLOPs/")}
        stats.update(model.mean_gate_values())
        stats.update(self._throughput(global_step, tokens_per_step=sequences * seq_len))
        return stats

    def _throughput(self, global_step: int, tokens_per_step: int) -> dict:
        """Tokens/s since the previous log; empty before ``on_train_begin`` has run."""
        if self._last_log is None:
            return {}
        now = self._now()
        last_step, last_time = self._last_log
        self._last_log = (global_step, now)
        if global_step > last_step and now > last_time:
            return {"Throughput/tokens_per_s": (global_step - last_step) * tokens_per_step / (now - last_time)}
        return {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.trainer is None or model is None:
            return control
        steps = getattr(state, "logging_steps", None) or args.logging_steps
        if state.global_step == 1 or (steps and state.global_step % max(1, int(steps)) == 0):
            should_log = control.should_log
            self.trainer.log(self.stats(model, args, state.global_step))
            # trainer.log runs the on_log event, which clears should_log: the Trainer's own loss
            # logging for this step must still happen
            control.should_log = should_log
        return control


def attach_flops_callback(trainer, seq_len: int | None = None) -> SparseFLOPsCallback:
    callback = SparseFLOPsCallback(trainer=trainer, seq_len=seq_len)
    trainer.add_callback(callback)
    return callback
