"""The MONAI dictionary transforms a config may name, and the arguments each may take.

A config is data, not code. MONAI resolves some string arguments as dotted
import paths (``LoadImaged(reader="pkg.fn")`` imports ``pkg`` and calls
``fn``) and others as devices or dtypes, so a transform named in YAML with
free arguments could run code. Only the transforms listed here may be named,
only with the arguments listed for each, and every value is a number, a bool,
a list of numbers, or a string from a fixed set of choices: no free string
ever reaches MONAI. This module imports neither MONAI nor torch, so configs
are checked before either is loaded.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError

_NUMBERS = ConfigDict(allow_inf_nan=False, strict=False)

Number = Annotated[float, Field(allow_inf_nan=False)]
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Prob = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
PositiveInt = Annotated[int, Field(ge=1, le=1 << 16)]
NonNegativeInt = Annotated[int, Field(ge=0, le=1 << 16)]
Axis = Annotated[int, Field(ge=0, le=2)]
Pair = tuple[Number, Number]
NonNegativePair = tuple[NonNegative, NonNegative]
Range = Number | Pair  # MONAI: a value v means (-v, v) or (1-v, 1+v); a pair is (low, high)
NonNegativeRange = NonNegative | NonNegativePair
PerAxisRange = Range | Annotated[list[Range], Field(max_length=3)]  # affine ranges: one per spatial axis
Size = Annotated[int, Field(ge=-1, le=1 << 16)]  # -1: the whole axis
Sizes = Size | Annotated[list[Size], Field(min_length=1, max_length=3)]
Key = Literal["image", "label"]
Keys = Annotated[list[Key], Field(min_length=1, max_length=2)]

GridMode = Literal["bilinear", "nearest"]
GridPadding = Literal["zeros", "border", "reflection"]
ZoomMode = Literal["nearest", "nearest-exact", "trilinear", "area"]
ZoomPadding = Literal["constant", "edge", "reflect", "symmetric", "minimum", "mean", "median", "maximum", "wrap"]
Approx = Literal["erf", "sampled", "scalespace"]


def _per_key(t: Any) -> Any:
    """One choice for all keys, or one per key (image, label): MONAI's convention."""
    return t | Annotated[list[t], Field(min_length=1, max_length=2)]


_COMMON: dict[str, Any] = {"keys": Keys, "allow_missing_keys": bool, "prob": Prob}
# The only arguments that take strings, each from its fixed choices; a string anywhere else is refused, not coerced.
_CHOICES = frozenset({"keys", "mode", "padding_mode", "approx"})

