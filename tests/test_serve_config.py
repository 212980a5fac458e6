"""Pure tier: the canary judge (routing share and verdict), the serving config's new fields and the
serve command's input errors (no Ray started)."""

from __future__ import annotations

import random

import pytest

from lepton_ray.errors import ConfigError
from lepton_ray.serve import ServeConfig
from lepton_ray.serve.canary import (
    CanaryJudge,
    CanaryTrial,
    VerdictRecord,
    token_agreement,
    top1_agreement,
)


def judge(**kw) -> CanaryJudge:
    return CanaryJudge(**{"share": 0.25, "min_requests": 20, "rng": random.Random(0)} | kw)


OK = (True, 10.0)  # (the call succeeded, its milliseconds)


def test_trial_mirrors_about_the_configured_share_to_the_canary():
    j = judge()
    picks = [j.pick() for _ in range(4000)]
    assert set(picks) == {"stable", "mirror"}
    assert 0.22 < picks.count("mirror") / len(picks) < 0.28


def test_a_canary_as_good_as_stable_is_promoted_after_min_requests():
    j = judge()
    for i in range(20):
        assert j.state == "trial", i
        j.record(OK, (True, 12.0), agreement=(1, 1))
    assert j.state == "promoted", j.reason
    assert {j.pick() for _ in range(50)} == {"canary"}


def test_a_canary_that_fails_more_than_stable_is_rolled_back():
    j = judge()
    for i in range(20):
        canary_ok = i % 10 != 0  # 10% errors, stable none
        j.record(OK, (canary_ok, 10.0), agreement=(1, 1) if canary_ok else (0, 0))
    assert j.state == "rolled_back"
    assert j.reason == "error rate 0.10 > stable's 0.00 + 0.0"
    assert {j.pick() for _ in range(50)} == {"stable"}
    assert j.report()["canary"] == {"requests": 20, "errors": 2, "error_rate": 0.1, "p50_ms": 10.0}


def test_a_canary_that_answers_differently_is_rolled_back():
    # A model with random weights: never an error, as fast, but its classes are not stable's.
    j = judge()
    for i in range(20):
        j.record(OK, OK, agreement=(1 if i % 10 == 0 else 0, 1))  # agrees on 1 image in 10
    assert j.state == "rolled_back" and j.agreement == 0.1
    assert j.reason == "agreement with stable 0.10 < 0.9"


def test_a_slower_canary_is_rolled_back():
    j = judge(max_latency_ratio=1.5)
    for _ in range(20):
        j.record((True, 10.0), (True, 16.0), agreement=(1, 1))
    assert j.state == "rolled_back" and j.reason == "p50 16.0 ms > 1.5 x stable's 10.0 ms"
    j = judge(max_latency_ratio=1.5)
    for _ in range(20):
        j.record((True, 10.0), (True, 14.0), agreement=(1, 1))
    assert j.state == "promoted"


def test_tolerance_and_a_decided_verdict_is_final():
    j = judge(tolerance=0.1)
    for i in range(20):
        canary_ok = i % 10 != 0  # 10% <= 0% + 10%
        j.record(OK, (canary_ok, 10.0), agreement=(1, 1) if canary_ok else (0, 0))
    assert j.state == "promoted"
    for _ in range(50):
        j.record(OK, (False, 10.0))
    assert j.state == "promoted" and j.canary.requests == 20


def test_agreement_is_the_top1_class_per_image():
    stable = {"predictions": [{"index": 3}, {"index": 1}, {"index": 4}]}
    canary = {"predictions": [{"index": 3}, {"index": 2}, {"index": 4}]}
    assert top1_agreement(stable, canary) == (2, 3)


def test_the_verdict_is_stored_once_and_adopted_by_a_new_judge(tmp_path):
    record = VerdictRecord(str(tmp_path), "app", "aaaaaaaaaaaa", "bbbbbbbbbbbb")
    assert record.read() is None
    first = judge()
    for _ in range(20):
        first.record(OK, OK, agreement=(0, 1))
    stored = record.write(first)
    assert stored["state"] == "rolled_back" and record.read() == stored
    assert record.location().path == str(
        tmp_path / "serving" / "app" / "canary" / "aaaaaaaaaaaa--bbbbbbbbbbbb.json"
    )
    # Another replica that reached the other verdict meanwhile: the stored one stands.
    other = judge()
    for _ in range(20):
        other.record(OK, OK, agreement=(1, 1))
    assert other.state == "promoted" and record.write(other) == stored
    fresh = judge()  # a restarted replica
    fresh.adopt(record.read())
    assert fresh.state == "rolled_back" and {fresh.pick() for _ in range(50)} == {"stable"}


