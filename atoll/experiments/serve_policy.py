"""Serve a trained chunk policy over websockets (openpi's protocol).

    python -m atoll.experiments.serve_policy --checkpoint=runs/icpt --port=8000
    python -m atoll.experiments.serve_policy --checkpoint=runs/icpt-prefix --strategy=prefix --port=8000

Clients (openpi_client's WebsocketClientPolicy, or atoll.serve.client.PolicyClient)
get the server's metadata on connect, send {"state": float [O] or [T_o, O]}
maps and get {"actions": [H, A], "server_timing": {...}} back; see
atoll.serve.server for the keys, errors and batching. The policy is compiled
for every batch size before the port opens (--nowarm_up skips it).
"""

from __future__ import annotations

import asyncio
import sys

import numpy as np
from absl import app, flags, logging

from atoll.core import chunking
from atoll.experiments import eval_policy
from atoll.parallel import checkpoint
from atoll.serve import server as server_lib

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A train_policy workdir.")
_HOST = flags.DEFINE_string("host", "0.0.0.0", "Interface to listen on.")
_PORT = flags.DEFINE_integer("port", 8000, "Port (0: any free one).")
_STRATEGY = flags.DEFINE_enum("strategy", None, list(chunking.STRATEGIES),
                              "Execution strategy whose sampler answers requests that carry 'running_actions' "
                              "(rtc, prefix, remac, faster); others sample plainly.")
_EXECUTE = flags.DEFINE_integer("execute_steps", None, "s reported in the metadata (default: the run's).")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 16, "Most requests answered by one batched inference.")
_WARM_UP = flags.DEFINE_bool("warm_up", True, "Compile every batch size before serving.")
_MAX_MESSAGE_MB = flags.DEFINE_float("max_message_mb", 64.0, "Largest request in MiB; a bigger one closes its "
                                     "connection (0: no limit, as openpi's servers).")
_LOG_EVERY = flags.DEFINE_integer("log_every", 100, "Print latency percentiles every this many requests (0: never).")


def make_chunk_policy_server(checkpoint: str, *, execute_steps: int | None = None, strategy: str | None = None,
                             seed: int = 0) -> server_lib.ChunkPolicyServer:
    """A ChunkPolicyServer for a train_policy workdir (its EMA weights)."""
    config, policy, weights, step = eval_policy.load_policy(checkpoint)
    s = execute_steps or config.policy.execute_steps
    if strategy:
        chunking.check_conditioning(chunking.Strategy(strategy), config.policy.get("conditioning", "none"),
                                    config.objective.kind)
    return server_lib.ChunkPolicyServer(policy, weights, execute_steps=s, strategy=strategy, seed=seed,
                                        info={"checkpoint": str(checkpoint), "step": step, "task": config.env.task,
                                              "suite": config.env.suite, "objective": config.objective.kind})


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.ERROR)  # orbax warns about metadata a read does not need
    if not _CHECKPOINT.value:
        sys.exit("error: --checkpoint is required (a train_policy workdir)")
    try:
        policy = make_chunk_policy_server(_CHECKPOINT.value, execute_steps=_EXECUTE.value,
                                                     strategy=_STRATEGY.value)
        server = server_lib.PolicyServer(policy, _HOST.value, _PORT.value, _MAX_BATCH.value, _LOG_EVERY.value,
                                         max_message_mb=_MAX_MESSAGE_MB.value or None)
    except (ValueError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if _WARM_UP.value:
        meta = policy.metadata()
        plain = {"state": np.zeros(meta["obs_dim"], np.float32)}
        guided = {**plain, "running_actions": np.zeros((meta["action_horizon"], meta["action_dim"]), np.float32),
                  "delay": 0}
        server.warm_up(plain, *([guided] if _STRATEGY.value in chunking.GUIDED else []))
    logging.set_verbosity(logging.WARNING)
    try:
        asyncio.run(server.serve_forever())
    except KeyboardInterrupt:
        pass
    except OSError as e:  # the port is taken, or the host is not ours
        print(f"error: cannot listen on {_HOST.value}:{_PORT.value}: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
