"""Trainer integration: put the analytic FLOPs and the gate values into the Trainer's logs."""

from transformers import TrainerCallback


class SparseFLOPsCallback(TrainerCallback):
    """Log ``FLOPs/...`` (per optimizer step) and ``Gates/...`` through ``trainer.log``.

    Keys added in ``on_log`` reach neither ``state.log_history`` nor the reporters (TensorBoard,
    W&B), so the stats are gathered in ``on_step_end`` and logged through the trainer itself;
    create the callback with :func:`attach_flops_callback` (or pass ``trainer=`` and add it).
    """

    def __init__(self, trainer=None, seq_len: int | None = None):
        self.trainer = trainer
        self.seq_len = seq_len

    def stats(self, model, args) -> dict:
        model = getattr(model, "module", model)
        sequences = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)
        seq_len = self.seq_len or model.config.n_positions
        report = model.flops_report(batch_size=sequences, seq_len=seq_len)
        stats = {k: float(v) for k, v in report.items() if k.startswith("FLOPs/")}
        stats.update(model.mean_gate_values())
        return stats

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.trainer is None or model is None:
            return control
        steps = getattr(state, "logging_steps", None) or args.logging_steps
        if state.global_step == 1 or (steps and state.global_step % max(1, int(steps)) == 0):
            should_log = control.should_log
            self.trainer.log(self.stats(model, args))
            # trainer.log runs the on_log event, which clears should_log: the Trainer's own loss
            # logging for this step must still happen
            control.should_log = should_log
        return control


def attach_flops_callback(trainer, seq_len: int | None = None) -> SparseFLOPsCallback:
    callback = SparseFLOPsCallback(trainer=trainer, seq_len=seq_len)
    trainer.add_callback(callback)
    return callback
