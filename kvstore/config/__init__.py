"""The cluster file (CONTRACT §2): pydantic models, YAML loading, env overrides, and
error messages an operator can act on.

Every name is imported from here (`from kvstore.config import ClusterConfig,
load_config`); the package is split by purpose:
- models.py: the schema — every section's pydantic model, defaults, field and
  cross-field checks, and the values resolved from defaults (`ClusterConfig.acks`);
- problems.py: `Problem` / `ConfigProblems` and turning pydantic's and YAML's errors
  into one-line messages with the setting's location, its YAML line and a did-you-mean;
- loading.py: reading the file, `KVSTORE_<SECTION>__<KEY>` overrides and their
  precedence, `check_config` / `check_file` (every problem, for `kvstore config check`)
  and `parse_config` / `load_config` (a `ConfigError` whose message is one line).

Imports: kvstore.config.{models, problems, loading} (and through them pydantic, yaml,
the standard library, kvstore.errors, kvstore.ids).
"""

from __future__ import annotations

from kvstore.config.loading import (
    ENV_PREFIX,
    ENV_SEPARATOR,
    check_config,
    check_file,
    env_overrides,
    load_config,
    parse_config,
    relative_to,
)
from kvstore.config.models import (
    Acks,
    ClientAuth,
    ClusterConfig,
    ClusterSection,
    FailureDetectorSection,
    FsyncPolicy,
    LimitsSection,
    LoggingSection,
    Mode,
    NodeSpec,
    ReplicationSection,
    SecuritySection,
    StorageSection,
    TestingSection,
    TlsSection,
    cross_field_problems,
    resolved_acks,
    split_host_port,
    url_scheme_problems,
)
from kvstore.config.problems import (
    ConfigProblems,
    Problem,
    duplicate_keys,
    line_of,
    model_at,
    one_line,
)

__all__ = [
    # models.py
    "Acks", "ClientAuth", "ClusterConfig", "ClusterSection", "FailureDetectorSection", "FsyncPolicy",
    "LimitsSection", "LoggingSection", "Mode", "NodeSpec", "ReplicationSection", "SecuritySection",
    "StorageSection", "TestingSection", "TlsSection", "cross_field_problems", "resolved_acks",
    "split_host_port", "url_scheme_problems",
    # problems.py
    "ConfigProblems", "Problem", "duplicate_keys", "line_of", "model_at", "one_line",
    # loading.py
    "ENV_PREFIX", "ENV_SEPARATOR", "check_config", "check_file", "env_overrides", "load_config",
    "parse_config", "relative_to",
]
