"""The `train` stage: resumable MiLoRA/PiSSA/LoRA training with `transformers.Trainer`.

Reads the untrained adapter from the `svd` stage (so the SVD is never redone here), trains only the
LoRA factors (response tokens only), checkpoints every `train.save_steps` into `checkpoints/` (kept
across re-runs: a killed run resumes from the last checkpoint, with optimizer, scheduler, RNG and data
order restored) and writes the trained adapter, its lineage, `metrics/train.json` and the loss curve.
Runs unchanged under `torchrun` / `accelerate launch` (DDP; gloo on CPU), and launches itself under torchrun for
`train.processes > 1` or `train.nnodes > 1` (`milora.stages.distributed`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from milora.core.adapter import load_adapter, read_adapter_meta, save_adapter
from milora.core.errors import InvalidInput
from milora.core.io import atomic_write_text, file_digest, read_json, read_jsonl, write_json
from milora.model import distill
from milora.model.base import load_base
from milora.model.nll import eval_mode, mean_loss
from milora.model.precision import LINEAGE_FILE, autocast, resolve_precision, trainer_flags
from milora.model.tokenize import encode
from milora.pipeline.config import LAUNCH_KEYS, REHEARSAL, Config
from milora.pipeline.paths import Paths
from milora.pipeline.results import write_metrics
from milora.stages.distributed import (
    check_own_workspaces,
    is_local_main,
    launch,
    multi_node,
    same_on_every_rank,
    wants_launch,
)

log = logging.getLogger(__name__)

# The numbers of metrics/train.json (DVC metrics, compared across runs); reports/train.json has them all.
SUMMARY = ["train_loss"]
# Run facts: timings/train.json, not the byte-reproducible report (a resumed run also differs in these).
TIMINGS = ["train_seconds", "tokens_per_second", "peak_memory_mb", "resumed_from_step"]

FINGERPRINT = "fingerprint.json"
PROGRESS = "progress.json"
START_EVAL = "start_eval.json"


class EncodedDataset(Dataset):
    """Pre-encoded examples (input_ids, attention_mask, labels lists)."""

    def __init__(self, examples: list[dict[str, Any]]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.examples[i]


class PadCollator:
    """Right-pads a batch; labels padded with -100 so padding never counts in the loss. With `teacher`, also the
    batch's rehearsal distillation targets (`milora.model.distill.collate`)."""

    def __init__(self, pad_id: int, teacher: bool = False):
        self.pad_id = pad_id
        self.teacher = teacher

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Stack a padded batch."""
        n = max(len(b["input_ids"]) for b in batch)

        def pad(key: str, value: int) -> torch.Tensor:
            return torch.tensor([b[key] + [value] * (n - len(b[key])) for b in batch])

        out = {"input_ids": pad("input_ids", self.pad_id), "attention_mask": pad("attention_mask", 0),
               "labels": pad("labels", -100)}
        return {**out, **distill.collate(batch, n)} if self.teacher else out


class RehearsalKLTrainer(Trainer):
    """The `Trainer` whose loss adds `train.rehearsal_kl` x KL(base || tuned) summed over the rehearsal rows' reply
    tokens, normalised as the cross-entropy is (per label token of the batch; across devices and accumulation
    steps as the Trainer counts them)."""

    def __init__(self, *args: Any, kl_weight: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.kl_weight = kl_weight

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: D102
        teacher = {k: inputs.pop(k) for k in distill.KEYS}
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        scale = 1
        if num_items_in_batch is None:
            num_items_in_batch = (inputs["labels"][:, 1:] != -100).sum()
        elif self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs:
            scale = self.accelerator.num_processes // self.get_tp_size()  # as the Trainer scales the cross-entropy
        kl = distill.topk_kl(outputs.logits, **teacher) / num_items_in_batch * scale
        loss = loss + self.kl_weight * kl
        return (loss, outputs) if return_outputs else loss


class ProgressCallback(TrainerCallback):
    """Writes `checkpoints/progress.json` (step, max_steps, loss) at each log, for the flow's progress view."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: D102
        if state.is_local_process_zero and logs and "loss" in logs:
            write_json(self.path, {"step": state.global_step, "max_steps": state.max_steps,
                                   "loss": logs["loss"], "time": time.time()})


