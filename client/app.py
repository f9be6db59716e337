"""The ClientApp: one domain silo. Its data never leaves it; only weights and metrics do.

Handlers (Flower message types):
- ``query.info``: the silo's domain, role and sample counts (no data).
- ``train`` (sources): evaluate the received global model on the local test split, train
  locally (with FedKA's alignment term when target embeddings come along), reply with weights.
- ``evaluate``: evaluate the received weights on the local test split (the target silo also
  after each test-time adaptation that ``tta.methods`` enables).
- ``query.embed`` / ``train.vote`` (target silo, FedKA): see ``client/target.py``.
On a deployment, the ``warm.forward`` mod hands every message to the silo's long-lived runtime
(``client/silo_runtime.py``) when one serves this silo, so the handlers below run there, warm.
Errors the operator can fix (bad node-config, missing data, mismatched model) come back to the
server as one-line error replies. Every reply's metrics carry ``handler-seconds`` and, for the
first message of a process (every message on a deployment: Flower starts a ClientApp process per
message), ``start-seconds`` (from the process's start to the handler) and ``import-seconds``
(importing torch inside the handler): docs/performance.md.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable

from flwr.app import Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import runtime, source, state, target, warm
from fedalign.config import ConfigError
from fedalign.data import DataError
from fedalign.protocol import ARRAYS, METRICS, SILO

log = logging.getLogger("fedalign.client")
app = ClientApp(mods=[warm.forward])  # a warm silo runtime handles the message when one serves

# Error code for problems the operator can fix; Flower's own codes are below 100.
OPERATOR_ERROR = 100


def _reply_errors(handler: Callable[[Message, Context], Message]) -> Callable:
    """Turn operator errors into one-line error replies instead of tracebacks."""

    @functools.wraps(handler)
    def wrapper(message: Message, context: Context) -> Message:
        entered = time.time()
        try:
            return runtime.timed(handler(message, context), entered)
        except (ConfigError, DataError, ValueError, FloatingPointError) as exc:
            domain = context.node_config.get("domain", f"node {context.node_id}")
            log.error("silo %s: %s", domain, exc)
            return Message(Error(OPERATOR_ERROR, f"silo {domain}: {exc}"), reply_to=message)

    return wrapper


@app.query("info")
@_reply_errors
def info(message: Message, context: Context) -> Message:
    silo, _, data = runtime.setup(message, context)
    metrics = MetricRecord({"num-train": len(data.y_train), "num-test": len(data.y_test)})
    log.info(
        "silo %s (%s): %d train / %d test samples",
        silo.domain,
        silo.role,
        len(data.y_train),
        len(data.y_test),
    )
    return Message(
        RecordDict({SILO: runtime.silo_record(silo), METRICS: metrics}), reply_to=message
    )


@app.train()
@_reply_errors
def train(message: Message, context: Context) -> Message:
    return source.train(message, context)


@app.evaluate()
@_reply_errors
def evaluate(message: Message, context: Context) -> Message:
    from fedalign.train import evaluate as evaluate_model

    silo, cfg, data = runtime.setup(message, context)
    model = runtime.build(cfg, message.content[ARRAYS])
    device = runtime.device(silo, cfg)
    result = evaluate_model(model, data.x_test, data.y_test, device, runtime.eval_batch(cfg))
    tag = f"silo {silo.domain} round {cfg.get('server-round')}:"
    log.info("%s test acc %.4f", tag, result["test-accuracy"])
    if silo.role == "target":  # test-time adaptation, when the config enables it
        result.update(target.adapted_accuracies(model, data, cfg, device, tag))
    metrics = MetricRecord({"num-examples": len(data.y_test), **result})
    if cfg.get("run-complete", False):
        state.discard(silo, cfg)
    return Message(
        RecordDict({METRICS: metrics, SILO: runtime.silo_record(silo)}), reply_to=message
    )


@app.query("embed")
@_reply_errors
def embed(message: Message, context: Context) -> Message:
    return target.embed_and_evaluate(message, context)


@app.train("vote")
@_reply_errors
def vote(message: Message, context: Context) -> Message:
    return target.vote_and_fine_tune(message, context)
