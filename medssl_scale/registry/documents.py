"""The registry's JSON files, parsed as hostile input: each one has a schema, a size cap and a typed error naming it.

A registry entry may come from anyone who can write to the artifact store, so
``encoder.json`` and ``sha256.json`` are checked for size before they are
read, then for JSON, top-level type and every field (missing, extra or of the
wrong type) before anything is built from them.
"""

from __future__ import annotations

import json
import os
from typing import Annotated, Any, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from medssl_scale.io.bounded import FileTooLarge, NotARegularFile, read_bounded
from medssl_scale.registry.errors import EncoderLoadError, RegistryFormatError
from medssl_scale.store.layout import SHA256_HEX

MAX_JSON_BYTES = 1 << 20  # an encoder.json is a few hundred bytes; a megabyte is already absurd

Scalar = Union[StrictBool, StrictInt, StrictFloat, StrictStr, None]
Setting = Union[Scalar, Annotated[list[Scalar], Field(max_length=64)]]
Sha256 = Annotated[str, Field(pattern=f"^{SHA256_HEX.pattern}$")]


class EncoderDocument(BaseModel):
    """``encoder.json``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    format: StrictStr
    architecture: Annotated[dict[str, Setting], Field(max_length=64)]
    feature_channels: Annotated[list[StrictInt], Field(max_length=64)]
    feature_strides: Annotated[list[StrictInt], Field(max_length=64)]
    source: Annotated[dict[str, Scalar], Field(max_length=64)] = {}


class HashesDocument(BaseModel):
    """``sha256.json``: the digest of each published file."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    weights: Sha256 = Field(alias="encoder.safetensors")
    architecture: Sha256 = Field(alias="encoder.json")

    def by_file(self) -> dict[str, str]:
        return self.model_dump(by_alias=True)


def check_size(nbytes: int, name: str, where: str, cap: int = MAX_JSON_BYTES) -> None:
    if nbytes > cap:
        raise RegistryFormatError(f"{where}: {name} is {nbytes:,} bytes, over the {cap:,} a registry file may have; refusing to read it")


def read_file(path: str | os.PathLike[str], name: str, where: str, cap: int = MAX_JSON_BYTES) -> bytes:
    """The bytes of the registry file ``name`` at ``path``, read bounded (:func:`read_bounded`); typed errors naming ``name``."""
    try:
        return read_bounded(path, cap, name)
    except FileTooLarge:
        raise RegistryFormatError(f"{where}: {name} is over the {cap:,} bytes a registry file may have; refusing to read it") from None
    except NotARegularFile:
        raise RegistryFormatError(f"{where}: {name} is not a regular file; refusing to read it") from None
    except OSError as e:
        raise EncoderLoadError(f"{where}: {name} is missing or unreadable: {e.strerror or e}") from None


class _NotJSON(ValueError):
    pass


def _no_constant(token: str) -> Any:
    # Python's json takes NaN, Infinity and -Infinity, which JSON itself does not have.
    raise _NotJSON(f"{token} is not a JSON value")


def parse(data: bytes, model: type[BaseModel], name: str, where: str) -> Any:
    """``data`` (the bytes of the file ``name``) validated against ``model``; RegistryFormatError naming the file otherwise."""
    check_size(len(data), name, where)
    try:
        doc = json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, _NotJSON) as e:
        raise RegistryFormatError(f"{where}: {name} is not valid JSON: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(doc, dict):
        raise RegistryFormatError(f"{where}: {name} must hold a JSON object, found {type(doc).__name__}")
    try:
        return model.model_validate(doc)
    except ValidationError as e:
        problems = [f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}" for err in e.errors()[:5]]
        more = f" and {e.error_count() - 5} more" if e.error_count() > 5 else ""
        raise RegistryFormatError(f"{where}: {name} does not match its schema: {'; '.join(problems)}{more}") from None