def test_a_record_that_is_not_json_is_no_verdict(tmp_path):
    record = VerdictRecord(str(tmp_path), "app", "aaaaaaaaaaaa", "bbbbbbbbbbbb")
    record.location().write_bytes(b"{not json")
    assert record.read() is None
    j = judge()
    j.adopt({"state": "exploded"})
    assert j.state == "trial"


def test_a_trial_judges_mirrored_calls_stores_the_verdict_and_a_new_replica_adopts_it(tmp_path):
    import asyncio

    record = VerdictRecord(str(tmp_path), "app", "aaaaaaaaaaaa", "bbbbbbbbbbbb")
    digit = {"predictions": [{"index": 7}]}

    async def canary_answer(index: int) -> tuple[dict, float]:
        return {"predictions": [{"index": index}]}, 0.01

    async def trial_of(n: int, index: int) -> CanaryTrial:
        trial = CanaryTrial(judge(min_requests=n), record)
        for _ in range(n):
            await trial.judge_later(canary_answer(index), digit, 0.01)
        return trial

    trial = asyncio.run(trial_of(20, index=3))  # answers another class: rolled back, stored
    assert trial.judge.state == "rolled_back" and trial.stored
    assert record.read()["state"] == "rolled_back"
    restarted = CanaryTrial(judge(), record)  # reads the record before any request
    assert restarted.stored and restarted.report()["state"] == "rolled_back"
    assert restarted.report()["canary"]["requests"] == 0


def test_a_trial_goes_on_while_the_store_is_unreachable(tmp_path):
    import asyncio

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")  # the record's folder would have to be below a file
    trial = CanaryTrial(judge(min_requests=1), VerdictRecord(str(blocker), "a", "x" * 12, "y" * 12))
    assert trial.judge.state == "trial" and not trial.stored

    async def canary_answer() -> tuple[dict, float]:
        return {"predictions": [{"index": 1}]}, 0.01

    async def one_request() -> None:
        await trial.judge_later(canary_answer(), {"predictions": [{"index": 1}]}, 0.01)

    asyncio.run(one_request())
    assert trial.judge.state == "promoted" and not trial.stored  # decided here, stored later


def test_generation_agreement_is_the_shared_prefix_of_the_longer_answer():
    assert token_agreement({"tokens": [1, 2, 3]}, {"tokens": [1, 2, 3]}) == (3, 3)
    assert token_agreement({"tokens": [1, 2, 3]}, {"tokens": [1, 9, 3]}) == (1, 3)  # then apart
    assert token_agreement({"tokens": [1, 2]}, {"tokens": [1, 2, 3, 4]}) == (2, 4)  # stopped early
    assert token_agreement({"tokens": []}, {"tokens": []}) == (0, 0)


def _stream(tokens: list[int], fail: bool = False):
    async def events():
        for t in tokens:
            yield t
        if fail:
            raise RuntimeError("replica died")
        yield {"finish_reason": "length"}

    return events()