def training_arguments(cfg: Any, output_dir: Path, precision: str | None = None) -> TrainingArguments:
    """TrainingArguments from the `train:` section (checkpoints, schedule, DDP backend) and the resolved
    `precision` (default: `train.precision` resolved here)."""
    t = cfg.train
    precision = precision or resolve_precision(t.precision)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1  # set by torchrun / accelerate launch
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=cfg.eval.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim="adamw_torch",
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=2,
        save_on_each_node=multi_node(),  # every node resumes from its own checkpoints
        eval_strategy="no",
        report_to="none",
        activation_checkpointing=t.gradient_checkpointing,  # transformers 5's name (the old one warns)
        dataloader_num_workers=0,
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        ddp_backend="gloo" if distributed and not torch.cuda.is_available() else None,
        use_cpu=not torch.cuda.is_available(),  # on CPU, lets accelerate set up multi-CPU DDP under torchrun
        ddp_find_unused_parameters=False,
        disable_tqdm=False,
        **trainer_flags(precision),
    )


def _fingerprint(cfg: Config, paths: Paths, precision: str) -> dict[str, Any]:
    """What the checkpoints depend on: train params and the precision they resolved to, the initial adapter, the
    data and the base."""
    return {
        "train": cfg.train.model_dump(mode="json", exclude=set(LAUNCH_KEYS)),
        "precision": precision,
        "svd_init": file_digest(paths.svd_init_dir),
        "data": file_digest(paths.prepared_dir / "train.jsonl"),
        "base": json.loads(paths.base_json.read_text()).get("content_hash"),
    }


