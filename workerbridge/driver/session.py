"""This session's Gateway: one per SparkSession (or Spark Connect session).

Covers: finding the active session, the key that names a session, and the
session's Gateway with its log file, started on first use where executors can
reach it (:func:`gateway_address`).  Does not cover:
the Gateway server itself (``gateway``).
"""

from __future__ import annotations

import os
import socket
import tempfile
import warnings
from typing import Optional

from pyspark.sql import SparkSession

from ..task.supervise import parse_bytes
from ..wire.errors import BadInputError
from . import sparklogs
from .gateway import Gateway
from .options import CONF_PREFIX
from .privatefiles import user_dir


def active_session():
    spark = SparkSession.getActiveSession()
    if spark is None:
        raise BadInputError("no active SparkSession; pass spark=")
    return spark


def session_key(spark) -> str:
    try:
        return f"app-{spark.sparkContext.applicationId}"
    except Exception:                     # Spark Connect has no SparkContext
        return f"connect-{getattr(spark, 'session_id', id(spark))}"


def session_gateway(spark) -> Gateway:
    """The session's Gateway, started on first use where executors can reach it."""
    key = session_key(spark)

    def path() -> Optional[str]:
        configured = spark.conf.get(CONF_PREFIX + "log.path", None)
        if configured:
            return configured
        # Spark Connect: spark.local.dir is the server's, not a path on this client host.
        server = None if key.startswith("connect-") else spark.conf.get("spark.local.dir", None)
        local = (server or tempfile.gettempdir()).split(",")[0]
        os.makedirs(local, exist_ok=True)
        try:
            return os.path.join(user_dir(local), f"workerbridge-{key}.log")
        except OSError as e:
            warnings.warn(f"workerbridge: no log file: {e}", stacklevel=3)
            return None

    def make() -> Gateway:
        bind, advertise = gateway_address(spark, key)
        return Gateway(path(), int(spark.conf.get(CONF_PREFIX + "log.maxLines", "100000")),
                       host=bind, port=int(spark.conf.get(CONF_PREFIX + "gateway.port", "0")),
                       max_bytes=parse_bytes(spark.conf.get(CONF_PREFIX + "log.maxBytes", "64m")),
                       advertise=advertise)

    gw = Gateway.for_key(key, make)
    gw.spark_worker_logs = sparklogs.enabled(spark)
    return gw


def gateway_address(spark, key: str) -> tuple[str, str]:
    """(address the Gateway binds, address Workers dial).

    ``spark.workerbridge.gateway.host`` wins; a local master keeps to 127.0.0.1; otherwise
    the addresses Spark itself gives executors for the driver (``spark.driver.bindAddress``
    and ``spark.driver.host``).  A Spark Connect client uses its own address on the
    route to the server (the server's driver address is not this process's)."""
    configured = spark.conf.get(CONF_PREFIX + "gateway.host", None)
    if configured:
        return configured, configured
    if key.startswith("connect-"):
        own = _address_towards(_connect_host(spark))
        return own, own
    master = str(spark.conf.get("spark.master", "local"))
    if master.startswith("local"):
        return "127.0.0.1", "127.0.0.1"
    host = spark.conf.get("spark.driver.host", None) or socket.gethostname()
    bind = spark.conf.get("spark.driver.bindAddress", None) or host
    return bind, host


def _connect_host(spark) -> Optional[str]:
    try:
        return str(spark.client.host).strip("[]")   # the Connect server this client dials
    except AttributeError:
        return None


def _address_towards(host: Optional[str]) -> str:
    """This machine's address on the route to ``host`` (127.0.0.1 for a local one)."""
    if not host or host in ("localhost", "127.0.0.1", "::1"):
        return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))            # a UDP connect sends nothing; it picks a route
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def existing_gateway(spark=None) -> Optional[Gateway]:
    """The Gateway of ``spark`` (default: the active session), or None before any job."""
    return Gateway.existing(session_key(spark or active_session()))
