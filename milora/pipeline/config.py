"""Typed, validated configuration: `params.yaml` parsed once into a `Config`.

Every user-facing mistake (unknown key, out-of-range value, unknown choice) raises `ConfigError`,
whose message names the key, the value and what is allowed, before any heavy work starts.

One YAML reader for every config value: `params.yaml`, `-S KEY=VALUE` overrides (of `milora run` and
`milora stage`), string values of the Prefect flow's `overrides` parameter and the DDP launcher's resolved
params all go through `parse_yaml`, which is exactly what DVC reads params.yaml with (`ruamel.yaml`,
`YAML(typ="safe")`, YAML 1.2). So `3e-4`, `1e-3` and `.5` are floats, `yes`/`no`/`on`/`off` are strings,
`012` is 12, and `1_000` is 1000 (the YAML 1.2 core schema has no digit separators, but ruamel.yaml, and so
DVC, accepts them: we follow what DVC reads, so the stages and `dvc.lock` always agree).
"""

from __future__ import annotations

import difflib
import os
import warnings
from collections.abc import Callable, Mapping, MutableMapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from milora.core.errors import UserError
from milora.core.schema import AdapterConfig

FORMATS = ("auto", "alpaca", "llm_adapters", "metamath", "gsm8k", "math", "chat", "qa")
EMBEDDED = "embedded"


class ConfigError(UserError, ValueError):
    """A user error in the configuration: the message says which key, what value and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)


class EmbeddedModelConfig(_Section):
    """Shape and pretraining budget of the embedded tiny Llama base."""

    vocab_size: int = Field(1024, ge=64, le=65536)
    hidden_size: int = Field(128, ge=16, le=4096)
    intermediate_size: int = Field(352, ge=16, le=16384)
    num_layers: int = Field(4, ge=1, le=64)
    num_heads: int = Field(4, ge=1, le=64)
    max_position_embeddings: int = Field(512, ge=32, le=8192)
    pretrain_steps: int = Field(600, ge=1)
    pretrain_batch_size: int = Field(16, ge=1)
    pretrain_seq_len: int = Field(128, ge=16)
    pretrain_learning_rate: float = Field(3e-3, gt=0, le=1)
    threads: int = Field(2, ge=1, le=256)  # torch CPU threads while pretraining
    seed: int = 0  # init, batch order and which corpus documents are sampled


class ModelConfig(_Section):
    name_or_path: str = EMBEDDED
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    embedded: EmbeddedModelConfig = EmbeddedModelConfig()


class EmbeddedDataConfig(_Section):
    """Sizes of the seeded synthetic tasks and corpus used when `data.source: embedded`."""

    math_rows: int = Field(1500, ge=10)
    choice_rows: int = Field(1500, ge=10)
    corpus_documents: int = Field(4000, ge=10)  # pretraining documents of the embedded base (read by `base`)
    heldout_documents: int = Field(400, ge=1)  # held-out documents for the forgetting metric (read by `base`)
    seed: int = 0  # task rows; the corpus sample follows model.embedded.seed
    # default: the embedded world and tasks | lab: the comparison lab's bigger world, the new facts fine-tuning teaches
    # and the retention sets (milora.data.lab; `milora compare` tunes and evaluates on them) | smol: the
    # real-model profile's facts about invented countries as chat rows, and its held-out-phrasing `qa` suite
    # (milora.data.smol)
    profile: Literal["default", "lab", "smol"] = "default"
    new_people: int = Field(40, ge=1)  # lab profile: new people whose facts the fine-tuning rows teach


class SelfTextConfig(_Section):
    """Text sampled once from the base itself (its replies to everyday instructions), written by the `base`
    stage: the forgetting metric of a base without pretraining text. The NLL increase on it after
    fine-tuning estimates KL(base || tuned) on the base's own chat distribution."""

    documents: int = Field(0, ge=0, le=10000)  # replies to sample; 0 = none
    max_new_tokens: int = Field(64, ge=4, le=2048)
    temperature: float = Field(1.0, gt=0, le=5)
    seed: int = 0


REHEARSAL = "rehearsal"  # the task of the rehearsal rows in data/prepared (training only; train.rehearsal_kl's rows)


