"""The driver's first contact with a database tracking store (tracking.uri=postgresql://..., mysql://...,
mssql://...), before anything is trained or written: one connection, as MLflow's SQLAlchemy store opens it.

A store that refuses the driver (a wrong or missing password, an unknown role or database, a host that does not
answer, its Python driver not installed) stops the sweep with one line naming tracking.uri, credentials redacted,
and exit 2 (a ConfigError). Without it MLflow retries a refused connection for about 100 s and fails with a raw
SQLAlchemy traceback after the sweep has written its plan (a later run of the same command is then refused as an
unfinished sweep). An `mlflow server` (http://...) and a SQLite file are not checked here: the server bridges its
own outages (registry.MetricSpool), and the driver creates the SQLite file itself.
"""
from __future__ import annotations

import re

from lpt_core.config import ConfigError
from orchestration.tracking.registry import redact

DATABASE_SCHEMES = {"postgresql": "postgresql", "postgres": "postgresql", "mysql": "mysql", "mssql": "mssql"}
# the DBAPI module each dialect's default driver imports -> what to install
DRIVER_PACKAGES = {"psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary", "pymysql": "pymysql",
                   "MySQLdb": "mysqlclient", "pyodbc": "pyodbc"}
HOW_TO_LOG_IN = {"postgresql": "give the password in ~/.pgpass or the file PGPASSFILE names (mode 0600), or in "
                               "PGPASSWORD, not on the command line (README: A team's store)"}


class TrackingStoreError(ConfigError):
    """The tracking store cannot be opened by this driver (credentials, database, host, driver module)."""


def database_kind(uri: str) -> str | None:
    """postgresql, mysql or mssql for a database server's URI (with or without +driver), else None."""
    scheme = uri.partition("://")[0].partition("+")[0].lower() if "://" in uri else ""
    return DATABASE_SCHEMES.get(scheme)


def _reason(err: BaseException) -> str:
    """The database's own words on one line (SQLAlchemy's wrapper and its link dropped), credentials redacted."""
    text = str(getattr(err, "orig", None) or err)
    return redact(re.sub(r"\s+", " ", text).strip()) or type(err).__name__


def check_store(uri: str, timeout_s: float = 10.0) -> None:
    """Opens one connection to a database tracking store and closes it; raises TrackingStoreError, naming
    tracking.uri (redacted) and the database's reason, if that fails. Other stores pass unchecked."""
    kind = database_kind(uri)
    if kind is None:
        return
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    where = f"tracking.uri={redact(uri)}"
    try:
        url = sqlalchemy.engine.make_url(uri)
        # a host that drops the packets would hold the driver for the OS's TCP timeout (minutes)
        connect_args = {"connect_timeout": int(timeout_s)} if kind == "postgresql" and \
            "connect_timeout" not in url.query else {}
        engine = sqlalchemy.create_engine(url, poolclass=NullPool, connect_args=connect_args)
    except ModuleNotFoundError as err:
        package = DRIVER_PACKAGES.get((err.name or "").partition(".")[0], err.name)
        raise TrackingStoreError(f"{where}: the Python driver for {kind} is not installed (no module "
                                 f"{err.name!r}): pip install '{package}'; nothing was trained or written") from None
    except Exception as err:  # noqa: BLE001 - a URI SQLAlchemy cannot parse or has no dialect for
        raise TrackingStoreError(f"{where}: not a database URI SQLAlchemy can open ({_reason(err)}); nothing was "
                                 f"trained or written") from None
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT 1"))
    except Exception as err:  # noqa: BLE001 - whatever refused us, the database's message says it
        hint = HOW_TO_LOG_IN.get(kind) if re.search(r"password|authentication", str(err), re.I) else None
        raise TrackingStoreError(f"{where}: cannot open the {kind} store: {_reason(err)}; nothing was trained or "
                                 f"written" + (f"; {hint}" if hint else "")) from None
    finally:
        engine.dispose()