def _last_complete_checkpoint(ckpt: Path, is_main: bool) -> str | None:
    """The newest checkpoint that was fully written; a half-written one (killed while saving) is skipped, and
    removed by the main process."""
    steps = sorted((p for p in ckpt.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for p in steps:
        if (p / "trainer_state.json").exists() and any(p.glob("adapter_model.*")) and (p / "optimizer.pt").exists():
            return str(p)
        if is_main:
            log.warning("checkpoint %s is incomplete (killed while saving?): removing it", p)
            shutil.rmtree(p)
    return None


def _resume_point(cfg: Config, paths: Paths, is_main: bool, precision: str) -> str | None:
    """The checkpoint to resume from, discarding checkpoints of a different configuration."""
    ckpt = paths.checkpoints_dir
    fp_path = ckpt / FINGERPRINT
    want = _fingerprint(cfg, paths, precision)
    if ckpt.exists() and fp_path.exists() and json.loads(fp_path.read_text()) == want:
        last = _last_complete_checkpoint(ckpt, is_main)
        if last:
            log.info("resuming from %s", last)
        return last
    if is_main:
        if ckpt.exists() and any(ckpt.iterdir()):
            log.info("checkpoints in %s belong to another configuration: starting fresh", ckpt)
            shutil.rmtree(ckpt)
        write_json(fp_path, want)
    return None


def _loss_csv(history: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["step", "loss", "learning_rate"])
    seen = set()
    for h in history:
        if "loss" in h and h["step"] not in seen:
            seen.add(h["step"])
            w.writerow([h["step"], f"{h['loss']:.6g}", f"{h.get('learning_rate', 0):.6g}"])
    return buf.getvalue()


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _ranks_agree(model: torch.nn.Module) -> tuple[int, list[str]]:
    """World size, and the trainable tensors on which some DDP rank differs from rank 0 (compared exactly,
    tensor by tensor: rank 0 broadcasts each one and every rank checks its own against it)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 1, []
    differ = []
    for name, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
        mine = p.detach().contiguous()
        ref = mine.clone()
        dist.broadcast(ref, src=0)
        if not torch.equal(mine, ref):
            differ.append(name)
    gathered: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, differ)
    return dist.get_world_size(), sorted({n for names in gathered for n in (names or [])})


def _eval_loss(model: torch.nn.Module, encoded: list[dict[str, Any]], batch_size: int, is_main: bool,
               precision: str) -> float | None:
    """Token-weighted eval loss of the (unwrapped) model in eval mode, under the training's autocast; computed by
    each node's main process only."""
    if not encoded or not is_main:
        return None
    with eval_mode(model), autocast(precision):
        return mean_loss(model, encoded, batch_size)


def encode_rows(tokenizer: Any, rows: list[dict[str, Any]], max_length: int) -> list[dict[str, Any]]:
    """Encode prepared rows for training (response-only labels; `task` kept: rehearsal rows get teacher targets)."""
    out = []
    for r in rows:
        e = encode(tokenizer, r["prompt"], r["response"], max_length)
        out.append({**{k: list(e[k]) for k in ("input_ids", "attention_mask", "labels")}, "task": r.get("task")})
    return out


def run(cfg: Config, paths: Paths) -> None:
    """Train the adapter from `models/svd_init`, resuming from `checkpoints/` when possible."""
    precision = resolve_precision(cfg.train.precision)  # a precision this machine lacks fails before any work
    if wants_launch(cfg):
        launch(cfg, paths, "train")
        return
    torch.manual_seed(cfg.train.seed)
    model, tokenizer = load_base(cfg, paths)
    train_ds, eval_encoded = _datasets(cfg, paths, tokenizer)
    kl_weight = cfg.train.rehearsal_kl
    if kl_weight:  # the base's own distribution, read before the adapter turns its weights into residuals
        distill.teacher_targets(model, [ex for ex in train_ds.examples if ex["task"] == REHEARSAL])
    model = load_adapter(model, paths.svd_init_dir, is_trainable=True)
    if cfg.train.gradient_checkpointing:
        model.enable_input_require_grads()

    args = training_arguments(cfg, paths.checkpoints_dir, precision)
    is_main = is_local_main()  # writes this node's checkpoints and outputs (one node: global rank 0)
    paths.checkpoints_dir.mkdir(parents=True, exist_ok=True)
    check_own_workspaces(paths.root)
    same_on_every_rank(precision, f"what train.precision = {cfg.train.precision} resolved to (nodes with and without "
                                  "native bf16: set fp32 or bf16 explicitly)")
    resume = same_on_every_rank(_resume_point(cfg, paths, is_main, precision), "the checkpoint to resume from")
    if args.world_size > 1:
        torch.distributed.barrier()
    # No `trainer.evaluate()` before `train()`: it prepares the model for evaluation, and accelerate then
    # refuses to prepare it again, so DDP would never wrap it and the ranks would train unsynchronised.
    trainer_kwargs: dict[str, Any] = dict(
        model=model, args=args, train_dataset=train_ds,
        data_collator=PadCollator(tokenizer.pad_token_id, teacher=bool(kl_weight)),
        callbacks=[ProgressCallback(paths.checkpoints_dir / PROGRESS)],
    )
    trainer = RehearsalKLTrainer(**trainer_kwargs, kl_weight=kl_weight) if kl_weight else Trainer(**trainer_kwargs)
    start_eval = _start_eval_loss(model, eval_encoded, cfg, paths, resume, is_main, precision)

    t0 = time.perf_counter()
    resumed_step = int(Path(resume).name.split("-")[-1]) if resume else 0
    result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - t0
    end_eval = _eval_loss(model, eval_encoded, cfg.eval.batch_size, is_main, precision)
    world = _check_ranks_agree(model)
    if not is_main:
        return

    _save_trained_adapter(cfg, paths, model, precision)
    metrics = {
        "train_loss": result.training_loss,
        "eval_loss_start": start_eval,
        "eval_loss_end": end_eval,
        "resumed_from_step": resumed_step,
        "train_seconds": round(seconds, 3),
        **_run_numbers(trainer, model, resumed_step, seconds, world),
    }
    write_metrics(paths, "train", metrics, SUMMARY, TIMINGS)
    atomic_write_text(paths.plot("train_loss.csv"), _loss_csv(trainer.state.log_history))
    log.info("train: %d steps in %.1fs (%s), loss %.4f, eval loss %s -> %s", metrics["steps"], seconds, precision,
             result.training_loss, start_eval, end_eval)


def _datasets(cfg: Config, paths: Paths, tokenizer: Any) -> tuple[EncodedDataset, list[dict[str, Any]]]:
    """The encoded training set and eval rows from `data/prepared`; an empty training set is a user error."""
    train_rows = read_jsonl(paths.prepared_dir / "train.jsonl")
    eval_rows = read_jsonl(paths.prepared_dir / "eval.jsonl")
    if not train_rows:
        raise InvalidInput(f"{paths.prepared_dir / 'train.jsonl'} has no rows: nothing to train on")
    return (EncodedDataset(encode_rows(tokenizer, train_rows, cfg.data.max_length)),
            encode_rows(tokenizer, eval_rows, cfg.data.max_length))


def _start_eval_loss(model: torch.nn.Module, encoded: list[dict[str, Any]], cfg: Config, paths: Paths,
                     resume: str | None, is_main: bool, precision: str) -> float | None:
    """The eval loss before training: measured on a fresh start (and kept in `checkpoints/`), read back when
    resuming (the model no longer is at its start)."""
    start_file = paths.checkpoints_dir / START_EVAL
    if resume is not None:
        return read_json(start_file)["eval_loss"] if start_file.exists() else None
    loss = _eval_loss(model, encoded, cfg.eval.batch_size, is_main, precision)
    if is_main:
        write_json(start_file, {"eval_loss": loss})
    return loss


def _check_ranks_agree(model: torch.nn.Module) -> int:
    """The world size, after checking every DDP rank ended with the same trainable weights (a bug if not)."""
    world, differ = _ranks_agree(model)
    if differ:
        raise RuntimeError(f"DDP ranks ended with different adapter weights in {len(differ)} tensor(s): "
                           f"{', '.join(differ[:5])}{' ...' if len(differ) > 5 else ''}")
    return world


def _save_trained_adapter(cfg: Config, paths: Paths, model: torch.nn.Module, precision: str) -> None:
    """`models/adapter`: the trained adapter (in the model's dtype: autocast leaves the weights in it) and its
    lineage.

    What made these weights, and nothing else: the lineage is part of the adapter (a DVC out the evaluate
    stage and the registry depend on), so it holds no git commit, timestamp, path or unrelated param (the
    register step tags the MLflow run with the git commit and logs every param). `precision` is what
    `train.precision` resolved to on this machine: the evaluate stage and the served model compute under it."""
    lineage = {
        "method": cfg.adapter.method,
        "precision": precision,
        "rank": cfg.adapter.rank,
        "alpha": cfg.adapter.alpha,
        "quantization": cfg.adapter.quantization,
        "base": read_json(paths.base_json),
        "data_hash": file_digest(paths.prepared_dir),
        "svd_cache_keys": read_adapter_meta(paths.svd_init_dir).get("cache_keys", {}),
        "params": {"adapter": cfg.adapter.model_dump(mode="json"),  # not the launch layout: same adapter
                   "train": {k: v for k, v in cfg.train.model_dump(mode="json").items() if k not in LAUNCH_KEYS}},
    }
    save_adapter(model, paths.adapter_dir, base_name=cfg.model.name_or_path,
                 extra={"lineage": {k: lineage[k] for k in ("method", "rank", "data_hash")}})
    write_json(paths.adapter_dir / LINEAGE_FILE, lineage)


def _run_numbers(trainer: Trainer, model: torch.nn.Module, resumed_step: int, seconds: float,
                 world: int) -> dict[str, Any]:
    """Steps, tokens, throughput, sizes and the DDP layout of the finished training."""
    state = trainer.state
    tokens = int(state.num_input_tokens_seen or 0)
    steps_run = state.global_step - resumed_step
    trainable = [p for p in model.parameters() if p.requires_grad]
    return {
        "final_loss": next((h["loss"] for h in reversed(state.log_history) if "loss" in h), None),
        "steps": state.global_step,
        "tokens_seen": tokens,
        "tokens_per_second": round(tokens * steps_run / max(state.global_step, 1) / max(seconds, 1e-9), 2),
        "trainable_params": sum(p.numel() for p in trainable),
        "total_params": sum(p.numel() for p in model.parameters()),
        "peak_memory_mb": round(_peak_memory_mb(), 1),
        "cpu_threads": torch.get_num_threads(),  # OMP_NUM_THREADS when set (parallel runs sharing a machine)
        "world_size": world,
        "ranks_agree": True,
        "ranks_compared_tensors": len(trainable) if world > 1 else 0,
    }
