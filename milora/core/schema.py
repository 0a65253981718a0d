"""`AdapterConfig`: the one schema of an adapter, shared by the library API and the pipeline's typed config
(`params.yaml`'s `adapter:` section *is* an `AdapterConfig`). The method and solver lists live here, once.

Importing this module is cheap (no torch): the config of every stage embeds it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from milora.core.errors import InvalidInput

METHODS = ("milora", "pissa", "lora")
SOLVERS = ("auto", "full", "full64", "gram", "lowrank")
QUANTIZATIONS = ("none", "nf4", "fp4", "int8")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")

Method = Literal["milora", "pissa", "lora"]
Solver = Literal["auto", "full", "full64", "gram", "lowrank"]
Side = Literal["minor", "principal"]
Quantization = Literal["none", "nf4", "fp4", "int8"]


class AdapterConfigError(InvalidInput):
    """Bad `AdapterConfig` values; `errors` keeps pydantic's records (the typed config names params keys
    from them)."""

    def __init__(self, errors: list[Any]) -> None:
        self.errors = errors
        super().__init__("; ".join(_describe(e) for e in errors))


class AdapterConfig(BaseModel):
    """What adapter to build: method, rank, scaling, dropout, targets, SVD solver and the frozen weights' quantization.

    `alpha` defaults to `rank` for MiLoRA/PiSSA and `2 * rank` for LoRA (the MiLoRA paper's setup); the
    resolved value is what the adapter, its saved config and the lineage carry. `target_modules` is a list
    of module names / suffixes, or one regex string, as PEFT accepts. `quantization` (`nf4`, `fp4`: 4-bit,
    `int8`) stores the frozen target weights with bitsandbytes: for MiLoRA/PiSSA the residual `W - s B0 A0` of
    the full-precision SVD (QMiLoRA, QPiSSA), for LoRA `W` itself (QLoRA); the factors stay in full precision.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=False)

    method: Method = "milora"
    rank: int = Field(8, gt=0)
    alpha: float | None = Field(None, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | str = list(DEFAULT_TARGETS)
    svd_solver: Solver = "auto"
    quantization: Quantization = "none"

    def __init__(self, **data: Any) -> None:
        """Build from keywords; a bad value raises `InvalidInput` naming the field, the value and what is allowed.
        (Inside the pipeline's `Config` the nested validation names the params key instead.)"""
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise AdapterConfigError(exc.errors()) from None

    @field_validator("target_modules", mode="before")
    @classmethod
    def _as_list(cls, v: Any) -> Any:
        return list(v) if isinstance(v, tuple) else v

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v: list[str] | str) -> list[str] | str:
        if not v:
            raise ValueError("must name at least one module (a list of names or a regex string), e.g. q_proj, v_proj")
        return v

    @model_validator(mode="after")
    def _default_alpha(self) -> AdapterConfig:
        if self.alpha is None:
            self.alpha = float(2 * self.rank if self.method == "lora" else self.rank)
        return self

    @property
    def scale(self) -> float:
        """PEFT's LoRA scaling `alpha / rank`."""
        return float(self.alpha) / self.rank

    @property
    def side(self) -> Side | None:
        """Which singular triplets initialise the adapter (None for plain LoRA)."""
        return {"milora": "minor", "pissa": "principal"}.get(self.method)  # type: ignore[return-value]


_MESSAGES = {  # the library's words for a bad field (the same as before the schema was shared)
    "method": "unknown adapter method {v!r}; use one of " + ", ".join(METHODS),
    "svd_solver": "unknown svd_solver {v!r}; use one of " + ", ".join(SOLVERS),
    "quantization": "unknown adapter quantization {v!r}; use one of " + ", ".join(QUANTIZATIONS),
    "rank": "adapter rank must be a positive integer, got {v!r}",
    "alpha": "adapter alpha must be > 0, got {v!r}",
    "dropout": "adapter dropout must be in [0, 1), got {v!r}",
}


def _describe(err: Any) -> str:
    field = ".".join(str(p) for p in err.get("loc", ())) or "config"
    if field in _MESSAGES:
        return _MESSAGES[field].format(v=err.get("input"))
    return f"adapter {field}: {err.get('msg', 'invalid value').removeprefix('Value error, ')}"