class RehearsalConfig(_Section):
    """Self-synthesized rehearsal: the base's own greedy replies to the profile's everyday prompts, generated
    once by the `base` stage and added to the training split by `prepare`, so the tuned model keeps answering
    as the base did where the task does not ask otherwise."""

    rows: int = Field(0, ge=0, le=100000)  # replies to generate (the first N prompts); 0 = off
    max_new_tokens: int = Field(192, ge=8, le=4096)  # a reply that does not end within this budget is dropped


class DataConfig(_Section):
    source: str = EMBEDDED
    format: Literal[FORMATS] = "auto"  # type: ignore[valid-type]
    on_bad_rows: Literal["fail", "skip"] = "fail"
    max_length: int = Field(256, ge=8, le=131072)
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    max_eval_rows: int = Field(200, ge=1)
    dedup: bool = True
    seed: int = 0
    heldout_text: str | None = None
    self_text: SelfTextConfig = SelfTextConfig()
    rehearsal: RehearsalConfig = RehearsalConfig()
    embedded: EmbeddedDataConfig = EmbeddedDataConfig()


class SvdConfig(_Section):
    cache: str | None = ".svd_cache"

    @field_validator("cache")
    @classmethod
    def _cache(cls, v: str | None) -> str | None:
        if v is None or "://" not in v:
            return v
        if not v.startswith("s3://"):
            raise ValueError("unsupported scheme: use a local directory or s3://bucket/prefix")
        if not v[len("s3://"):].partition("/")[0]:
            raise ValueError("names no bucket: use s3://bucket/prefix")
        return v


class FlowConfig(_Section):
    """How the Prefect flow retries a transient failure (a stage killed by a signal, a server or endpoint
    down) of a stage, of `push-data` and of `register`; config and data errors and bugs are never retried."""

    retries: int = Field(3, ge=0, le=20)
    retry_delays: list[float] = Field([10.0, 30.0, 90.0], min_length=1)

    @field_validator("retry_delays", mode="before")
    @classmethod
    def _delays(cls, v: Any) -> Any:
        if isinstance(v, list):  # whole numbers are fine as seconds
            v = [float(x) if isinstance(x, int) and not isinstance(x, bool) else x for x in v]
        return v

    @field_validator("retry_delays")
    @classmethod
    def _non_negative(cls, v: list[float]) -> list[float]:
        if any(x < 0 or x > 3600 for x in v):
            raise ValueError("every delay must be in [0, 3600] seconds")
        return v

    def delays(self) -> list[float]:
        """One delay per retry: `retry_delays`, its last value repeated as needed."""
        return [self.retry_delays[min(i, len(self.retry_delays) - 1)] for i in range(self.retries)]


