"""Celery interop cases against a running Ferry: the AMQP broker URL (kombu / py-amqp), a worker
in this process (the solo pool) and the `rpc://` result backend (results come back over AMQP,
no other service needed).

Usage: python3 interop_celery.py HOST PORT
Prints one line per case, "ok   <case>" or "FAIL <case>: <why>", and exits with the number of
failed cases. Every wait is bounded.
"""

import logging
import os
import sys
import uuid

from celery import Celery
from celery.contrib.testing.worker import start_worker

import interop_case
from interop_case import case

HOST = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1"
PORT = int(sys.argv[2]) if len(sys.argv) > 2 else 5672

logging.getLogger("celery").setLevel(logging.ERROR)

app = Celery("interop", broker=f"amqp://guest:guest@{HOST}:{PORT}//", backend="rpc://")
app.conf.update(
    task_default_queue=f"interop.celery.{uuid.uuid4().hex[:8]}",
    broker_connection_retry_on_startup=False,
    broker_connection_max_retries=1,
    worker_hijack_root_logger=False,
    result_expires=60,
)


@app.task(name="interop.add")
def add(x, y):
    return x + y


@app.task(name="interop.fail")
def fail():
    raise ValueError("on purpose")


# The failing task is on purpose: keep its traceback out of the interop log.
logging.getLogger("celery.app.trace").disabled = True


try:
    worker = start_worker(app, pool="solo", concurrency=1, perform_ping_check=False, shutdown_timeout=10)
    worker.__enter__()
except Exception as e:  # noqa: BLE001 - reported as a failed case
    worker = None
    print(f"FAIL Celery: a worker starts against Ferry: {type(e).__name__}: {e}", flush=True)
    sys.exit(1)


@case("Celery: a task round trip through the AMQP broker, result over rpc://")
def round_trip():
    result = add.delay(2, 3)
    got = result.get(timeout=15)
    assert got == 5, got


@case("Celery: a group of tasks, and a failing task's exception comes back")
def group_and_failure():
    from celery import group

    results = group(add.s(i, i) for i in range(5)).apply_async()
    got = results.get(timeout=15)
    assert got == [0, 2, 4, 6, 8], got
    r = fail.delay()
    try:
        r.get(timeout=15)
    except ValueError as e:
        assert "on purpose" in str(e), e
    else:
        raise AssertionError("no exception")


# The test worker's thread does not always stop within its timeout once a task has failed;
# the cases are done, so leave without waiting for it.
sys.stdout.flush()
os._exit(interop_case._failed)
