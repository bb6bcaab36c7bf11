"""The run config: one YAML file describes a run end to end, validated on load.

Sections: ``data`` (:class:`~medssl_scale.data.config.DataConfig`),
``objectives`` (name -> weight, or name -> settings with a ``weight``),
``optim``, ``deepspeed``, ``checkpoint``, ``tracking``. Unknown keys and
wrong types are errors that name the key; ``key.sub=value`` overrides from
the command line go through the same validation. The resolved config is
saved with the run.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from medssl_scale.config import apply_overrides, load_yaml
from medssl_scale.data.config import DataConfig


class _Strict(BaseModel):
    # allow_inf_nan=False: every float of every section is finite (a NaN compares false with every bound)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


Beta = Annotated[float, Field(ge=0, lt=1)]
Count = Annotated[int, Field(ge=1)]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")]  # one path component, never "..", "/" or hidden


class OptimConfig(_Strict):
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-4, gt=0)  # peak, after warm-up (DAE: 1e-4)
    min_lr: float = Field(1e-5, ge=0)  # the end of the cosine
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    momentum: float = Field(0.9, ge=0)  # sgd
    warmup_steps: int = Field(0, ge=0)
    clip_grad: float = Field(1.0, ge=0)  # 0: no clipping


    @model_validator(mode="after")
    def _floor(self) -> OptimConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr {self.min_lr} is above lr {self.lr}")
        return self


class DeepSpeedConfig(_Strict):
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["fp32", "bf16"] = "fp32"
    grad_accum: int = Field(1, ge=1)
    # How long a collective may wait before the process group gives up: a dead peer then ends the run (and a
    # Kubernetes Job restarts it from the last checkpoint) instead of hanging. DeepSpeed's default is 30 min.
    timeout_s: int = Field(1800, ge=10)
    # Merged into the DeepSpeed config: only the settings of :class:`DeepSpeedExtra`. DeepSpeed imports some of
    # its settings as dotted paths (torch_autocast's module list) and writes files where others say (monitors,
    # NVMe offload, profiler output), so free keys would let a config run code or write anywhere.
    extra: dict[str, Any] = Field(default_factory=dict)

    @field_validator("extra")
    @classmethod
    def _allowed_extra(cls, v: dict[str, Any]) -> dict[str, Any]:
        return DeepSpeedExtra.model_validate(v).model_dump(exclude_unset=True)


class _Offload(_Strict):
    device: Literal["cpu", "none"] = "none"
    pin_memory: bool = False
    ratio: float = Field(1.0, gt=0, le=1)


class _Zero(_Strict):
    overlap_comm: bool = False
    contiguous_gradients: bool = True
    reduce_scatter: bool = True
    allgather_partitions: bool = True
    round_robin_gradients: bool = False
    reduce_bucket_size: Count = 500_000_000
    allgather_bucket_size: Count = 500_000_000
    sub_group_size: Count = 1_000_000_000
    stage3_prefetch_bucket_size: Count = 50_000_000
    stage3_param_persistence_threshold: int = Field(100_000, ge=0)
    stage3_max_live_parameters: Count = 1_000_000_000
    stage3_max_reuse_distance: Count = 1_000_000_000
    stage3_gather_16bit_weights_on_model_save: bool = False
    offload_optimizer: _Offload | None = None
    offload_param: _Offload | None = None


class _ActivationCheckpointing(_Strict):
    partition_activations: bool = False
    cpu_checkpointing: bool = False
    contiguous_memory_optimization: bool = False
    number_checkpoints: Count | None = None
    synchronize_checkpoint_boundary: bool = False


class _DataTypes(_Strict):
    grad_accum_dtype: Literal["fp32", "fp16", "bf16"] | None = None


class DeepSpeedExtra(_Strict):
    """The DeepSpeed settings ``deepspeed.extra`` may hold (numbers, bools, fixed choices; no paths, no imports)."""

    zero_optimization: _Zero | None = None
    activation_checkpointing: _ActivationCheckpointing | None = None
    data_types: _DataTypes | None = None
    communication_data_type: Literal["fp32", "fp16", "bf16"] | None = None
    prescale_gradients: bool = False
    gradient_predivide_factor: float = Field(1.0, gt=0)
    sparse_gradients: bool = False
    wall_clock_breakdown: bool = False
    memory_breakdown: bool = False


class CheckpointConfig(_Strict):
    every: int = Field(100, ge=1)  # steps
    keep: int = Field(3, ge=1, le=1000)  # newest complete checkpoints kept


class TrackingConfig(_Strict):
    experiment: str = "medssl"
    run_name: str | None = None
    log_every: int = Field(1, ge=1)  # steps between metric records
    plot_every: int = Field(100, ge=1)  # steps between loss-curve and reconstruction plots


class RunConfig(_Strict):
    name: Name = "run"
    workdir: str = "runs"  # the run directory is workdir/name
    seed: int = Field(0, ge=0)
    steps: int = Field(1000, ge=1)  # optimizer steps
    kernels: Literal["auto", "reference", "triton"] = "auto"
    data: DataConfig
    objectives: dict[Name, float | dict[str, Any]]
    optim: OptimConfig = OptimConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    tracking: TrackingConfig = TrackingConfig()

    @field_validator("objectives")
    @classmethod
    def _one_or_more(cls, v: dict[str, Any]) -> dict[str, Any]:
        if not v:
            raise ValueError("name at least one objective, e.g. objectives: {dae: 1.0}")
        for name, spec in v.items():
            weight = spec.get("weight", 1.0) if isinstance(spec, dict) else spec
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
                raise ValueError(f"{name}: the weight must be a finite positive number, got {weight!r}")
        return v

    @model_validator(mode="after")
    def _warmup(self) -> RunConfig:
        if self.optim.warmup_steps >= self.steps:
            raise ValueError(f"optim.warmup_steps ({self.optim.warmup_steps}) must be below steps ({self.steps})")
        return self

    @model_validator(mode="after")
    def _objectives_known(self) -> RunConfig:
        # Checked here, not when the run builds them: a typo should fail before any process group exists.
        from medssl_scale.objectives import OBJECTIVES

        specs = self.objective_settings()
        for i, (name, _, _) in enumerate(specs):
            cls = OBJECTIVES.get(name) if name in OBJECTIVES.names() else None
            if cls is None:
                continue  # named by the check below
            if i == 0 and getattr(cls, "AUXILIARY", False):
                raise ValueError(f"objectives: {name} is added on top of another objective; name that one first, "
                                 f"e.g. objectives: {{pcrlv2: 1.0, {name}: 0.5}}")
            if i > 0 and not getattr(cls, "AUXILIARY", False):
                raise ValueError(f"objectives: {name} cannot follow {specs[0][0]}: only auxiliary objectives (lrc) are added on top")
        host = OBJECTIVES.get(specs[0][0]) if specs[0][0] in OBJECTIVES.names() else None
        if len(specs) > 1 and host is not None and not getattr(host, "DENSE_VIEWS", False):
            raise ValueError(f"objectives: {specs[0][0]} keeps no dense features of two views for {specs[1][0]} (pcrlv2 does)")
        if "lrc" in self.objectives and self.data.views.superpixels is None:
            raise ValueError("objectives.lrc needs region maps from the loader: set data.views.superpixels (e.g. superpixels: {})")
        if "lrc" not in self.objectives and self.data.views.superpixels is not None:
            raise ValueError("data.views.superpixels are computed for objectives.lrc only: drop them (they cost loader time)")
        if any(n in self.objectives for n in ("pcrlv2",)) and self.data.batch_size < 2:
            raise ValueError("pcrlv2's projectors use BatchNorm over the micro-batch: data.batch_size must be at least 2")
        if "mocov2" in self.objectives:
            if self.data.views.kind != "pair":
                raise ValueError("objectives.mocov2 compares two views of each crop: set data.views.kind: pair")
            if self.deepspeed.precision != "fp32":
                raise ValueError("objectives.mocov2 averages its key network in the parameters' precision: "
                                 "use deepspeed.precision: fp32 (in bf16 the momentum update rounds away)")
            if self.deepspeed.zero_stage == 3:
                raise ValueError("objectives.mocov2 needs whole parameters on every rank for its momentum average: "
                                 "use deepspeed.zero_stage 0, 1 or 2")
        for name, _, settings in specs:
            try:
                OBJECTIVES.check(name, **self.objective_args(name, settings))
            except ValidationError as e:
                raise ValueError("; ".join(f"objectives.{name}.{_loc(err)}: {err['msg'].removeprefix('Value error, ')}" for err in e.errors())) from None
            except ValueError as e:
                raise ValueError(f"objectives.{name}: {e}") from None
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.workdir) / self.name

    def objective_settings(self) -> list[tuple[str, float, dict[str, Any]]]:
        """(name, weight, settings) per objective, in config order."""
        out = []
        for name, spec in self.objectives.items():
            if isinstance(spec, dict):
                settings = dict(spec)
                weight = float(settings.pop("weight", 1.0))
            else:
                weight, settings = float(spec), {}
            out.append((name, weight, settings))
        return out

    def objective_args(self, name: str, settings: dict[str, Any]) -> dict[str, Any]:
        """An objective's settings plus what it takes from the run: kernels, seed, and the step count if it schedules by it."""
        from medssl_scale.objectives import OBJECTIVES

        run: dict[str, Any] = {"kernels": self.kernels, "seed": self.seed}
        if "total_steps" in OBJECTIVES.get(name).Config.model_fields:
            run["total_steps"] = self.steps
        return {**run, **settings}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _loc(err: dict[str, Any]) -> str:
    return ".".join(str(p) for p in err["loc"])


def load_run_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """A validated RunConfig from a YAML file and ``key=value`` overrides; errors name the key and the file."""
    raw = load_yaml(path) if path else {}
    raw = apply_overrides(raw, overrides or [])
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        where = f"{path}" if path else "the config"
        lines = [f"{where}: {len(e.errors())} problem(s)"]
        for err in e.errors():
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"  {_loc(err)}: {msg}" if err["loc"] else f"  {msg}")
        raise ValueError("\n".join(lines)) from None
