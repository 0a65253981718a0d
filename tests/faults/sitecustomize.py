"""Test-only fault injection into `milora stage` subprocesses (DVC's and Prefect's too): a test puts this
directory on PYTHONPATH (`tests.faults.fault_env`) and Python imports it at start-up. Production code has
no hook for it.

* `MILORA_TEST_FAULT=evaluate[,svd]`: those stages raise a bug (`RuntimeError`) instead of running;
* `MILORA_TEST_KILL_AT_STEP=N`: training SIGKILLs itself once a checkpoint at or after step N is saved;
* `MILORA_TEST_HOLD_AT_STEP=N:DIR`: training stops once a checkpoint at or after step N is saved, writes
  `DIR/held` and waits there until it is killed (or `DIR/release` appears): the test acts on a run held in
  the middle of `train` instead of polling for a moment it could miss;
* `MILORA_TEST_GATE_BARRIER=DIR:N` and `MILORA_TEST_GATE_DELAY=S`: registrations wait for each other (N of
  them) right before taking the champion gate, and the gate takes S seconds to decide: concurrent
  registrations then race for the champion alias at the same moment, with a wide window;
* `MILORA_TEST_FAULT_ONCE=DIR`: each armed fault above fires once only (it leaves `DIR/<fault>` behind), so a
  retry of the same run, with the same environment, gets past it;
* `MILORA_TEST_DUMP_RANKS=DIR`: at the end of training every rank saves its trainable tensors to
  `DIR/rank<RANK>.safetensors` (so a test compares the ranks tensor by tensor).
"""

import os

_FAULT = os.environ.get("MILORA_TEST_FAULT", "")
_KILL_AT = os.environ.get("MILORA_TEST_KILL_AT_STEP", "")
_HOLD_AT = os.environ.get("MILORA_TEST_HOLD_AT_STEP", "")
_DUMP = os.environ.get("MILORA_TEST_DUMP_RANKS", "")
_ONCE = os.environ.get("MILORA_TEST_FAULT_ONCE", "")

_GATE_BARRIER = os.environ.get("MILORA_TEST_GATE_BARRIER", "")
_GATE_DELAY = float(os.environ.get("MILORA_TEST_GATE_DELAY", "0") or 0)

if _GATE_BARRIER or _GATE_DELAY:
    import contextlib
    import time
    from pathlib import Path

    import milora.tracking.gate as _gating
    import milora.tracking.registration as _registration

    _gate_lock, _gate = _gating.gate_lock, _gating.gate

    @contextlib.contextmanager
    def _gate_lock_after_barrier(*args, **kwargs):
        if _GATE_BARRIER:
            folder, _, n = _GATE_BARRIER.rpartition(":")
            Path(folder).mkdir(parents=True, exist_ok=True)
            (Path(folder) / str(os.getpid())).touch()
            deadline = time.monotonic() + 300
            while len(list(Path(folder).iterdir())) < int(n) and time.monotonic() < deadline:
                time.sleep(0.05)
        with _gate_lock(*args, **kwargs):
            yield

    def _slow_gate(*args, **kwargs):
        time.sleep(_GATE_DELAY)
        return _gate(*args, **kwargs)

    _registration.gate_lock = _gating.gate_lock = _gate_lock_after_barrier  # where registration and promotion take it
    _gating.gate = _slow_gate


def _fires(fault):
    """Whether an armed fault fires now (always, or the first time only under MILORA_TEST_FAULT_ONCE)."""
    if not _ONCE:
        return True
    os.makedirs(_ONCE, exist_ok=True)
    try:
        os.close(os.open(os.path.join(_ONCE, fault), os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return False
    return True


if _FAULT or _KILL_AT or _DUMP or _HOLD_AT:
    import milora.stages as _stages

    _stage_function = _stages.stage_function

    def _faulty_stage_function(name):
        fn = _stage_function(name)
        if name in _FAULT.split(",") and _fires(name):
            def fn(cfg, paths):
                raise RuntimeError(f"fault injected into stage {name!r} by the test (MILORA_TEST_FAULT)")
        if name == "train" and _KILL_AT:
            _kill_training_at(int(_KILL_AT))
        if name == "train" and _HOLD_AT:
            step, _, folder = _HOLD_AT.partition(":")
            _hold_training_at(int(step), folder)
        if name == "train" and _DUMP:
            _dump_ranks(_DUMP)
        return fn

    def _dump_ranks(directory):
        from pathlib import Path

        from safetensors.torch import save_file

        import milora.stages.train as train

        agree = train._ranks_agree

        def dumping(model):
            tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
            Path(directory).mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(Path(directory) / f"rank{os.environ.get('RANK', '0')}.safetensors"))
            return agree(model)

        train._ranks_agree = dumping

    def _hold_training_at(step, folder):
        import time
        from pathlib import Path

        from transformers import TrainerCallback

        import milora.stages.train as train

        class HoldAfterCheckpoint(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):
                if state.global_step >= step and not (Path(folder) / "release").exists():
                    Path(folder).mkdir(parents=True, exist_ok=True)
                    (Path(folder) / "held").write_text(str(state.global_step))
                    while not (Path(folder) / "release").exists():
                        time.sleep(0.1)

        class Trainer(train.Trainer):
            def __init__(self, *args, callbacks=None, **kwargs):
                super().__init__(*args, callbacks=[*(callbacks or []), HoldAfterCheckpoint()], **kwargs)

        train.Trainer = Trainer

    def _kill_training_at(step):
        import signal

        from transformers import TrainerCallback

        import milora.stages.train as train

        class KillAfterCheckpoint(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):
                if state.global_step >= step and _fires("kill"):
                    os.kill(os.getpid(), signal.SIGKILL)

        class Trainer(train.Trainer):
            def __init__(self, *args, callbacks=None, **kwargs):
                super().__init__(*args, callbacks=[*(callbacks or []), KillAfterCheckpoint()], **kwargs)

        train.Trainer = Trainer

    _stages.stage_function = _faulty_stage_function
