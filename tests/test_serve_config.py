"""Pure tier: the canary judge (routing share and verdict), the serving config's new fields and the
serve command's input errors (no Ray started)."""

from __future__ import annotations

import random

import pytest

from lepton_ray.errors import ConfigError
from lepton_ray.serve import ServeConfig
from lepton_ray.serve.canary import CanaryJudge


def judge(**kw) -> CanaryJudge:
    return CanaryJudge(**{"share": 0.25, "min_requests": 20, "rng": random.Random(0)} | kw)


def test_trial_sends_about_the_configured_share_to_the_canary():
    j = judge()
    picks = [j.pick() for _ in range(4000)]
    assert 0.22 < picks.count("canary") / len(picks) < 0.28


def test_a_canary_as_good_as_stable_is_promoted_after_min_requests():
    j = judge()
    for _ in range(100):
        j.record("stable", True)
    for i in range(20):
        assert j.state == "trial", i
        j.record("canary", True)
    assert j.state == "promoted"
    assert {j.pick() for _ in range(50)} == {"canary"}


def test_a_canary_that_fails_more_than_stable_is_rolled_back():
    j = judge()
    for i in range(100):
        j.record("stable", i % 50 != 0)  # 2% errors
    for i in range(20):
        j.record("canary", i % 10 != 0)  # 10% errors
    assert j.state == "rolled_back"
    assert {j.pick() for _ in range(50)} == {"stable"}
    assert j.report()["canary"] == {"requests": 20, "errors": 2, "error_rate": 0.1}


def test_tolerance_and_a_decided_verdict_is_final():
    j = judge(tolerance=0.1)
    for i in range(20):
        j.record("canary", i % 10 != 0)  # 10% <= 0% + 10%
    assert j.state == "promoted"
    for _ in range(50):
        j.record("canary", False)
    assert j.state == "promoted"


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
