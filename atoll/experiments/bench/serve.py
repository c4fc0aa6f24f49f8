"""Load test of the policy server on loopback: N concurrent clients for a bounded time.

    python -m atoll.experiments.bench.serve --clients=16 --seconds=10
    python -m atoll.experiments.bench.serve --checkpoint=runs/icpt --clients=1,4,16 --seconds=20

The server (atoll.serve.server with batching, warmed up: every batch size is
compiled before the clock starts) serves a chunk policy: --checkpoint's, or
policy.py:tiny's network at its initial weights (inference costs the same
trained or not). Each client thread opens its own connection and sends
observations back to back until the time is up, timing each request from send
to reply. In the same run, the baseline: the same jitted policy called
directly in-process on one observation (no network, no batching).

One JSON line per row:
  mode "direct": {"mode", "requests", "p50_ms", "p90_ms", "p99_ms"}
  mode "server": {"mode", "clients", "seconds", "requests", "errors",
                  "throughput_rps", "p50_ms", "p90_ms", "p99_ms",
                  "mean_batch", "ratio_p50_to_direct", "ratio_throughput_to_one_client"}
then {"summary": ...} with the largest client count's figures.
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
from absl import app, flags, logging

from atoll.serve import client as client_lib
from atoll.serve import server as server_lib

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A train_policy workdir (default: policy.py:tiny at init).")
_CLIENTS = flags.DEFINE_list("clients", ["1", "16"], "Concurrent client counts, one load run each.")
_SECONDS = flags.DEFINE_float("seconds", 10.0, "Length of each load run.")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 16, "The server's largest batch.")
_DIRECT = flags.DEFINE_integer("direct_calls", 200, "In-process calls timed for the baseline.")


def tiny_policy_server(seed: int = 0) -> server_lib.ChunkPolicyServer:
    """policy.py:tiny's network at its initial weights, identity normalizers."""
    import jax
    import jax.numpy as jnp

    from atoll.configs import policy as policy_config
    from atoll.experiments import eval_policy

    config = policy_config.get_config("tiny")
    policy = eval_policy.policy_from_config(config, action_dim=2)
    obs_dim = 8
    params = policy.model.init(jax.random.key(seed), jnp.zeros((1, policy.action_horizon, 2)),
                               jnp.zeros((1, policy.action_horizon)), jnp.zeros((1, policy.obs_horizon, obs_dim)))
    weights = {"params": params, "obs_norm": {"offset_D": jnp.zeros(obs_dim), "scale_D": jnp.ones(obs_dim)},
               "act_norm": {"offset_D": jnp.zeros(2), "scale_D": jnp.ones(2)}}
    return server_lib.ChunkPolicyServer(policy, weights, execute_steps=config.policy.execute_steps,
                                        info={"checkpoint": None, "task": "intercept (untrained)"})


def _ms(xs) -> dict[str, float]:
    a = np.asarray(xs, float) * 1e3
    return {f"p{q}_ms": float(np.percentile(a, q)) for q in (50, 90, 99)} if a.size else {}


def direct_baseline(policy: server_lib.ChunkPolicyServer, calls: int, obs_dim: int) -> dict:
    request = policy.parse({"state": np.zeros(obs_dim, np.float32)}, policy.new_session())
    policy.infer([request], 1)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        policy.infer([request], 1)  # returns numpy: the result is on the host
        times.append(time.perf_counter() - t0)
    return {"mode": "direct", "requests": calls, **_ms(times)}


def load(port: int, clients: int, seconds: float, obs_dim: int) -> dict:
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    start = threading.Barrier(clients + 1)

    def one(i: int) -> None:
        rng = np.random.default_rng(i)
        try:
            c = client_lib.PolicyClient(port=port)
        except Exception:  # noqa: BLE001 - a failed connection is an error of the run
            errors[i] += 1
            start.wait()
            return
        start.wait()
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            obs = {"state": rng.standard_normal(obs_dim).astype(np.float32)}
            t0 = time.perf_counter()
            try:
                c.infer(obs)
                latencies[i].append(time.perf_counter() - t0)
            except Exception:  # noqa: BLE001 - counted
                errors[i] += 1
        c.close()

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join(seconds + 60)
    wall = time.perf_counter() - t0
    flat = [x for xs in latencies for x in xs]
    return {"mode": "server", "clients": clients, "seconds": wall, "requests": len(flat), "errors": sum(errors),
            "throughput_rps": len(flat) / wall, **_ms(flat)}


def run(policy: server_lib.ChunkPolicyServer, clients: list[int], seconds: float, max_batch: int,
        direct_calls: int, emit=print) -> list[dict]:
    obs_dim = policy.metadata()["obs_dim"]
    rows = [direct_baseline(policy, direct_calls, obs_dim)]
    emit(json.dumps(rows[0]))
    server = server_lib.PolicyServer(policy, host="127.0.0.1", port=0, max_batch=max_batch)
    server.warm_up({"state": np.zeros(obs_dim, np.float32)})
    one_client = None
    with server_lib.BackgroundServer(server) as port:
        for n in clients:
            batches_before = dict(server.stats.batch_sizes)
            row = load(port, n, seconds, obs_dim)
            sizes = {k: v - batches_before.get(k, 0) for k, v in server.stats.batch_sizes.items()}
            total = sum(sizes.values())
            row["mean_batch"] = sum(k * v for k, v in sizes.items()) / total if total else 0.0
            row["ratio_p50_to_direct"] = row.get("p50_ms", float("nan")) / rows[0]["p50_ms"]
            if n == 1:
                one_client = row["throughput_rps"]
            row["ratio_throughput_to_one_client"] = row["throughput_rps"] / one_client if one_client else None
            rows.append(row)
            emit(json.dumps(row))
    last = rows[-1]
    summary = {"summary": {"clients": last["clients"], "errors": last["errors"], "p50_ms": last.get("p50_ms"),
                           "p99_ms": last.get("p99_ms"), "throughput_rps": last["throughput_rps"],
                           "direct_p50_ms": rows[0]["p50_ms"], "checkpoint": policy.metadata().get("checkpoint")}}
    emit(json.dumps(summary))
    return rows + [summary]


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.ERROR)
    if _CHECKPOINT.value:
        from atoll.experiments.serve_policy import make_chunk_policy_server

        policy = make_chunk_policy_server(_CHECKPOINT.value)
    else:
        policy = tiny_policy_server()
    clients = [int(c) for c in _CLIENTS.value]
    if any(c < 1 for c in clients) or _SECONDS.value <= 0:
        raise app.UsageError("--clients must be positive ints and --seconds positive")
    run(policy, sorted(clients), _SECONDS.value, _MAX_BATCH.value, _DIRECT.value)


if __name__ == "__main__":
    app.run(main)