def test_a_mirrored_generation_streams_stable_and_judges_the_canary_tokens(tmp_path):
    """The client gets stable's events unchanged; the judge sees both token lists (per-token
    latency); a canary that generates other tokens is rolled back, one that generates the same
    ones promoted; a client that leaves early cancels the canary and counts nothing."""
    import asyncio

    async def trial_of(canary_tokens: list[int], n: int = 4) -> tuple[CanaryTrial, list]:
        record = VerdictRecord(str(tmp_path), "gen", "a" * 12, "".join(map(str, canary_tokens)))
        trial = CanaryTrial(judge(min_requests=n, min_agreement=0.9), record)
        seen = []
        for _ in range(n):

            async def canary() -> tuple[dict, float]:
                return {"tokens": canary_tokens}, 0.0  # no slower than stable

            seen.append(
                [
                    e
                    async for e in trial.mirrored(
                        _stream([5, 6, 7]), asyncio.ensure_future(canary())
                    )
                ]
            )
            await asyncio.gather(*trial._pending)
        return trial, seen

    same, seen = asyncio.run(trial_of([5, 6, 7]))
    assert seen == [[5, 6, 7, {"finish_reason": "length"}]] * 4
    assert same.judge.state == "promoted" and same.judge.agreement == 1.0
    other, _ = asyncio.run(trial_of([5, 8, 7]))  # apart after one token: 1 of 3
    assert other.judge.state == "rolled_back" and other.judge.agreement == pytest.approx(1 / 3)
    assert "agreement with stable 0.33 < 0.9" in other.judge.reason

    async def client_leaves() -> tuple[CanaryTrial, asyncio.Future]:
        trial = CanaryTrial(
            judge(min_requests=1), VerdictRecord(str(tmp_path), "g", "c" * 12, "d" * 12)
        )
        canary = asyncio.ensure_future(asyncio.sleep(60, result=({"tokens": [1]}, 0.1)))
        stream = trial.mirrored(_stream([5, 6, 7]), canary)
        assert await stream.__anext__() == 5
        await stream.aclose()  # the client went away after one token
        await asyncio.sleep(0)
        return trial, canary

    left, canary = asyncio.run(client_leaves())
    assert canary.cancelled() and left.judge.canary.requests == 0

    async def stable_fails() -> CanaryTrial:
        trial = CanaryTrial(
            judge(min_requests=1), VerdictRecord(str(tmp_path), "h", "e" * 12, "f" * 12)
        )

        async def canary() -> tuple[dict, float]:
            return {"tokens": [5]}, 0.001

        with pytest.raises(RuntimeError):
            async for _ in trial.mirrored(_stream([5], fail=True), asyncio.ensure_future(canary())):
                pass
        await asyncio.gather(*trial._pending)
        return trial

    failed = asyncio.run(stable_fails())
    assert failed.judge.stable.errors == 1 and failed.judge.canary.requests == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"canary_share": 1.5}, "^ServeConfig.canary_share: must be in \\[0, 1\\], got 1.5$"),
        ({"canary_min_requests": 0}, "^ServeConfig.canary_min_requests: must be >= 1, got 0$"),
        ({"ingress_replicas": 0}, "^ServeConfig.ingress_replicas: must be >= 1, got 0$"),
        ({"auth_token": " "}, "^ServeConfig.auth_token: must not be blank$"),
        ({"max_replicas": 1, "min_replicas": 2}, "^ServeConfig.max_replicas: must be >= min_repl"),
        ({"name": "../x"}, "^ServeConfig.name: must be a plain name"),
        ({"route_prefix": "api"}, "^ServeConfig.route_prefix: must start with '/', got 'api'$"),
        ({"gpus_per_replica": 0}, "^ServeConfig.gpus_per_replica: must be in \\(0, 1\\], got 0$"),
        ({"use_gpu": "yes"}, "^ServeConfig.use_gpu: expected true or false, got 'yes'$"),
        ({"trusted_modules": [1]}, "^ServeConfig.trusted_modules\\[0\\]: expected a string"),
    ],
)
def test_bad_serve_config_names_the_field(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ServeConfig(checkpoint="/x", **kwargs)


def test_the_token_stays_out_of_the_config_repr_and_the_model_config():
    cfg = ServeConfig(
        checkpoint="/x", auth_token="hunter2", canary_checkpoint="/y", max_batch_size=8
    )
    assert "hunter2" not in repr(cfg)
    model = cfg.model_only("/y")
    assert model.checkpoint == "/y" and model.auth_token is None and model.canary_checkpoint is None
    assert model.max_batch_size == 8


def test_the_token_is_never_serialised_and_trusted_modules_reach_the_model_replica():
    from lepton_ray.config import from_dict, to_dict

    cfg = ServeConfig(checkpoint="/x", auth_token="hunter2", trusted_modules="acme.models, acme.x")
    assert cfg.trusted_modules == ("acme.models", "acme.x")  # a string is a comma-separated list
    assert "auth_token" not in to_dict(cfg) and "hunter2" not in repr(to_dict(cfg))
    assert from_dict(ServeConfig, to_dict(cfg)) == ServeConfig(
        checkpoint="/x", trusted_modules=("acme.models", "acme.x")
    )
    assert cfg.model_only().trusted_modules == ("acme.models", "acme.x")
    assert ServeConfig(checkpoint="/x").trusted_modules == ()  # only registered architectures


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["/nowhere/ckpt"], "no complete checkpoint at /nowhere/ckpt"),
        (["/x", "--canary-share", "2"], "ServeConfig.canary_share: must be in [0, 1], got 2"),
    ],
)
def test_cli_serve_mistakes_exit_2_with_one_line_before_ray_starts(args, match):
    # A process of its own: in this one, the session's Ray cluster forwards its workers' log lines
    # to stderr whenever they arrive, which would mix into the output under test.
    from tests.test_cli import run_cli

    r = run_cli("serve", *args)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and match in r.stderr, r.stderr


def _autoscaled(deployment) -> bool:
    return deployment._deployment_config.autoscaling_config is not None


def _layout(**kw) -> dict:
    """Deployment name -> (num_cpus, autoscaled) of the application build_app makes (no Ray)."""
    from lepton_ray.serve import build_app

    ingress = build_app(ServeConfig(checkpoint="/x", name="n", num_cpus=2, **kw))._bound_deployment
    out = {ingress.name: (ingress.ray_actor_options["num_cpus"], _autoscaled(ingress))}
    for arg in ingress.init_args[1:3]:  # (cfg, stable, canary, token): the model deployments
        if arg is not None:
            d = arg._bound_deployment
            out[d.name] = (d.ray_actor_options["num_cpus"], _autoscaled(d))
    return out


