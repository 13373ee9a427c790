"""Function declarations: handler, source topics and Lambda-style event-source-mapping options."""

from __future__ import annotations

import tomllib
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from functions.filters import FilterError, RecordFilter


class ConfigError(ValueError):
    """A functions file that cannot be used, with a message naming the problem."""


class FunctionConfig(BaseModel):
    """One function and its event-source mapping (names follow AWS Lambda's options)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z][a-z0-9-]{0,62}$")
    handler: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", description="module.path:function")
    source_topics: list[str] = Field(min_length=1)
    consumer_group: str | None = None
    batch_size: int = Field(100, ge=1, le=10_000)
    maximum_batching_window_s: float = Field(0.5, ge=0, le=300)
    starting_position: Literal["TRIM_HORIZON", "LATEST", "AT_TIMESTAMP"] = "TRIM_HORIZON"
    starting_position_timestamp: datetime | None = None
    maximum_retry_attempts: int = Field(2, ge=-1, le=10_000)
    maximum_record_age_s: int = Field(-1, ge=-1, le=604_800)
    bisect_batch_on_error: bool = True
    on_failure_destination: str | None = None
    function_response_types: list[Literal["ReportBatchItemFailures"]] = Field(default_factory=list)
    filter_criteria: list[dict[str, Any] | str] = Field(default_factory=list)
    tumbling_window_s: int = Field(0, ge=0, le=900)
    timeout_s: float = Field(60.0, gt=0, le=900)
    workers_min: int = Field(1, ge=1, le=64)
    workers_max: int = Field(1, ge=1, le=64)
    scale_lag_per_worker: int = Field(1000, ge=1, description="autoscale: records of lag one worker should carry")
    scale_interval_s: float = Field(10.0, gt=0, le=3600, description="autoscale: seconds between lag checks")
    transactional: bool = Field(True, description="store offsets in the database in the handler's transaction")
    pipelined: bool = Field(False, description="transactional on PostgreSQL: the writes a handler defers "
                            "(context.defer) and the commit run in the background while the next batch is handled")
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _coherent(self) -> FunctionConfig:
        if self.workers_max < self.workers_min:
            raise ValueError("workers_max must be >= workers_min")
        if self.starting_position == "AT_TIMESTAMP" and self.starting_position_timestamp is None:
            raise ValueError("starting_position AT_TIMESTAMP needs starting_position_timestamp")
        try:
            RecordFilter(self.filter_criteria)
        except FilterError as exc:
            raise ValueError(str(exc)) from exc
        return self

    @property
    def record_filter(self) -> RecordFilter:
        """The compiled filter criteria."""
        return RecordFilter(self.filter_criteria)

    @property
    def group(self) -> str:
        """Consumer group id (defaults to the function name)."""
        return self.consumer_group or self.name

    @property
    def failure_topic(self) -> str:
        """On-failure destination topic (defaults to ``<name>.failures``)."""
        return self.on_failure_destination or f"{self.name}.failures"

    @property
    def report_item_failures(self) -> bool:
        """Whether the handler may return ``batchItemFailures``."""
        return "ReportBatchItemFailures" in self.function_response_types


def load_functions(path: Path) -> dict[str, FunctionConfig]:
    """Read and validate a functions file; raises ConfigError with a readable message."""
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such file") from exc
    except OSError as exc:  # a folder, no permission, ...
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    entries = doc.get("function")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: expected one or more [[function]] tables")
    functions: dict[str, FunctionConfig] = {}
    for index, entry in enumerate(entries):
        try:
            fn = FunctionConfig.model_validate(entry)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'function'}: {e['msg']}" for e in exc.errors())
            raise ConfigError(f"{path}: function #{index + 1}: {problems}") from exc
        if fn.name in functions:
            raise ConfigError(f"{path}: function {fn.name!r} declared twice")
        functions[fn.name] = fn
    return functions
