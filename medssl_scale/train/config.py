"""The run config: one YAML file describes a run end to end, validated on load.

Sections: ``data`` (:class:`~medssl_scale.data.config.DataConfig`),
``objectives`` (name -> weight, or name -> settings with a ``weight``),
``optim``, ``deepspeed``, ``checkpoint``, ``tracking``. Unknown keys and
wrong types are errors that name the key; ``key.sub=value`` overrides from
the command line go through the same validation. The resolved config is
saved with the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

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
    model_config = ConfigDict(extra="forbid", frozen=True)


class OptimConfig(_Strict):
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-4, gt=0)  # peak, after warm-up (DAE: 1e-4)
    min_lr: float = Field(1e-5, ge=0)  # the end of the cosine
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
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
    extra: dict[str, Any] = Field(default_factory=dict)  # merged into the DeepSpeed config as is


class CheckpointConfig(_Strict):
    every: int = Field(100, ge=1)  # steps
    keep: int = Field(3, ge=1)  # newest complete checkpoints kept


class TrackingConfig(_Strict):
    experiment: str = "medssl"
    run_name: str | None = None
    log_every: int = Field(1, ge=1)  # steps between metric records
    plot_every: int = Field(100, ge=1)  # steps between loss-curve and reconstruction plots


class RunConfig(_Strict):
    name: str = "run"
    workdir: str = "runs"  # the run directory is workdir/name
    seed: int = Field(0, ge=0)
    steps: int = Field(1000, ge=1)  # optimizer steps
    kernels: Literal["auto", "reference", "triton"] = "auto"
    data: DataConfig
    objectives: dict[str, float | dict[str, Any]]
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
            if not isinstance(weight, (int, float)) or weight <= 0:
                raise ValueError(f"{name}: the weight must be a positive number, got {weight!r}")
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