class TrainConfig(_Section):
    learning_rate: float = Field(3e-4, gt=0, le=1)
    max_steps: int = Field(200, gt=0)
    batch_size: int = Field(8, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    warmup_steps: int = Field(10, ge=0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 42
    save_steps: int = Field(50, gt=0)
    logging_steps: int = Field(10, gt=0)
    gradient_checkpointing: bool = False
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # weight of KL(base || tuned) on the rehearsal rows' reply tokens (milora.model.distill); 0 = cross-entropy only
    rehearsal_kl: float = Field(0.0, ge=0)
    processes: int = Field(1, ge=1, le=1024)  # DDP processes on this node (the stage launches torchrun itself)
    nnodes: int = Field(1, ge=1, le=4096)  # nodes of a multi-node run (each node runs the stage; torchrun rendezvous)
    node_rank: int = Field(0, ge=0)  # this node's rank (the `static` rendezvous orders nodes by it)
    rdzv_endpoint: str | None = None  # host:port of the rendezvous, reachable from every node (nnodes > 1)
    rdzv_backend: Literal["c10d", "static"] = "c10d"  # torchrun rendezvous: c10d (elastic) | static (node_rank)

    @model_validator(mode="after")
    def _nodes(self) -> TrainConfig:
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError(f"train.nnodes = {self.nnodes} needs train.rdzv_endpoint (host:port of the "
                             "rendezvous, reachable from every node, e.g. node0.cluster:29400)")
        if self.node_rank >= self.nnodes:
            raise ValueError(f"train.node_rank = {self.node_rank} must be below train.nnodes = {self.nnodes}")
        if self.rdzv_endpoint is not None:
            host, _, port = self.rdzv_endpoint.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"train.rdzv_endpoint = {self.rdzv_endpoint!r} is not host:port "
                                 "(e.g. node0.cluster:29400)")
        return self


# Keys of `train` that say where and how a run is launched, not what is trained: they stay out of the training
# fingerprint, the adapter's lineage and the DVC params of the train stage (nnodes and processes stay in: they
# change the effective batch).
LAUNCH_KEYS = ("node_rank", "rdzv_endpoint", "rdzv_backend")


class SuiteConfig(_Section):
    """A benchmark test set scored by the evaluate stage (`eval.suites`), materialised by `ingest`."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$", max_length=64)  # metrics: suites.<name>.*
    source: str = Field(min_length=1)  # `embedded`, a file, a directory, s3://bucket/prefix or a Hub id
    format: Literal[FORMATS] = "auto"  # type: ignore[valid-type]
    max_examples: int | None = Field(None, gt=0)  # the first N rows (all when null)
    split: str = "test"  # the split of a Hub dataset id
    max_new_tokens: int | None = Field(None, gt=0)  # generation budget; null = eval.max_new_tokens


class LmEvalConfig(_Section):
    """lm-evaluation-harness tasks run on the fine-tuned model and on its base (`eval.lm_eval`)."""

    tasks: list[str] = []
    include_path: str | None = None  # a directory of local task YAMLs
    num_fewshot: int | None = Field(None, ge=0)
    limit: int | float | None = Field(None, gt=0)  # examples per task (a fraction when < 1)
    batch_size: int = Field(8, gt=0)


class EvalConfig(_Section):
    max_new_tokens: int = Field(48, gt=0)
    batch_size: int = Field(16, gt=0)
    max_examples: int = Field(200, gt=0)
    choice_mode: Literal["generate", "loglik", "both"] = "both"
    suites: list[SuiteConfig] = []
    lm_eval: LmEvalConfig = LmEvalConfig()
    score_base: bool = False  # also score every suite on the base: suites.<name>.base_accuracy, .retained, ...
    retention_suite: str | None = None  # the suite whose `retained` is the top-level `retention` (needs score_base)
    # What generation and scoring compute at (the evaluate stage, the registered pyfunc, compare): fp32 (faithful to
    # the weights), bf16 / fp16 autocast, auto (bf16 where native), or train (the adapter's training precision).
    precision: Literal["fp32", "bf16", "fp16", "auto", "train"] = "fp32"

    @model_validator(mode="after")
    def _retention_suite(self) -> EvalConfig:
        names = [s.name for s in self.suites]
        if self.retention_suite is not None and self.retention_suite not in names:
            raise ValueError(f"eval.retention_suite = {self.retention_suite!r} is not a suite of eval.suites; "
                             f"expected one of: {', '.join(names) or '(no suites defined)'}, or null")
        if self.retention_suite is not None and not self.score_base:
            raise ValueError(f"eval.retention_suite = {self.retention_suite!r} needs eval.score_base: true "
                             "(retention compares the tuned model's answers with the base's)")
        return self

    @field_validator("suites")
    @classmethod
    def _unique_names(cls, v: list[SuiteConfig]) -> list[SuiteConfig]:
        names = [s.name for s in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"suite names must be unique; repeated: {', '.join(dup)}")
        return v


class GuardConfig(_Section):
    metric: str  # any recorded metric (forgetting, suites.<name>.accuracy, lm_eval_delta.<task>.<metric>, ...)
    max_increase: float | None = None
    max_value: float | None = None
    max_decrease: float | None = None  # for accuracies: the most it may fall below the champion's
    min_value: float | None = None  # e.g. lm_eval_delta.arc_easy.acc >= -0.02 (at most 2 points below the base)


class RegisterConfig(_Section):
    model_name: str = Field("milora", min_length=1)
    metric: str = "average_accuracy"
    direction: Literal["maximize", "minimize"] = "maximize"
    min_delta: float = Field(0.0, ge=0)
    guards: list[GuardConfig] = []
    log_merged: bool = False
    log_lora_export: bool = True
    experiment: str = Field("milora", min_length=1)  # MLflow experiment holding the pipeline runs
    connect_retries: int = Field(3, ge=0, le=20)  # tries again this often when the tracking server is down
    retry_backoff_s: float = Field(2.0, ge=0, le=300)  # wait between tries, doubling (MLflow retries the first at once)


def check_cron(expr: str) -> str:
    """`expr` if Prefect's own `Cron` schedule accepts it, else ValueError. Called where a schedule is made
    (`milora deploy`, the worker's workspace source step), not when params are loaded: importing Prefect costs
    about a second, which every `milora stage` process would pay for a key it never reads."""
    from prefect.schedules import Cron

    try:
        Cron(expr, timezone="UTC")
    except ValueError as exc:
        raise ValueError(f"Prefect's Cron schedule refuses it ({str(exc).splitlines()[0]}); use five fields, minute "
                         "hour day-of-month month day-of-week, e.g. '0 3 * * *' for 03:00 every day, or a macro "
                         "such as @daily") from None
    return expr


def check_timezone(name: str) -> str:
    """`name` if it is an IANA timezone (what Prefect's `Cron` schedule takes), else ValueError."""
    import zoneinfo

    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError("not an IANA timezone (e.g. UTC, Europe/Paris, America/New_York)") from None
    return name


class ScheduleConfig(_Section):
    cron: str = "0 3 * * *"  # checked by Prefect's Cron where the schedule is made (check_cron)
    timezone: str = "UTC"

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, v: str) -> str:
        return check_timezone(v)


# `register` is a params section name; it shadows ABCMeta.register on the class, which nothing here uses.
warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)


class Config(_Section):
    """The whole of `params.yaml`."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    adapter: AdapterConfig = AdapterConfig()
    svd: SvdConfig = SvdConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    register: RegisterConfig = RegisterConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    flow: FlowConfig = FlowConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        if self.model.embedded.hidden_size % self.model.embedded.num_heads:
            raise ValueError(
                "model.embedded.hidden_size must be divisible by model.embedded.num_heads "
                f"({self.model.embedded.hidden_size} % {self.model.embedded.num_heads} != 0)"
            )
        if self.train.rehearsal_kl and not self.data.rehearsal.rows:
            raise ValueError(f"train.rehearsal_kl = {self.train.rehearsal_kl} distils the base on its rehearsal replies: "
                             "set data.rehearsal.rows > 0 (or train.rehearsal_kl: 0)")
        return self

    def flat(self) -> dict[str, Any]:
        """The config as flat dotted keys (for MLflow params and logs)."""
        return flatten(self.model_dump(mode="json"))


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings to `a.b.c` keys."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _section_fields(model_cls: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    cls: Any = model_cls
    for part in loc[:-1]:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        cls = field.annotation
    return list(cls.model_fields)


def _describe(err: dict[str, Any], source: str) -> str:
    loc = tuple(err.get("loc", ()))
    inner = getattr((err.get("ctx") or {}).get("error"), "errors", None)
    if inner:  # a nested schema that validates itself (the core AdapterConfig): name its params keys
        return "\n".join(_describe({**e, "loc": loc + tuple(e.get("loc", ()))}, source) for e in inner)
    key = ".".join(str(p) for p in loc) or "<root>"
    value = err.get("input")
    etype = err.get("type", "")
    if etype == "extra_forbidden":
        names = _section_fields(Config, loc)
        close = difflib.get_close_matches(str(loc[-1]), names, n=1)
        msg = f"{source}: unknown key '{key}'"
        if close:
            msg += f"; did you mean '{'.'.join(str(p) for p in loc[:-1] + (close[0],))}'?"
        if names:
            msg += f"{'' if close else '.'} Known keys here: {', '.join(names)}."
        return msg
    if etype == "literal_error":
        allowed = err.get("ctx", {}).get("expected", "")
        return f"{source}: {key} = {value!r} is not allowed; expected one of {allowed}"
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    if key == "<root>" or msg.startswith(key + "."):  # a section's own check names its keys itself
        return f"{source}: {msg}"
    return f"{source}: {key} = {value!r}: {msg}"


def validate(data: Mapping[str, Any] | None, source: str = "params.yaml") -> Config:
    """Validate a params mapping into a `Config`, raising `ConfigError` on the first problems found."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(data).__name__}")
    try:
        return Config.model_validate(dict(data))
    except ValidationError as exc:
        lines = [_describe(e, source) for e in exc.errors()]
        raise ConfigError("\n".join(lines)) from None


