"""The catalog: every dataset version flywheel makes, in one DuckDB file.

`store` opens the file and commits versions atomically; `schema` declares the tables (from
`flywheel.tables`) and views; `migrations` brings an older catalog up to date; `queries` holds
the named read queries the commands use.
"""

from flywheel.catalog.store import *  # noqa: F401,F403
from flywheel.catalog.store import (  # noqa: F401
    CODE_VERSION,
    KINDS,
    ROW_GROUP_SIZE,
    SCHEMA,
    TABLES,
    Catalog,
    Version,
    _arrow,
    _insert,
    damage,
    fingerprint,
    new_run_id,
    normalise_text,
    prompt_id,
    read_connection,
    stable_id,
)
