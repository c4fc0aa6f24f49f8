"""The policy server: openpi's protocol, batching, and malformed requests."""

import dataclasses
import threading

import jax.numpy as jnp
import msgpack
import numpy as np
import pytest

from atoll.serve import client as client_lib
from atoll.serve import server as server_lib
from atoll.serve import wire

T_O, OBS, H = 2, 8, 4


@dataclasses.dataclass(frozen=True)
class EchoPolicy:
    """Answers with what it was given: act returns the observation history
    (H = T_o rows of O values), act_with the running chunk plus the delay."""

    obs_horizon: int = T_O
    action_horizon: int = T_O
    action_dim: int = OBS

    @property
    def objective(self):
        return dataclasses.make_dataclass("O", [("network_evaluations", int, 1)])()

    def act(self, weights, obs_BTO, key):
        return obs_BTO * weights["scale"]

    def act_with(self, strategy, s, weights, obs_BTO, running_BHA, d, first, key):
        return running_BHA + jnp.asarray(d, jnp.float32)[:, None, None]


WEIGHTS = {"scale": jnp.ones(()), "obs_norm": {"offset_D": np.zeros(OBS, np.float32)}}


@pytest.fixture
def served():
    policy = server_lib.ChunkPolicyServer(EchoPolicy(), WEIGHTS, execute_steps=1, strategy="prefix")
    server = server_lib.PolicyServer(policy, host="127.0.0.1", port=0, max_batch=8)
    with server_lib.BackgroundServer(server) as port:
        yield server, port


def test_an_openpi_style_client_gets_metadata_and_actions(served):
    server, port = served
    with client_lib.PolicyClient(port=port) as c:
        assert c.metadata["obs_horizon"] == T_O and c.metadata["action_dim"] == OBS and c.metadata["server"] == "atoll"
        first = c.infer({"state": np.arange(OBS, dtype=np.float32)})
        assert first["actions"].dtype == np.float32 and first["actions"].shape == (T_O, OBS)
        assert set(first["server_timing"]) == {"infer_ms", "total_ms"}
        # the server keeps this connection's history, the first observation repeated
        np.testing.assert_array_equal(first["actions"], np.stack([np.arange(OBS)] * 2))
        second = c.infer({"observation/state": np.full(OBS, 7.0)})
        np.testing.assert_array_equal(second["actions"], np.stack([np.arange(OBS), np.full(OBS, 7.0)]))
        fresh = c.infer({"state": np.ones(OBS), "reset": True})
        np.testing.assert_array_equal(fresh["actions"], np.ones((T_O, OBS)))
        # a full history from the client is used as it is; a running chunk goes to the strategy's sampler
        history = np.arange(T_O * OBS, dtype=np.float64).reshape(T_O, OBS)
        np.testing.assert_array_equal(c.infer({"state": history})["actions"], history)
        guided = c.infer({"state": history, "running_actions": np.ones((T_O, OBS), np.float32), "delay": 1})
        np.testing.assert_array_equal(guided["actions"], np.full((T_O, OBS), 2.0))
    assert server.stats.requests == 5 and server.stats.errors == 0 and len(server.stats.latency_ms) == 5


@pytest.mark.parametrize("message,error", [
    (b"\xc1\x00garbage", "not a msgpack message"),
    ("a text frame", "expected a binary message"),
    (msgpack.packb([1, 2, 3]), "must be a map"),
    (wire.packb({"image": np.zeros(3)}), "missing key 'state'"),
    (wire.packb({"state": np.zeros(OBS + 1)}), "has shape (9,)"),
    (wire.packb({"state": "eight numbers"}), "numeric array"),
    (wire.packb({"state": np.full(OBS, np.nan)}), "NaN"),
    (msgpack.packb({"state": [[1.0, 2.0], [3.0]]}), "not a rectangular array"),
    (wire.packb({"state": np.zeros(OBS), "reset": np.ones(3)}), "'reset' must be true or false"),
    (msgpack.packb({"state": {b"__ndarray__": True, b"data": b"\x00" * 3, b"dtype": "<f4", b"shape": [OBS]}}),
     "malformed array"),
    (wire.packb({"state": np.zeros(OBS), "running_actions": np.zeros((T_O, OBS)), "delay": -1}), "'delay'"),
])
def test_a_bad_request_gets_an_error_and_the_connection_keeps_working(served, message, error):
    server, port = served
    with client_lib.PolicyClient(port=port) as c:
        with pytest.raises(client_lib.ServerError, match=f"^error: .*{__import__('re').escape(error)}"):
            c.send_raw(message)
        assert c.infer({"state": np.zeros(OBS)})["actions"].shape == (T_O, OBS)
    assert server.stats.errors == 1


def test_an_oversized_message_closes_only_its_own_connection():
    policy = server_lib.ChunkPolicyServer(EchoPolicy(), WEIGHTS, execute_steps=1)
    server = server_lib.PolicyServer(policy, host="127.0.0.1", port=0, max_message_mb=1 / 1024)  # 1 KiB
    with server_lib.BackgroundServer(server) as port:
        with client_lib.PolicyClient(port=port) as other:
            with client_lib.PolicyClient(port=port) as c:
                with pytest.raises(Exception, match="1009|too big"):
                    c.send_raw(wire.packb({"state": np.zeros(4096, np.float32)}))
            assert other.infer({"state": np.zeros(OBS)})["actions"].shape == (T_O, OBS)
    with pytest.raises(ValueError, match="max_message_mb"):
        server_lib.PolicyServer(policy, max_message_mb=0)


def test_concurrent_clients_are_batched_and_each_gets_its_own_answer(served):
    server, port = served
    errors, answers = [], {}

    def one(i):
        try:
            with client_lib.PolicyClient(port=port) as c:
                answers[i] = [c.infer({"state": np.full((T_O, OBS), float(i + k))})["actions"] for k in range(6)]
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    for i, chunks in answers.items():
        for k, chunk in enumerate(chunks):
            assert np.all(chunk == i + k)  # nobody got someone else's actions
    assert server.stats.requests == 72 and server.stats.batches <= 72
    assert max(server.stats.batch_sizes) <= 8


def test_batch_buckets_are_powers_of_two_up_to_the_limit():
    assert [server_lib.batch_bucket(n, 16) for n in (1, 2, 3, 5, 9, 16)] == [1, 2, 4, 8, 16, 16]
    assert server_lib.batch_bucket(5, 6) == 6
    with pytest.raises(ValueError, match="max_batch"):
        server_lib.PolicyServer(None, max_batch=0)
