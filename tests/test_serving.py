"""The served model refuses what the CLI refuses, and nothing one request asks for can tie it up.

Requests go through MLflow's own request handler in-process (`scoring_server.invocations`, which
`mlflow models serve` runs for every POST /invocations), so each (status, body) here is what an HTTP client
gets; tests/integration/test_serve.py sends the same to a real server. Every body is checked for a traceback.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import scoring_server

from picollm.errors import PicollmError, TimeBudgetExceeded
from picollm.model.config import ModelConfig
from picollm.model.sampling import Sampling
from picollm.model.transformer import Transformer
from picollm.tracking import limits
from picollm.tracking.limits import ServeLimits
from picollm.tracking.prompts import continue_prompts, generate_within

from .conftest import Trained, copy_store, mlflow_store
from .test_faults import main_usage_error


def post(model: Any, payload: Any, raw: str | None = None) -> tuple[int, dict[str, Any]]:
    """What `mlflow models serve` answers to POST /invocations with this JSON body: (status, body)."""
    data = raw if raw is not None else json.dumps(payload)
    try:
        r = scoring_server.invocations(data, "application/json", model, model.metadata.get_input_schema())
        status, body = r.status, json.loads(r.response)
    except MlflowException as e:  # the server's handler serialises these (scoring_server._async_catch_...)
        status, body = e.get_http_status_code(), json.loads(e.serialize_as_json())
    text = json.dumps(body)
    assert "Traceback" not in text and "stack_trace" not in body, text[:2000]
    return status, body


@pytest.fixture(scope="module")
def served(trained: Trained) -> Iterator[Any]:
    """The trained tiny model (linear attention, ALiBi) as `mlflow models serve` loads it, default limits."""
    with mlflow_store(trained.directory):
        yield mlflow.pyfunc.load_model(f"models:/{trained.name}@champion")


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory, store_template: Path) -> Iterator[tuple[Any, float]]:
    """An untrained softmax/ALiBi model wide enough that 4096 tokens take seconds, loaded with a 1 s budget."""
    directory = tmp_path_factory.mktemp("slow_store")
    copy_store(store_template, directory)
    with mlflow_store(directory), pytest.MonkeyPatch.context() as mp:
        from picollm.tracking import registry, store

        store.init_tracking()
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=32, d_model=64, n_layers=2, n_heads=4, attention="softmax", pos_encoding="alibi")
        with store.tracked_run("slow"):
            registry.log_model(Transformer(cfg), "slow")
        mp.setenv(limits.ENV_TIME_BUDGET_S, "1")
        yield mlflow.pyfunc.load_model("models:/slow/1"), 1.0


def test_a_good_request_is_answered_like_continue_prompts(served, trained: Trained):
    import picollm

    status, body = post(served, {"inputs": ["2 4 6 8", "1 2"], "params": {"max_new_tokens": 3}})
    assert status == 200
    with mlflow_store(trained.directory):
        model = picollm.load_model(f"{trained.name}@champion")
    assert body["predictions"] == continue_prompts(model, ["2 4 6 8", "1 2"], max_new_tokens=3)


# --------------------------------------------------------------------------------------------------
# Parameters: the CLI's limits and messages


BAD_PARAMS = [  # (REST params, the CLI's arguments for the same value, the message both give)
    ({"max_new_tokens": 100_000_000}, ["-n", "100000000"], "max_new_tokens must be at most 4096, got 100000000"),
    ({"max_new_tokens": 0}, ["-n", "0"], "max_new_tokens must be at least 1, got 0"),
    ({"temperature": -1.0}, ["--temperature", "-1"], "temperature must be a finite number >= 0 (0 = greedy), got -1.0"),
    ({"temperature": float("nan")}, ["--temperature", "nan"], "temperature must be a finite number >= 0"),
    ({"temperature": float("inf")}, ["--temperature", "inf"], "temperature must be a finite number >= 0"),
    ({"top_p": 2.0}, ["--top-p", "2"], "top_p must be between 0 and 1 (0 keeps only the best token), got 2.0"),
    ({"top_p": float("nan")}, ["--top-p", "nan"], "top_p must be between 0 and 1"),
    ({"top_k": -1}, ["--top-k", "-1"], "top_k must be an integer >= 1"),
    ({"seed": -1}, ["--seed", "-1"], "seed must be an integer in 0..2^63-1, got -1"),
]


@pytest.mark.parametrize("params, cli_args, message", BAD_PARAMS, ids=lambda x: str(x)[:30])
def test_a_bad_parameter_is_a_400_with_the_clis_message(served, params, cli_args, message, monkeypatch, capsys):
    status, body = post(served, {"inputs": ["1 2"], "params": {**params, "temperature": 1.0, **params}})
    assert status == 400 and body["error_code"] == "INVALID_PARAMETER_VALUE", body
    assert body["message"].startswith(message), body
    main_usage_error(["generate", "anything", "1 2", *cli_args], message, monkeypatch, capsys)


def test_a_huge_max_new_tokens_is_refused_at_once(served):
    t0 = time.perf_counter()
    status, body = post(served, {"inputs": ["1 2"], "params": {"max_new_tokens": 100_000_000}})
    assert status == 400 and "at most 4096" in body["message"]
    assert time.perf_counter() - t0 < 1.0  # no buffer allocated, no token decoded


def test_an_unknown_parameter_is_refused_and_named(served):
    status, body = post(served, {"inputs": ["1 2"], "params": {"max_tokens": 3}})
    assert status == 400 and "unknown parameter(s) max_tokens" in body["message"], body
    assert "max_new_tokens" in body["message"]  # the known ones, to correct the typo
    assert post(served, {"inputs": ["1 2"], "params": {"max_new_tokens": 3}})[0] == 200  # nothing left over


def test_the_signature_defaults_and_edges_work(served):
    for params in ({"top_k": 0, "temperature": 1.0}, {"top_p": 0.0, "temperature": 1.0}, {"top_p": 1.0}, {}):
        status, body = post(served, {"inputs": ["1 2"], "params": params})
        assert status == 200 and len(body["predictions"][0].split()) == 8, (params, body)
    assert post(served, {"inputs": ["1 2"], "params": {"seed": limits.MAX_SEED, "temperature": 0.7}})[0] == 200


# --------------------------------------------------------------------------------------------------
# Inputs: every shape MLflow hands over is answered or refused, never cut down


@pytest.mark.parametrize(
    "payload, fragment",
    [
        ({"inputs": [[5, 10, 15, 20]]}, "got a 2-d array (a list of lists)"),
        ({"inputs": [["1 2", "3 4"]]}, "(a list of lists)"),
        ({"inputs": [5, 10, 15]}, "prompt 1 is int 5, not a string"),
        ({"inputs": [1.5]}, "not a string"),
        ({"inputs": [True]}, "not a string"),
        ({"inputs": [None]}, "prompt 1 is null"),
        ({"inputs": {"prompt": ["1 2"]}}, "named inputs (prompt) are not supported"),
        ({"dataframe_split": {"columns": ["p", "q"], "data": [["1 2", "3"]]}}, "one column of prompts, got 2 (p, q)"),
        ({"dataframe_records": [{"p": "1 2", "q": "5"}]}, "one column of prompts, got 2"),
        ({"instances": [{"a": "1 2"}]}, "named inputs (a)"),
        ({"messages": [{"role": "user", "content": "1 2"}]}, "named inputs (messages)"),
        ({"prompt": "1 2"}, "named inputs (prompt)"),
        ({"inputs": ["1 2 99"]}, "prompt token 99 is outside the model's values 0..30"),
        ({"inputs": ["a b"]}, "prompt token 'a' is not an integer"),
        ({"inputs": [""]}, "empty"),
    ],
    ids=lambda x: json.dumps(x)[:40],
)
def test_an_input_of_another_shape_is_a_400_saying_what_came(served, payload, fragment):
    status, body = post(served, payload)
    assert status == 400 and body["error_code"] == "INVALID_PARAMETER_VALUE", body
    assert fragment in body["message"], body
    if "prompt token" not in fragment and fragment != "empty":
        assert '{"inputs": ["2 4 6 8"]}' in body["message"]  # what to send instead


@pytest.mark.parametrize(
    "payload",
    [
        {"inputs": "2 4 6 8"},
        {"inputs": ["2 4 6 8"]},
        {"instances": ["2 4 6 8"]},
        {"dataframe_split": {"columns": ["prompt"], "data": [["2 4 6 8"]]}},
        {"dataframe_records": [{"prompt": "2 4 6 8"}]},
    ],
    ids=lambda x: json.dumps(x)[:40],
)
def test_the_documented_shapes_are_answered_alike(served, payload):
    assert post(served, payload) == post(served, {"inputs": ["2 4 6 8"]})
    assert post(served, payload)[0] == 200


def test_an_empty_list_is_an_empty_answer(served):
    assert post(served, {"inputs": []}) == (200, {"predictions": []})


def test_prompts_past_the_serving_limits_are_refused_before_any_work(served):
    t0 = time.perf_counter()
    status, body = post(served, {"inputs": ["1 2"] * 17})
    assert (
        status == 400
        and "17 prompts in one request" in body["message"]
        and "PICOLLM_SERVE_MAX_PROMPTS" in body["message"]
    )
    status, body = post(served, {"inputs": [" ".join(["1"] * 1025)]})
    assert status == 400 and "1025 tokens" in body["message"] and "PICOLLM_SERVE_MAX_PROMPT_TOKENS" in body["message"]
    status, body = post(served, {"inputs": [" ".join(["1"] * 5_000_000)]})  # 10 MB: refused by its length alone
    assert status == 400 and "characters" in body["message"] and len(json.dumps(body)) < 1000  # never echoed back
    assert time.perf_counter() - t0 < 10


def test_an_internal_error_is_a_500_without_a_traceback(served, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("a bug\nwith a second line")

    monkeypatch.setattr("picollm.tracking.prompts.continue_prompts", boom)
    status, body = post(served, {"inputs": ["1 2"]})
    assert status == 500 and body["message"] == "internal error (RuntimeError: a bug); see the server log", body


# --------------------------------------------------------------------------------------------------
# The time budget


def test_a_request_over_the_time_budget_stops_and_the_next_is_served(slow):
    model, budget = slow
    t0 = time.perf_counter()
    status, body = post(model, {"inputs": [" ".join(["1"] * 256)] * 16, "params": {"max_new_tokens": 4096}})
    took = time.perf_counter() - t0
    assert status == 504 and body["error_code"] == "DEADLINE_EXCEEDED", body
    assert (
        "time budget of 1 s (PICOLLM_SERVE_TIME_BUDGET_S)" in body["message"]
        and "of 4096 new tokens" in body["message"]
    )
    assert took < budget + 3, took
    t0 = time.perf_counter()
    status, body = post(model, {"inputs": ["1 2"], "params": {"max_new_tokens": 4}})
    assert status == 200 and len(body["predictions"][0].split()) == 4
    assert time.perf_counter() - t0 < 1


def test_generation_within_a_budget_equals_the_models_own():
    """`generate_within` is `Transformer.generate`'s fast path step by step: the same tokens, greedy or sampled,
    padded or not, for a KV-cache mixer and a recurrent one, and the learned table's bound."""
    prompts = torch.tensor([[31, 31, 3, 4, 5], [1, 2, 3, 4, 5]])  # left-padded (pad 31)
    for attention, pos in (("softmax", "alibi"), ("linear", "learned"), ("softmax", "sinusoidal")):
        torch.manual_seed(0)
        table = {"max_seq_len": 24} if pos == "learned" else {}
        cfg = ModelConfig(
            vocab_size=32, d_model=16, n_layers=2, n_heads=2, attention=attention, pos_encoding=pos, **table
        )
        model = Transformer(cfg).eval()
        for temperature, top_k, top_p in ((0.0, None, None), (0.9, 5, None), (1.0, None, 0.8)):
            want = model.generate(prompts, 12, temperature, top_k, top_p, torch.Generator().manual_seed(3))
            got = generate_within(
                model, prompts, 12, Sampling(temperature, top_k, top_p, torch.Generator().manual_seed(3)),
                deadline=time.monotonic() + 60, budget_s=60,
            )  # fmt: skip
            assert torch.equal(want, got), (attention, pos, temperature)
        if pos == "learned":
            with pytest.raises(PicollmError, match="max_seq_len"):
                generate_within(model, prompts, 24, Sampling(), time.monotonic() + 60, 60)