# kind "intensity": voxel values only, safe for views whose overlap boxes must stay valid;
# kind "spatial": moves voxels, plain crops only.
ALLOWED: dict[str, tuple[str, dict[str, Any]]] = {
    "RandGaussianNoised": ("intensity", {"mean": Number, "std": NonNegative, "sample_std": bool}),
    "RandRicianNoised": ("intensity", {"mean": Number, "std": NonNegative, "channel_wise": bool, "relative": bool,
                                       "sample_std": bool}),
    "RandScaleIntensityd": ("intensity", {"factors": Range, "channel_wise": bool}),
    "RandShiftIntensityd": ("intensity", {"offsets": Range, "safe": bool, "channel_wise": bool}),
    "RandStdShiftIntensityd": ("intensity", {"factors": Range, "nonzero": bool, "channel_wise": bool}),
    "RandAdjustContrastd": ("intensity", {"gamma": NonNegativeRange, "invert_image": bool, "retain_stats": bool}),
    "RandGaussianSmoothd": ("intensity", {"sigma_x": NonNegativePair, "sigma_y": NonNegativePair, "sigma_z": NonNegativePair,
                                          "approx": Approx}),
    "RandGaussianSharpend": ("intensity", {"sigma1_x": NonNegativePair, "sigma1_y": NonNegativePair, "sigma1_z": NonNegativePair,
                                           "sigma2_x": NonNegativePair | NonNegative, "sigma2_y": NonNegativePair | NonNegative,
                                           "sigma2_z": NonNegativePair | NonNegative, "alpha": NonNegativePair, "approx": Approx}),
    "RandBiasFieldd": ("intensity", {"degree": Annotated[int, Field(ge=1, le=10)], "coeff_range": Pair}),
    "RandHistogramShiftd": ("intensity", {"num_control_points": PositiveInt | tuple[PositiveInt, PositiveInt]}),
    "RandGibbsNoised": ("intensity", {"alpha": tuple[Prob, Prob]}),
    "RandCoarseDropoutd": ("intensity", {"holes": PositiveInt, "spatial_size": Sizes, "dropout_holes": bool,
                                         "fill_value": Range, "max_holes": PositiveInt, "max_spatial_size": Sizes}),
    "RandCoarseShuffled": ("intensity", {"holes": PositiveInt, "spatial_size": Sizes, "max_holes": PositiveInt,
                                         "max_spatial_size": Sizes}),
    "RandFlipd": ("spatial", {"spatial_axis": Axis | Annotated[list[Axis], Field(max_length=3)] | None}),
    "RandAxisFlipd": ("spatial", {}),
    "RandRotate90d": ("spatial", {"max_k": Annotated[int, Field(ge=1, le=3)], "spatial_axes": tuple[Axis, Axis]}),
    "RandRotated": ("spatial", {"range_x": Range, "range_y": Range, "range_z": Range, "keep_size": bool,
                                "mode": _per_key(GridMode), "padding_mode": _per_key(GridPadding), "align_corners": bool}),
    "RandZoomd": ("spatial", {"min_zoom": Annotated[float, Field(gt=0, allow_inf_nan=False)], "max_zoom": Annotated[float, Field(gt=0, allow_inf_nan=False)],
                              "mode": _per_key(ZoomMode), "padding_mode": _per_key(ZoomPadding), "keep_size": bool}),
    "RandAffined": ("spatial", {"spatial_size": Sizes | None, "rotate_range": PerAxisRange, "shear_range": PerAxisRange,
                                "translate_range": PerAxisRange, "scale_range": PerAxisRange, "mode": _per_key(GridMode),
                                "padding_mode": _per_key(GridPadding), "cache_grid": bool}),
    "Rand3DElasticd": ("spatial", {"sigma_range": NonNegativePair, "magnitude_range": NonNegativePair, "spatial_size": Sizes | None,
                                   "rotate_range": PerAxisRange, "shear_range": PerAxisRange, "translate_range": PerAxisRange,
                                   "scale_range": PerAxisRange, "mode": _per_key(GridMode), "padding_mode": _per_key(GridPadding)}),
}

_ADAPTERS: dict[tuple[str, str], TypeAdapter] = {}


def _adapter(name: str, arg: str, t: Any) -> TypeAdapter:
    if (name, arg) not in _ADAPTERS:
        _ADAPTERS[name, arg] = TypeAdapter(t, config=_NUMBERS)
    return _ADAPTERS[name, arg]


def arguments(name: str) -> dict[str, Any]:
    """The arguments ``name`` may take, with their types; ValueError if a config may not name it."""
    if name not in ALLOWED:
        raise ValueError(f"{name!r} is not a MONAI dictionary transform a config may name; "
                         f"allowed: {', '.join(sorted(ALLOWED))}")
    return {**_COMMON, **ALLOWED[name][1]}


def kind(name: str) -> str:
    """"intensity" (voxel values only) or "spatial" (moves voxels)."""
    arguments(name)
    return ALLOWED[name][0]


def check(name: str, args: dict[str, Any]) -> dict[str, Any]:
    """``args`` validated for transform ``name`` (numbers finite, strings from fixed choices); errors name the argument."""
    allowed = arguments(name)
    out = {}
    for arg, value in args.items():
        if arg not in allowed:
            raise ValueError(f"{name}.{arg}: not an argument a config may give {name}; allowed: {', '.join(sorted(allowed))}")
        if arg not in _CHOICES and _has_string(value):
            raise ValueError(f"{name}.{arg}: {value!r} is refused: it takes numbers or bools, never a string "
                             "(a config names no functions, classes or modules)")
        try:
            out[arg] = _adapter(name, arg, allowed[arg]).validate_python(value)
        except ValidationError as e:
            problems = "; ".join(err["msg"] for err in e.errors()[:3])
            raise ValueError(f"{name}.{arg}: {value!r} is refused ({problems})") from None
    return out


def _has_string(value: Any) -> bool:
    if isinstance(value, (str, bytes)):
        return True
    if isinstance(value, (list, tuple)):
        return any(_has_string(v) for v in value)
    return isinstance(value, dict)  # no argument here takes a mapping
