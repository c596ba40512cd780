"""The Consilia ClientApp (Flower Message API): thin adapters around the site trainer."""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from consilia.client.site_runtime import resolve_site
from consilia.common.constants import MessageKey
from consilia.common.instructions import RoundInstruction

__all__ = ["app"]

app = ClientApp()


def _prepare(msg: Message, context: Context):
    instr = RoundInstruction.from_config_record(msg.content[MessageKey.CONFIG.value])
    site = resolve_site(dict(context.node_config), dict(context.run_config), instr, context.run_id)
    site.enforce_policy(instr)
    state = msg.content[MessageKey.ARRAYS.value].to_torch_state_dict()
    return instr, site, state


def _reply(msg: Message, site_name: str, metrics: dict, arrays=None) -> Message:
    content = RecordDict(
        {
            MessageKey.METRICS.value: MetricRecord(metrics),
            MessageKey.SITE.value: ConfigRecord({"name": site_name}),
        }
    )
    if arrays is not None:
        content[MessageKey.ARRAYS.value] = ArrayRecord(arrays)
    return Message(content=content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this site's data."""
    instr, site, state = _prepare(msg, context)
    new_state, metrics = site.trainer.fit(state, instr)
    return _reply(msg, site.name, metrics, arrays=new_state)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this site's held-out data."""
    instr, site, state = _prepare(msg, context)
    return _reply(msg, site.name, site.trainer.evaluate(state, instr))
