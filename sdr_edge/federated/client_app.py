"""The Flower ClientApp: signature query, local fine-tuning and evaluation on a SuperNode.

Handlers are thin: the work is in `sdr_edge.federated.task`. A node whose local data
is missing, empty or unreadable answers with an error reply naming the problem, so the
server logs it and goes on instead of waiting for the round timeout.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from sdr_edge.federated.fleet_rerank import RERANK_ACTION
from sdr_edge.federated.node_data import NodeDataError, with_simulation_defaults
from sdr_edge.federated.task import (
    BUNDLE_ACTION,
    evaluate_task,
    query_task,
    receive_bundle_task,
    rerank_task,
    train_task,
)

log = logging.getLogger(__name__)

# Flower reserves 0-8 for its own errors; ours say the node refused the task on purpose.
NODE_DATA_ERROR = 100
NODE_TASK_ERROR = 101

app = ClientApp()


def _reply(task: Callable[[RecordDict, dict, RecordDict], RecordDict], msg: Message,
           context: Context) -> Message:
    # context.state persists across the run's messages (FedBN keeps its BatchNorm there);
    # a simulated node's config gets its data and kit from the run (with_simulation_defaults)
    node_config = with_simulation_defaults(context.node_config, context.run_config)
    try:
        return Message(task(msg.content, node_config, context.state), reply_to=msg)
    except NodeDataError as exc:
        log.error("%s refused: %s", msg.metadata.message_type, exc)
        return Message(Error(NODE_DATA_ERROR, f"node data error: {exc}"), reply_to=msg)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        log.error("%s failed: %s", msg.metadata.message_type, exc)
        return Message(Error(NODE_TASK_ERROR, f"{type(exc).__name__}: {exc}"), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Reply with this node's signature (computed with the local kit) and image count."""
    return _reply(query_task, msg, context)


@app.query(BUNDLE_ACTION)
def bundle(msg: Message, context: Context) -> Message:
    """Keep the signed fine-tuned bundle the server sends at the end (if bundle-dir is set)."""
    return _reply(receive_bundle_task, msg, context)


@app.query(RERANK_ACTION)
def rerank(msg: Message, context: Context) -> Message:
    """Score the server's top-M candidate sub-nets on this node's data (one number each)."""
    return _reply(rerank_task, msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Fine-tune the received sub-net + head; reply with weights and num-examples."""
    return _reply(train_task, msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Reply with loss and accuracy on this node's held-out split."""
    return _reply(evaluate_task, msg, context)