def _yaml() -> Any:
    from ruamel.yaml import YAML

    return YAML(typ="safe")  # what DVC reads params.yaml with (dvc.utils.serialize.parse_yaml): YAML 1.2


def parse_yaml(text: str) -> Any:
    """Parse YAML text the way DVC does (ruamel.yaml, YAML 1.2 core schema: `3e-4` is a float); raises
    ruamel's `YAMLError` on bad syntax."""
    return _yaml().load(text)


def dump_params(data: Mapping[str, Any]) -> str:
    """A params mapping as YAML that `parse_yaml` (and DVC) read back to the same values."""
    import io

    y = _yaml()
    y.default_flow_style = False
    y.sort_base_mapping_type_on_output = False  # keep the sections in params.yaml's order
    buf = io.StringIO()
    y.dump(dict(data), buf)
    return buf.getvalue()


def parse_override_value(text: str) -> Any:
    """Parse an override value (`-S train.learning_rate=3e-4`, or a string in the flow's `overrides`) as one
    YAML 1.2 value, exactly as it would read in params.yaml: numbers and lists keep their type; text that is
    not valid YAML (or is a comment) stays the text. Quote a value to keep it a string (`-S k='"012"'`)."""
    from ruamel.yaml import YAMLError

    try:
        value = parse_yaml(text)
    except YAMLError:
        return text
    return text if value is None and text.strip() not in ("", "~", "null", "Null", "NULL") else value