def test_one_hop_puts_the_model_in_the_autoscaled_http_replica_unless_two_are_needed():
    assert _layout() == {"n-ingress": (2, True)}
    two_hops = {"n-ingress": (0.1, False), "n-model": (2, True)}
    assert _layout(one_hop=False) == two_hops
    assert _layout(min_replicas=0) == two_hops  # the HTTP front stays up while the model sleeps
    assert _layout(canary_checkpoint="/y") == {
        "n-ingress": (0.1, False),
        "n-model": (2, True),
        "n-canary": (2, True),
    }


@pytest.mark.parametrize(
    ("kw", "cpus", "gpus", "fit"),
    [
        # One GPU shared by quarter-GPU replicas: the CPUs allow 16, the GPU 4.
        ({"use_gpu": True, "gpus_per_replica": 0.25}, 16, 1, 4),
        ({"use_gpu": True, "gpus_per_replica": 0.25}, 2, 1, 2),  # 2 CPUs: 2 replicas
        ({"use_gpu": True, "gpus_per_replica": 0.25}, 16, 2, 8),
        ({"use_gpu": True, "gpus_per_replica": 0.3}, 16, 1, 3),  # 3.33 -> 3
        ({"use_gpu": True, "gpus_per_replica": 0.1, "num_cpus": 0.1}, 0.3, 1, 3),  # not 2.999
        ({}, 4, 1, 4),  # no GPU asked for: the GPUs do not count
        ({"num_cpus": 0.5}, 3, 0, 6),
        ({"num_cpus": 0}, 3, 0, 3),  # reserving none still uses a CPU
        ({"one_hop": False, "ingress_replicas": 2}, 4, 0, 3),  # 4 - 0.2 for the ingress
        ({"canary_checkpoint": "/y"}, 8, 0, 3),  # (8 - 0.1) / 2 deployments
        ({"min_replicas": 3}, 1, 0, 3),  # never under min_replicas: Serve waits for room
        ({"use_gpu": True}, 8, 0, 1),  # no GPU in the cluster: one, which waits for one
    ],
)
def test_replicas_that_fit_the_cpus_and_the_shared_gpus(kw, cpus, gpus, fit):
    cfg = ServeConfig(checkpoint="/x", max_replicas="auto", **kw)
    assert cfg.replicas_that_fit(cpus, gpus) == fit
    assert cfg.max_replicas_for(cpus, gpus) == fit
    assert ServeConfig(checkpoint="/x", max_replicas=5, **kw).max_replicas_for(cpus, gpus) == 5


def test_auto_max_replicas_is_resolved_from_the_cluster_when_the_app_is_built(monkeypatch):
    import importlib

    deploy_module = importlib.import_module(
        "lepton_ray.serve.deploy"
    )  # the package's name is the function
    monkeypatch.setattr(deploy_module, "cluster_resources", lambda: (16.0, 1.0))
    cfg = ServeConfig(checkpoint="/x", max_replicas="auto", use_gpu=True, gpus_per_replica=0.25)
    ingress = deploy_module.build_app(cfg)._bound_deployment
    assert ingress.ray_actor_options["num_gpus"] == 0.25
    assert ingress._deployment_config.autoscaling_config.max_replicas == 4
    # A number is kept as given (a cluster that adds nodes on demand may grow into it).
    cfg = ServeConfig(checkpoint="/x", max_replicas=7, use_gpu=True, gpus_per_replica=0.25)
    assert (
        deploy_module.build_app(
            cfg
        )._bound_deployment._deployment_config.autoscaling_config.max_replicas
        == 7
    )


@pytest.mark.parametrize(
    ("value", "ok"),
    [("auto", "auto"), (3, 3), ("3", None), ("many", None), (0, None)],
)
def test_max_replicas_is_a_number_or_auto(value, ok):
    from lepton_ray.config import from_dict

    if ok is not None:
        assert (
            from_dict(ServeConfig, {"checkpoint": "/x", "max_replicas": value}).max_replicas == ok
        )
        return
    with pytest.raises(ConfigError, match="^ServeConfig.max_replicas: "):
        from_dict(ServeConfig, {"checkpoint": "/x", "max_replicas": value})


def test_the_max_replicas_flag_takes_a_number_or_auto(capsys):
    from lepton_ray.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["serve", "c", "--max-replicas", "auto"]).max_replicas == "auto"
    assert parse(["serve", "c", "--max-replicas", "3"]).max_replicas == 3
    assert parse(["serve", "c"]).max_replicas == 2  # ServeConfig's default
    with pytest.raises(SystemExit):
        parse(["serve", "c", "--max-replicas", "many"])
    assert capsys.readouterr().err.splitlines()[-1] == (
        "lepton-ray serve: error: argument --max-replicas: takes N or auto, got 'many'"
    )