def test_continue_prompts_stops_at_its_budget():
    model = Transformer(ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2)).eval()
    assert continue_prompts(model, ["1 2"], 5, time_budget_s=60) == continue_prompts(model, ["1 2"], 5)
    with pytest.raises(TimeBudgetExceeded, match="after 0 of 5 new tokens for 2 prompt"):
        continue_prompts(model, ["1 2", "3"], 5, time_budget_s=1e-9)


def test_serve_limits_come_from_the_environment():
    assert ServeLimits.from_env({}) == ServeLimits(max_prompt_tokens=1024, max_prompts=16, time_budget_s=30.0)
    env = {limits.ENV_TIME_BUDGET_S: "2.5", limits.ENV_MAX_PROMPTS: "4", limits.ENV_MAX_PROMPT_TOKENS: "64"}
    assert ServeLimits.from_env(env) == ServeLimits(max_prompt_tokens=64, max_prompts=4, time_budget_s=2.5)
    for name, value in (
        (limits.ENV_TIME_BUDGET_S, "0"),
        (limits.ENV_MAX_PROMPTS, "1.5"),
        (limits.ENV_TIME_BUDGET_S, "nan"),
    ):
        with pytest.raises(PicollmError, match=name):
            ServeLimits.from_env({name: value})


# --------------------------------------------------------------------------------------------------
# make serve's MODEL: read as every picollm command reads a reference


def test_make_serve_reads_a_model_reference_like_every_command(use_trained: Trained, monkeypatch, capsys):
    from pipelines import model_uri

    name = use_trained.name
    for ref, uri in (
        (name, f"models:/{name}/1"),
        (f"{name}@champion", f"models:/{name}@champion"),
        (f"{name}/1", f"models:/{name}/1"),
    ):
        assert model_uri.main(["model_uri", ref]) == 0
        assert capsys.readouterr().out.strip() == uri
    run_id = use_trained.outcome.run_id
    assert model_uri.main(["model_uri", run_id]) == 0 and capsys.readouterr().out.strip() == f"runs:/{run_id}/{name}"
    assert model_uri.main(["model_uri", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: no registered model named 'nope' (registered: {name})"], err
    monkeypatch.setenv(limits.ENV_MAX_PROMPTS, "0")
    assert model_uri.main(["model_uri", name]) == 2
    assert capsys.readouterr().err.strip() == "error: PICOLLM_SERVE_MAX_PROMPTS must be a positive integer, got '0'"