def split_sets(items: list[str]) -> dict[str, str]:
    """`["a.b=1", ...]` (the CLI's `-S KEY=VALUE`) -> `{"a.b": "1"}`, the values as typed."""
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like KEY=VALUE (e.g. adapter.rank=16)")
        k, v = item.split("=", 1)
        out[k.strip()] = v
    return out


def parse_sets(items: list[str]) -> dict[str, Any]:
    """`["a.b=1", ...]` (the CLI's `-S KEY=VALUE`) -> `{"a.b": 1}`, values parsed by `parse_override_value`."""
    return {k: parse_override_value(v) for k, v in split_sets(items).items()}


def set_dotted(data: MutableMapping[str, Any], overrides: Mapping[str, Any] | None,
               section: Callable[[], MutableMapping[str, Any]] = dict) -> MutableMapping[str, Any]:
    """Set dotted-key overrides (`{"adapter.rank": 16}`) in `data` in place, making missing sections with
    `section()`; the one place a dotted key is applied (to a params mapping, or a round-trip YAML document)."""
    for dotted, value in (overrides or {}).items():
        parts = str(dotted).split(".")
        node = data
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = section()
            if not isinstance(nxt, MutableMapping):
                raise ConfigError(f"override {dotted}: '{p}' is a value, not a section")
            node = nxt
        node[parts[-1]] = value
    return data


def apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """Return a copy of `data` with dotted-key overrides applied (`{"adapter.rank": 16}`)."""
    import copy

    return set_dotted(copy.deepcopy(data), overrides)  # type: ignore[return-value]  (a non-mapping: validate says so)


def read_params(path: str | os.PathLike[str] = "params.yaml") -> dict[str, Any]:
    """Read a params YAML file into a plain dict (no validation)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: no such params file (run from the project root, or pass --params)")
    from ruamel.yaml import YAMLError

    try:
        data = parse_yaml(p.read_text(encoding="utf-8"))
    except YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {' '.join(str(exc).split())}") from None
    return data or {}


def load_config(
    path: str | os.PathLike[str] = "params.yaml", overrides: Mapping[str, Any] | None = None
) -> Config:
    """Load and validate `params.yaml`, with optional dotted-key overrides applied first."""
    return validate(apply_overrides(read_params(path), overrides), source=str(path))
